"""PlainUSR (Wang et al., ACCV 2024): plain U-shaped SR network, Rep and train-time forms.

Two forms share one top-level module and key layout (``icandle/PlainUSR``,
``2024_PlainUSR_ACCV/archs``):

- **Rep** (``u``, ``t``, ``s``, ``m``, ``base``, ``l``): the inference form matching the
  released ``*_Rep_x{2,4}.pth`` raw state dicts -- each block is ``Conv3x3, LReLU(0.05),
  Conv3x3 [, LReLU, Conv3x3]`` plus local attention.
- **train** (``<name>-train``): the re-parameterisable training form
  (``PlainUSR_train_arch.py``) -- every 3x3 conv is a ``RepMBConv`` and blocks with
  attention carry a ``PConv`` before it.  Keys as in the official training checkpoints:
  ``blockX.body.{0,2[,4]}.{expand_conv,fea_conv,reduce_conv}.*``, ``...se.tensor``,
  ``...se.se.1.weight``, ``...se.se.3.weight``, ``blockX.body.{3|5}.conv.*`` (PConv) and the
  attention at ``blockX.body.{4|6}.body.{0,2,3}``.  Checked against the official code:
  base x4 has 134 tensors and 1,248,825 parameters.

Official semantics reproduced:

- Forward: ``x = head(x)``, then in-place channel-prefix updates
  ``x[:, :C] = block(x[:, :C])`` over ``[C0, C1, C2, C1, C0]`` (ultra: ``[C0, C1, C0]``), then
  ``tail`` (conv + PixelShuffle).  No input normalisation.  (The official train class's
  ``if self.eval():`` always takes this path, so train and Rep forms share it.)  The
  in-place write is done literally unless autograd is recording through ``x`` (an in-place
  write into a tensor whose slices were saved for backward would fail), where the
  value-identical ``cat`` form is used.  The export-safe rewrite always uses ``cat``.
- ``RepMBConv``: ``e = expand(x)`` (1x1, n -> 2n); ``pad(e)`` with the *bias of expand*
  on the 1-px border (= expand applied to zero padding); ``u = fea_conv`` (3x3 valid);
  ``v = a * u + e`` with ``a = sigmoid(L2 SiLU(L1 t))`` computed from the learned constant
  ``t = se.tensor`` (Linear layers without bias, hidden size ``2n // 4``, as in the
  official ``ASR``); ``y = reduce(v) + x``.
- ``PConv``: channel 0 replaced by a 1x1 mix of all channels (channel 0 gates the LIA).
- ``LocalAttention``: ``w = bilinear(sigmoid(conv3(conv2_s2(SoftPool7/3(conv1x1(x))))), (H, W))``,
  ``out = x * w * sigmoid(x[:, :1])``.  ``LocalAttentionSpeed`` (ultra ``blockm``):
  ``out = x * sigmoid(x[:, :1]) * sigmoid(conv3x3(x))``.  Multiplication orders kept.
- SoftPool: ``AvgPool(e^x x) / AvgPool(e^x)``, ``AvgPool2d(7, 3, 0)``; needs H, W >= 7.

Folds (children first): ``RepMBConv -> Conv2d(3x3, pad 1)`` (exact incl. borders,
because the pad value is the expand bias); block-level ``PConv`` folded into row 0 of
the preceding 3x3 and removed, which leaves exactly the Rep key layout (the folded
state dict loads strictly into the Rep variant of the same name).

Export-safe rewrites: ``SoftPool2d -> safe_ops.WindowSoftPool2d`` (separable online-softmax
window pooling -- a 1x7 row pass and a 7x1 column pass, every exponent <= 0 -- overflow-free
in fp16/fp32, exact); in-place prefix writes -> ``cat``.  The deploy form exports with
symbolic H, W.  Note: ``torch.export`` guards on intermediate sizes that *could* be 1, and
LIA's pooled maps are 1 px for H < 10 (SoftPool) / H < 13 (after the stride-2 conv), so the
size rule carries ``dynamic_min_size=13``: a dynamic ONNX export is traced with
``Dim(min=13)``; the resulting graph is generic and matches eager at 7..12 px too (tested).
Cost of the safe SoftPool (16 ch at 256x256, 1 thread, interleaved min): 17.4 ms onnxruntime,
43 ms LiteRT, 40-50 ms eager, against 26 / 50 / 61 ms for the former 49-tap window softmax
and 3.3 / 3.5 / 9.5 ms for the official (overflowing) form; ~49 MACs per input px and channel
(the 49-tap form: ~267; PlainUSR x4 at 256x256: 18.89 instead of 20.11 GMACs).

Assumptions (not stated in the specs, taken from the official training code):
ASR hidden width ``2n // 4``, ``se`` is ``[mean, Linear, SiLU, Linear, Sigmoid, reshape]``
(parameters at indices 1 and 3); ``pad`` value is ``expand_conv.bias``; train-form
initialisation follows the official ``init_weights`` (``se.tensor = 0.1``, ASR weights 1,
PConv ``1/n`` with zero bias, identity paths added to head/tail).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..reparam.rules import conv_from_kernel, register_fold, register_rewrite
from ..reparam.safe_ops import WindowSoftPool2d
from .registry import Misfit, ModelSpec, SizeRule, StateDict, Variant, register

LRELU_SLOPE = 0.05

# --- train-time building blocks --------------------------------------------------------


class _SqueezeHW(nn.Module):
    """``b c 1 1 -> b c`` (the official einops ``Reduce(..., 'mean')`` over 1x1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class _UnsqueezeHW(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, None, None]


class ASR(nn.Module):
    """Attention from a learned constant: ``a = sigmoid(L2 SiLU(L1 t))`` (input-independent)."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = channels // 4
        self.tensor = nn.Parameter(0.1 * torch.ones(1, channels, 1, 1))
        self.se = nn.Sequential(
            _SqueezeHW(),
            nn.Linear(channels, hidden, bias=False),
            nn.SiLU(),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
            _UnsqueezeHW(),
        )
        with torch.no_grad():
            self.se[1].weight.fill_(1.0)
            self.se[3].weight.fill_(1.0)

    def scale(self) -> torch.Tensor:
        """The per-channel scale, shape (1, C, 1, 1)."""
        return self.se(self.tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale() * x


def _pad_with(t: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Pad H and W by 1 with a per-channel constant (no in-place writes)."""
    n, c, h, w = t.shape
    v = value.view(1, c, 1, 1).to(t.dtype)
    row = v.expand(n, c, 1, w)
    t = torch.cat([row, t, row], 2)
    col = v.expand(n, c, h + 2, 1)
    return torch.cat([col, t, col], 3)


class RepMBConv(nn.Module):
    """Re-parameterisable inverted bottleneck (official ``MBConv``, ratio 2)."""

    def __init__(self, n_feat: int, ratio: int = 2):
        super().__init__()
        i_feat = n_feat * ratio
        self.expand_conv = nn.Conv2d(n_feat, i_feat, 1)
        self.fea_conv = nn.Conv2d(i_feat, i_feat, 3, padding=0)
        self.reduce_conv = nn.Conv2d(i_feat, n_feat, 1)
        self.se = ASR(i_feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.expand_conv(x)
        u = self.fea_conv(_pad_with(e, self.expand_conv.bias))
        v = self.se(u) + e
        return self.reduce_conv(v) + x

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """3x3 kernel and bias of the whole module (identities included), computed in fp64."""
        dt = self.fea_conv.weight.dtype
        k0 = self.expand_conv.weight.double()[:, :, 0, 0]  # (2n, n)
        c0 = self.expand_conv.bias.double()
        k1 = self.fea_conv.weight.double()  # (2n, 2n, 3, 3)
        c1 = self.fea_conv.bias.double()
        k2 = self.reduce_conv.weight.double()[:, :, 0, 0]  # (n, 2n)
        c2 = self.reduce_conv.bias.double()
        a = self.se.scale().double().view(-1)
        m, n = k0.shape[0], k0.shape[1]
        delta = torch.zeros(3, 3, dtype=torch.float64, device=k1.device)
        delta[1, 1] = 1.0
        eye_m = torch.eye(m, dtype=torch.float64, device=k1.device)
        k1p = a.view(-1, 1, 1, 1) * k1 + eye_m[:, :, None, None] * delta
        c1p = a * c1
        w = torch.einsum("om,mkij->okij", k2, k1p)
        w = torch.einsum("okij,kc->ocij", w, k0)
        w = w + torch.eye(n, dtype=torch.float64, device=k1.device)[:, :, None, None] * delta
        b = k2 @ (k1p.sum((2, 3)) @ c0 + c1p) + c2
        return w.to(dt).contiguous(), b.to(dt)


@register_fold(RepMBConv)
def _fold_repmbconv(m: RepMBConv) -> nn.Module:
    return conv_from_kernel(*m.folded(), padding=1)


class PConv(nn.Module):
    """Replace channel 0 by a 1x1 mix of all channels: ``x0' = p . x + q``."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.conv = nn.Conv2d(n_feat, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(1.0 / n_feat)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), x[:, 1:]], 1)


# --- attention ---------------------------------------------------------------------------


class SoftPool2d(nn.Module):
    """Official SoftPool: ``AvgPool(e^x x) / AvgPool(e^x)`` (overflows for x > ~88 in fp32)."""

    def __init__(self, kernel_size: int = 7, stride: int = 3, channels: int | None = None):
        super().__init__()
        self.channels = channels  # not used by the math; sizes the export-safe form's kernels
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.exp(x)
        den = F.avg_pool2d(e, self.kernel_size, self.stride, 0, count_include_pad=False)
        num = F.avg_pool2d(e * x, self.kernel_size, self.stride, 0, count_include_pad=False)
        return num / den


@register_rewrite(SoftPool2d)
def _safe_softpool(m: SoftPool2d, target: str) -> nn.Module:
    if m.channels is None:
        raise ValueError("SoftPool2d needs `channels` for its export-safe form")
    return WindowSoftPool2d(m.channels, m.kernel_size, m.stride)


class LocalAttention(nn.Module):
    """LIA: local importance from a SoftPooled, strided branch, bilinearly resized back."""

    def __init__(self, channels: int, f: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, f, 1),
            SoftPool2d(7, 3, channels=f),
            nn.Conv2d(f, f, 3, stride=2, padding=1),
            nn.Conv2d(f, channels, 3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(x[:, :1])
        w = F.interpolate(self.body(x), (x.shape[2], x.shape[3]), mode="bilinear", align_corners=False)
        return x * w * g


class LocalAttentionSpeed(nn.Module):
    """LIA-Speed (ultra ``blockm``): ``x * sigmoid(x[:, :1]) * sigmoid(conv3x3(x))``."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(x[:, :1])
        return x * g * self.body(x)


# --- blocks ------------------------------------------------------------------------------


class PlainBlock(nn.Module):
    """``body(x)`` -- the official Blockv1..v4 in either form (content differs, keys align)."""

    def __init__(self, body: list[nn.Module]):
        super().__init__()
        self.body = nn.Sequential(*body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _block(kind: str, n: int, f: int, train: bool) -> PlainBlock:
    """kind: v1 (2 convs), v2 (2 convs + LIA), v3 (2 convs + LIA-Speed), v4 (3 convs + LIA)."""
    n_convs = 3 if kind == "v4" else 2
    body: list[nn.Module] = []
    for i in range(n_convs):
        if i:
            body.append(nn.LeakyReLU(LRELU_SLOPE))
        body.append(RepMBConv(n) if train else nn.Conv2d(n, n, 3, padding=1))
    if kind == "v1":
        return PlainBlock(body)
    if train:
        body.append(PConv(n))
    body.append(LocalAttentionSpeed(n) if kind == "v3" else LocalAttention(n, f))
    return PlainBlock(body)


@register_fold(PlainBlock)
def _fold_pconv(block: PlainBlock) -> nn.Module:
    """Fold each PConv into row 0 of the preceding (already folded) 3x3 conv and drop it."""
    mods = list(block.body)
    if not any(isinstance(m, PConv) for m in mods):
        return block
    out: list[nn.Module] = []
    for m in mods:
        if not isinstance(m, PConv):
            out.append(m)
            continue
        prev = out[-1] if out else None
        if not isinstance(prev, nn.Conv2d):
            raise TypeError("PConv fold needs a plain Conv2d before it (fold RepMBConv first)")
        dt = prev.weight.dtype
        p = m.conv.weight.double()[0, :, 0, 0]  # (C,)
        q = m.conv.bias.double()[0]
        w = prev.weight.detach().double().clone()
        b = prev.bias.detach().double().clone()
        w0 = torch.einsum("c,cdij->dij", p, w)
        b0 = p @ b + q
        w[0] = w0
        b[0] = b0
        with torch.no_grad():
            prev.weight.copy_(w.to(dt))
            prev.bias.copy_(b.to(dt))
    block.body = nn.Sequential(*out)
    return block


# --- network -----------------------------------------------------------------------------

_LAYOUTS = {
    # kind: (block names in registration order, block kinds, forward order as (name, im_feat index))
    "ultra": (("block1", "blockm", "block2"), ("v1", "v3", "v1"),
              (("block1", 0), ("blockm", 1), ("block2", 0))),
    "general": (("block1", "block2", "blockm", "block3", "block4"), ("v2",) * 5,
                (("block1", 0), ("block2", 1), ("blockm", 2), ("block3", 1), ("block4", 0))),
    "large": (("block1", "block2", "blockm", "block3", "block4"), ("v4",) * 5,
              (("block1", 0), ("block2", 1), ("blockm", 2), ("block3", 1), ("block4", 0))),
}


class PlainUSR(nn.Module):
    def __init__(self, kind: str, n_feat: int, im_feat: tuple[int, ...], attn_feat: int,
                 scale: int = 4, train_form: bool = False):
        super().__init__()
        names, kinds, order = _LAYOUTS[kind]
        self.kind = kind
        self.im_feat = tuple(im_feat)
        self.scale = scale
        self.order = tuple((name, self.im_feat[i]) for name, i in order)
        self.slice_write = "inplace"  # "cat" in the export-safe form
        self.head = nn.Conv2d(3, n_feat + 3, 3, padding=1)
        widths = {name: self.im_feat[i] for name, i in order}
        for name, k in zip(names, kinds):
            self.add_module(name, _block(k, widths[name], attn_feat, train_form))
        self.tail = nn.Sequential(nn.Conv2d(n_feat + 3, 3 * scale**2, 3, padding=1), nn.PixelShuffle(scale))
        self._init_identity_paths()

    @torch.no_grad()
    def _init_identity_paths(self) -> None:
        # Official init_weights: head channels n..n+2 copy RGB, tail maps them to nearest-upsampled RGB.
        s2 = self.scale**2
        for k in range(3):
            self.head.weight[-3 + k, k, 1, 1] += 1
            self.tail[0].weight[k * s2:(k + 1) * s2, -3 + k, 1, 1] += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(x)
        inplace = self.slice_write == "inplace" and not (torch.is_grad_enabled() and x.requires_grad)
        for name, c in self.order:
            block = getattr(self, name)
            if inplace:
                x[:, :c] = block(x[:, :c])
            else:
                x = torch.cat([block(x[:, :c]), x[:, c:]], 1)
        return self.tail(x)


@register_rewrite(PlainUSR)
def _cat_instead_of_slice_write(m: PlainUSR, target: str) -> nn.Module:
    m.slice_write = "cat"
    return m


# --- spec --------------------------------------------------------------------------------

_BASE_VARIANTS = (
    # name, kind, n, im_feat, attn f, description
    # The ultra models' LIA-Speed has no ``f`` (official attn_feat 1 / 4, unused): None here,
    # so a config read from shapes equals the variant's.
    ("u", "ultra", 16, (16, 8), None, "PlainUSR-U (ultra, LIA-Speed)"),
    ("t", "ultra", 32, (32, 16), None, "PlainUSR-T (ultra, LIA-Speed)"),
    ("s", "general", 32, (32, 16, 8), 4, "PlainUSR-S"),
    ("m", "general", 48, (48, 32, 16), 8, "PlainUSR-M"),
    ("base", "general", 64, (64, 48, 32), 16, "PlainUSR"),
    ("l", "large", 80, (80, 64, 48), 16, "PlainUSR-L (3 convs per block)"),
)


def _config(kind: str, n: int, im: tuple[int, ...], f: int | None, train: bool) -> dict[str, Any]:
    return {"kind": kind, "n_feat": n, "im_feat": tuple(im), "attn_feat": f, "train_form": train,
            # The spec-level size rule is the strictest (LIA: SoftPool 7x7); ultra needs 1.
            "min_size": 1 if kind == "ultra" else 7}


def _variants() -> tuple[Variant, ...]:
    out = []
    for train in (False, True):
        for name, kind, n, im, f, desc in _BASE_VARIANTS:
            cfg = _config(kind, n, im, f, train)
            label = f"{desc}, {'train-time (RepMBConv/ASR/PConv)' if train else 'Rep (released *_Rep_* layout)'}"
            out.append(Variant(f"{name}-train" if train else name, cfg, (2, 4), 4, label))
    return tuple(out)


VARIANTS = _variants()


def _build(config: Mapping[str, Any], scale: int) -> nn.Module:
    return PlainUSR(config["kind"], config["n_feat"], config["im_feat"], config["attn_feat"],
                    scale, config["train_form"])


def _conv_shape(sd: StateDict, key: str) -> tuple[int, ...]:
    t = sd.get(key)
    if not isinstance(t, torch.Tensor) or t.ndim != 4:
        raise Misfit(f"{key} is missing or not a conv weight")
    return tuple(int(d) for d in t.shape)


def _block_width(sd: StateDict, block: str, train: bool) -> int:
    """The channel prefix a block works on, from its first 3x3 conv (or RepMBConv's expand)."""
    if train:
        return _conv_shape(sd, f"{block}.body.0.expand_conv.weight")[1]
    return _conv_shape(sd, f"{block}.body.0.weight")[0]


def _lia_index(kind: str, train: bool) -> int:
    # body: conv [LReLU conv]* [PConv] attention -> the attention's index
    n_convs = 3 if kind == "large" else 2
    return 2 * n_convs - 1 + (1 if train else 0)


def _read_config(sd: StateDict) -> tuple[dict[str, Any], int] | None:
    if "head.weight" not in sd or "tail.0.weight" not in sd:
        return None
    if "block1.body.0.expand_conv.weight" in sd:
        train = True
    elif "block1.body.0.weight" in sd:
        train = False
    else:
        return None
    head, tail = _conv_shape(sd, "head.weight"), _conv_shape(sd, "tail.0.weight")
    if head[1:] != (3, 3, 3) or head[0] <= 3:
        raise Misfit(f"head.weight has shape {head}, expected (n_feat + 3, 3, 3, 3)")
    n = head[0] - 3
    out = tail[0]
    scale = math.isqrt(out // 3) if out % 3 == 0 else 0
    if scale < 1 or 3 * scale * scale != out or tail[1:] != (n + 3, 3, 3):
        raise Misfit(f"tail.0.weight has shape {tail}, expected (3 x scale^2, {n + 3}, 3, 3)")
    conv = (lambda b, i: f"{b}.body.{i}.expand_conv.weight") if train else (lambda b, i: f"{b}.body.{i}.weight")
    if "block3.body.0.weight" in sd or "block3.body.0.expand_conv.weight" in sd:
        kind = "large" if conv("block1", 4) in sd else "general"
    else:
        kind = "ultra"
    names, _, order = _LAYOUTS[kind]
    widths: dict[int, int] = {}
    for name, level in order:  # blocks sharing a level must work on the same prefix
        w = _block_width(sd, name, train)
        if widths.setdefault(level, w) != w:
            raise Misfit(f"{conv(name, 0)} works on {w} channels, but its level needs {widths[level]}")
        if w > n + 3:
            raise Misfit(f"{conv(name, 0)} works on {w} channels, more than head's {n + 3}")
    im = tuple(widths[i] for i in range(len(widths)))
    f = None
    if kind != "ultra":
        key = f"block1.body.{_lia_index(kind, train)}.body.0.weight"
        f = _conv_shape(sd, key)[0]
    return _config(kind, n, im, f, train), scale


def _custom_label(config: Mapping[str, Any]) -> str:
    parts = [config["kind"], f"n{config['n_feat']}", "im" + "-".join(map(str, config["im_feat"]))]
    if config["attn_feat"] is not None:
        parts.append(f"f{config['attn_feat']}")
    if config["train_form"]:
        parts.append("train")
    return "-".join(parts)


def _tiling_inexact(config: Mapping[str, Any]) -> str | None:
    """LIA (general/large kinds) resizes its pooled map back to *its input's* size by a
    non-integer factor, so a tile's sampling grid depends on the tile's size and position;
    the ultra kinds' LIA-Speed is a plain 3x3 conv gate, shift-equivariant."""
    if config["kind"] == "ultra":
        return None
    return ("LIA pools with stride 6 and resizes bilinearly back to its input's size, so the sampling grid "
            "depends on the tile's size and position")


SPEC = register(
    ModelSpec(
        name="plainusr",
        description="PlainUSR (ACCV'24): Rep inference form (released checkpoints) and train-time form",
        variants=VARIANTS,
        default_variant="base",
        build_fn=_build,
        read_config=_read_config,
        custom_label=_custom_label,
        input_range=1.0,
        # LIA's SoftPool needs a 7x7 window; the ultra variants (no LIA) would accept 1px, but
        # the spec carries one rule for all variants (per-variant minimum in Variant.config).
        # dynamic ONNX: torch.export guards on the pooled LIA maps being 1 px (H < 13)
        size_rule=SizeRule(min_size=7, dynamic_min_size=13),
        # None: LIA's strided SoftPool + bilinear upsampling reach ~70+ px and shift with the
        # pooling grid (tiles differ ~1e-3 from the whole image whatever the overlap).
        receptive_field=None,
        tiling_inexact=_tiling_inexact,
        dynamic_shapes=True,
        signature_keys=("head.weight", "block1.body.0.weight", "tail.0.weight"),
    )
)
