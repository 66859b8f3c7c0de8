"""SPAN: Swift Parameter-free Attention Network (Wan et al., NTIRE 2023/2024 winner).

Train-time form with the official state-dict layout (``hongyuanyu/SPAN``,
``basicsr/archs/span_arch.py``) and the NTIRE 2024 deploy-only ``SPAN30`` (ch28) form.

Official semantics reproduced here, quirks included:

- The input (RGB in [0, 1]) is normalised inside forward: ``(x - mean) * 255`` with
  ``mean = (0.4488, 0.4371, 0.4040)``.  ``mean`` is a plain tensor in the official code,
  so it is a *non-persistent* buffer here (not in the state dict).  There is no
  de-normalisation and no clamp at the output.
- ``conv_cat`` sees ``cat[f0, conv_2(f6), f1, h6]``.  ``h6`` is what block 6 returns as its
  second output.  The official SPAB applies ``nn.SiLU(inplace=True)`` to ``out1`` *after*
  keeping a reference to it, so the returned tensor is **post-SiLU** ``SiLU(c1_r(x))``
  (not the pre-activation the architecture figure suggests).  We return exactly that.
- SPAB's second activation (``LeakyReLU(0.1)``) is unused and has no parameters: dropped.
- ``Conv3XC`` training path: zero-pad x by 1 *before* the first 1x1 conv, then
  1x1 -> 3x3 (padding 0) -> 1x1, plus the ``sk`` 1x1 on the unpadded x.
- ``Conv3XC`` eval path: the official code recomputes ``eval_conv`` from ``sk``/``conv``
  on every forward and writes it into ``.data``.  We compute the same folded kernel
  *functionally* (no mutation; fp64 fold, cast to the parameter dtype) and convolve with
  it, so eval output equals the official eval output at rounding level and the folded
  deploy module is bit-identical to our eval forward.  Stored ``eval_conv`` values are
  ignored by the training form (they may be stale, or an EMA of folds); ``after_load``
  re-folds them so a saved state dict is self-consistent.
- Deploy-only form (``ch28``, NTIRE24 team38): ``Conv3XC`` holds only ``eval_conv`` and
  always uses it; the stored values are authoritative.
- ``norm=False`` (spandrel's ``no_norm``: the key is in the state dict) skips the
  ``(x - mean) * 255`` normalisation, as spandrel's SPAN does.
- Every hyperparameter is read off the shapes (``_read_config``): feature width, scale,
  norm flag, deploy-only form, and a per-Conv3XC width table (in, out, inner widths) for
  pruned checkpoints, checked against the forward's data flow (block residuals, the
  ``conv_cat`` concatenation, the RGB pixel shuffle).  Non-RGB in/out is refused.

Folds: ``Conv3XC -> nn.Conv2d(3x3, padding=1)``, exact including borders (the padded
border pixels of the train path equal ``b1``, which is what the folded bias accounts
for).  Rejected: folding ``(x - mean) * 255`` into ``conv_1`` -- inexact at the 1-px
border (zero padding of the normalised input is padding the raw input with ``mean``),
so the deploy form keeps an explicit Sub and Mul.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..reparam.rules import conv_from_kernel, register_fold
from .registry import Misfit, ModelSpec, SizeRule, StateDict, Variant, register

RGB_MEAN = (0.4488, 0.4371, 0.4040)
IMG_RANGE = 255.0
N_BLOCKS = 6


def conv3xc_fold(
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
    w3: torch.Tensor, b3: torch.Tensor, ws: torch.Tensor, bs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of ``1x1 -> 3x3 valid -> 1x1`` on a zero-padded input, plus a 1x1 skip.

    ``K[o,c,i,j] = sum_{m,n} W3[o,m] W2[m,n,i,j] W1[n,c] + Ws[o,c] [i=j=1]`` and
    ``B = W3 (sum_{n,i,j} W2[:,n,i,j] b1[n] + b2) + b3 + bs``.  Computed in float64,
    returned in the dtype of ``w2``.  Differentiable (no in-place writes).
    """
    dt = w2.dtype
    w1, b1, w2, b2, w3, b3, ws, bs = (t.double() for t in (w1, b1, w2, b2, w3, b3, ws, bs))
    m2, m1 = w2.shape[0], w2.shape[1]
    co, ci = w3.shape[0], w1.shape[1]
    a1 = w1.reshape(m1, ci)
    a3 = w3.reshape(co, m2)
    k = (a3 @ w2.reshape(m2, m1 * 9)).view(co, m1, 9)  # W3 . W2
    k = (k.transpose(1, 2) @ a1).transpose(1, 2).reshape(co, ci, 3, 3)  # ... . W1
    k = k + F.pad(ws, (1, 1, 1, 1))
    b = a3 @ (w2.sum((2, 3)) @ b1 + b2) + b3 + bs
    return k.to(dt).contiguous(), b.to(dt)


class Conv3XC(nn.Module):
    """SPAN's re-parameterisable 3x3 conv.

    ``gain1`` is the official expansion of the inner convs (``c_in*gain1``, ``c_out*gain1``);
    ``inner`` overrides those two widths (pruned checkpoints narrow them independently).
    """

    def __init__(self, c_in: int, c_out: int, gain1: int = 2, deploy_only: bool = False,
                 inner: tuple[int, int] | None = None):
        super().__init__()
        self.deploy_only = deploy_only
        if not deploy_only:
            m1, m2 = inner or (c_in * gain1, c_out * gain1)
            self.sk = nn.Conv2d(c_in, c_out, 1)
            self.conv = nn.Sequential(
                nn.Conv2d(c_in, m1, 1),
                nn.Conv2d(m1, m2, 3, padding=0),
                nn.Conv2d(m2, c_out, 1),
            )
        self.eval_conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.eval_conv.weight.requires_grad_(False)
        self.eval_conv.bias.requires_grad_(False)
        if not deploy_only:
            self.refold_()

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The 3x3 kernel and bias equivalent to the training branches (no mutation)."""
        if self.deploy_only:
            return self.eval_conv.weight, self.eval_conv.bias
        c0, c1, c2 = self.conv
        return conv3xc_fold(c0.weight, c0.bias, c1.weight, c1.bias, c2.weight, c2.bias,
                            self.sk.weight, self.sk.bias)

    @torch.no_grad()
    def refold_(self) -> None:
        """Write the fold of ``sk``/``conv`` into ``eval_conv`` (what official eval does)."""
        if self.deploy_only:
            return
        w, b = self.folded()
        self.eval_conv.weight.copy_(w)
        self.eval_conv.bias.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy_only:
            return self.eval_conv(x)
        if self.training:
            return self.conv(F.pad(x, (1, 1, 1, 1))) + self.sk(x)
        w, b = self.folded()
        return F.conv2d(x, w, b, padding=1)


@register_fold(Conv3XC)
def _fold_conv3xc(m: Conv3XC) -> nn.Module:
    return conv_from_kernel(*m.folded(), padding=1)


class SPAB(nn.Module):
    """Swift parameter-free attention block; returns ``(out, SiLU(c1_r(x)), attention)``."""

    def __init__(self, channels: int, deploy_only: bool = False, layers: Mapping[str, Any] | None = None):
        super().__init__()
        # layers: this block's Conv3XC widths (see ``uniform_widths``); None = all ``channels``
        layers = layers or {}
        for name in ("c1_r", "c2_r", "c3_r"):
            self.add_module(name, _conv3xc(layers.get(name), channels, deploy_only))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Official: out1 = c1_r(x); SiLU(inplace=True)(out1) -- out1 itself becomes post-SiLU.
        out1 = F.silu(self.c1_r(x))
        out2 = F.silu(self.c2_r(out1))
        out3 = self.c3_r(out2)
        att = torch.sigmoid(out3) - 0.5
        return (out3 + x) * att, out1, att


def _conv3xc(widths: list[int] | None, channels: int, deploy_only: bool) -> Conv3XC:
    """A Conv3XC from its width entry ``[c_in, c_out(, inner_in, inner_out)]`` (None: channels->channels)."""
    if widths is None:
        return Conv3XC(channels, channels, 2, deploy_only)
    inner = None if deploy_only else (widths[2], widths[3])
    return Conv3XC(widths[0], widths[1], 2, deploy_only, inner)


CONV3XC_PATHS = ("conv_1", *(f"block_{i}.c{j}_r" for i in range(1, N_BLOCKS + 1) for j in (1, 2, 3)), "conv_2")


def uniform_widths(channels: int, deploy_only: bool, in_ch: int = 3) -> dict[str, list[int]]:
    """The width table of an unpruned SPAN: ``path -> [c_in, c_out(, c_in*2, c_out*2)]``, plus conv_cat."""
    table = {}
    for path in CONV3XC_PATHS:
        c_in = in_ch if path == "conv_1" else channels
        table[path] = [c_in, channels] if deploy_only else [c_in, channels, 2 * c_in, 2 * channels]
    table["conv_cat"] = [4 * channels, channels]
    return table


class SPAN(nn.Module):
    """SPAN; ``norm=False`` is spandrel's ``no_norm`` model (no mean shift / x255 in forward).

    ``widths`` (see :func:`uniform_widths`) gives every Conv3XC its own in/out/inner widths
    (pruned checkpoints); ``None`` is the official uniform ``feature_channels`` network.
    """

    def __init__(self, feature_channels: int = 48, upscale: int = 4, deploy_only: bool = False,
                 num_in_ch: int = 3, num_out_ch: int = 3, norm: bool = True,
                 widths: Mapping[str, list[int]] | None = None):
        super().__init__()
        c = feature_channels
        table = dict(widths) if widths else uniform_widths(c, deploy_only, num_in_ch)
        self.upscale = upscale
        self.img_range = IMG_RANGE
        self.norm = norm
        # Not in the official state dict: a plain tensor there, a non-persistent buffer here.
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        if not norm:
            # spandrel's marker for models trained without normalisation (kept in the state dict)
            self.register_buffer("no_norm", torch.zeros(1))
        self.conv_1 = _conv3xc(table["conv_1"], c, deploy_only)
        for i in range(1, N_BLOCKS + 1):
            layers = {n: table[f"block_{i}.{n}"] for n in ("c1_r", "c2_r", "c3_r")}
            self.add_module(f"block_{i}", SPAB(c, deploy_only, layers))
        cat_in, cat_out = table["conv_cat"]
        self.conv_cat = nn.Conv2d(cat_in, cat_out, 1)
        self.conv_2 = _conv3xc(table["conv_2"], c, deploy_only)
        self.upsampler = nn.Sequential(nn.Conv2d(cat_out, num_out_ch * upscale**2, 3, padding=1),
                                       nn.PixelShuffle(upscale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm:
            x = (x - self.mean) * self.img_range
        f0 = self.conv_1(x)
        f, h, _ = self.block_1(f0)
        f1 = f
        for i in range(2, N_BLOCKS + 1):
            f, h, _ = getattr(self, f"block_{i}")(f)
        z = self.conv_cat(torch.cat([f0, self.conv_2(f), f1, h], 1))
        return self.upsampler(z)


# --- spec ------------------------------------------------------------------------------

_SCALES = (2, 3, 4)


def _config(channels: int, deploy_only: bool, norm: bool = True, widths=None) -> dict[str, Any]:
    return {"feature_channels": channels, "deploy_only": deploy_only, "norm": norm, "widths": widths}


VARIANTS = (
    Variant("ch48", _config(48, False), _SCALES, 4, "SPAN-S: 48 channels (spanx2_ch48 / spanx4_ch48)"),
    Variant("ch52", _config(52, False), _SCALES, 4, "SPAN: 52 channels (spanx4_ch52)"),
    Variant("ch28", _config(28, True), (4,), 4,
            "NTIRE 2024 entry (SPAN30, team38): 28 channels, deploy-only checkpoint"),
    Variant("ch48-deploy", _config(48, True), _SCALES, 4, "ch48 folded by `edgesr reparam` (eval_conv weights only)"),
    Variant("ch52-deploy", _config(52, True), _SCALES, 4, "ch52 folded by `edgesr reparam` (eval_conv weights only)"),
)

# A folded Conv3XC is a plain conv at the Conv3XC's path; the deploy-only layout keeps it
# under ``<path>.eval_conv`` (what the official eval forward and SPAN30 checkpoints use).
_FOLDED_CONV3XC_KEY = re.compile(r"^(conv_1|conv_2|block_\d+\.c[123]_r)\.(weight|bias)$")


def _deploy_checkpoint(sd: StateDict) -> StateDict:
    return {_FOLDED_CONV3XC_KEY.sub(r"\1.eval_conv.\2", k): v for k, v in sd.items()}


def _build(config: Mapping[str, Any], scale: int) -> nn.Module:
    return SPAN(config["feature_channels"], scale, config["deploy_only"],
                norm=config.get("norm", True), widths=config.get("widths"))


def _custom_label(config: Mapping[str, Any]) -> str:
    parts = [f"ch{config['feature_channels']}"]
    if config.get("widths"):
        parts.append("pruned")
    if config["deploy_only"]:
        parts.append("deploy")
    if not config.get("norm", True):
        parts.append("nonorm")
    return "-".join(parts)


# --- reading the config off shapes -------------------------------------------------------


def _shape(sd: StateDict, key: str, ndim: int) -> tuple[int, ...]:
    t = sd.get(key)
    if not isinstance(t, torch.Tensor):
        raise Misfit(f"{key} is missing")
    if t.ndim != ndim:
        raise Misfit(f"{key} has shape {tuple(t.shape)}, expected {ndim} dims")
    return tuple(int(d) for d in t.shape)


def _expect(key: str, shape: tuple[int, ...], want: tuple[int, ...]) -> None:
    if shape != want:
        raise Misfit(f"{key} has shape {shape}, expected {want}")


def _conv3xc_widths(sd: StateDict, path: str, deploy_only: bool) -> list[int]:
    """``[c_in, c_out(, inner_in, inner_out)]`` of one Conv3XC, its own shapes checked against each other."""
    ev = _shape(sd, f"{path}.eval_conv.weight", 4)
    c_out, c_in = ev[0], ev[1]
    _expect(f"{path}.eval_conv.weight", ev, (c_out, c_in, 3, 3))
    _expect(f"{path}.eval_conv.bias", _shape(sd, f"{path}.eval_conv.bias", 1), (c_out,))
    if deploy_only:
        return [c_in, c_out]
    m1 = _shape(sd, f"{path}.conv.0.weight", 4)[0]
    m2 = _shape(sd, f"{path}.conv.1.weight", 4)[0]
    for key, want in ((f"{path}.sk.weight", (c_out, c_in, 1, 1)), (f"{path}.conv.0.weight", (m1, c_in, 1, 1)),
                      (f"{path}.conv.1.weight", (m2, m1, 3, 3)), (f"{path}.conv.2.weight", (c_out, m2, 1, 1))):
        _expect(key, _shape(sd, key, 4), want)
    return [c_in, c_out, m1, m2]


def _check_chain(table: dict[str, list[int]]) -> None:
    """Every Conv3XC must take what the previous one gives (the forward's data flow)."""
    c = table["conv_1"][1]

    def takes(path: str, idx: int, want: int, what: str) -> None:
        if table[path][idx] != want:
            side = "input" if idx == 0 else "output"
            raise Misfit(f"{path}.eval_conv.weight has {table[path][idx]} {side} channels, "
                         f"but {what} needs {want}")

    for i in range(1, N_BLOCKS + 1):
        b = f"block_{i}"
        takes(f"{b}.c1_r", 0, c, "the feature width")
        takes(f"{b}.c2_r", 0, table[f"{b}.c1_r"][1], f"{b}.c1_r's output")
        takes(f"{b}.c3_r", 0, table[f"{b}.c2_r"][1], f"{b}.c2_r's output")
        takes(f"{b}.c3_r", 1, c, "the block's residual")
    takes("conv_2", 0, c, "the feature width")


def _read_config(sd: StateDict) -> tuple[dict[str, Any], int] | None:
    if not all(k in sd for k in _SIGNATURE):
        return None
    deploy_only = "conv_1.sk.weight" not in sd
    if deploy_only and any(k.endswith(".sk.weight") for k in sd if isinstance(k, str)):
        raise Misfit("some Conv3XC have training branches (sk/conv) and some do not; "
                     "conv_1.sk.weight is missing")
    table = {p: _conv3xc_widths(sd, p, deploy_only) for p in CONV3XC_PATHS}
    in_ch, c = table["conv_1"][:2]
    if in_ch != 3:
        raise Misfit(f"conv_1.eval_conv.weight takes {in_ch} input channels; edgesr models take RGB (3)")
    _check_chain(table)
    cat = _shape(sd, "conv_cat.weight", 4)
    cat_in = c + table["conv_2"][1] + c + table["block_6.c1_r"][1]  # cat[f0, conv_2(f6), f1, h6]
    _expect("conv_cat.weight", cat, (cat[0], cat_in, 1, 1))
    table["conv_cat"] = [cat_in, cat[0]]
    up = _shape(sd, "upsampler.0.weight", 4)
    _expect("upsampler.0.weight", up, (up[0], cat[0], 3, 3))
    scale = math.isqrt(up[0] // 3) if up[0] % 3 == 0 else 0
    if scale < 1 or 3 * scale * scale != up[0]:
        raise Misfit(f"upsampler.0.weight has {up[0]} output channels: not 3 x scale^2 (RGB pixel shuffle)")
    uniform = uniform_widths(c, deploy_only) == table
    return _config(c, deploy_only, "no_norm" not in sd, None if uniform else table), scale


_SIGNATURE = ("conv_1.eval_conv.weight", "block_1.c1_r.eval_conv.weight", "conv_cat.weight", "upsampler.0.weight")


def _after_load(model: nn.Module) -> None:
    # Official eval recomputes eval_conv from sk/conv on every forward; stored values may be
    # stale (or, in params_ema, an EMA of folds).  Deploy-only Conv3XC keep theirs.
    for m in model.modules():
        if isinstance(m, Conv3XC):
            m.refold_()


SPEC = register(
    ModelSpec(
        name="span",
        description="SPAN (Swift Parameter-free Attention Network), official BasicSR layout",
        variants=VARIANTS,
        default_variant="ch48",
        build_fn=_build,
        read_config=_read_config,
        custom_label=_custom_label,
        input_range=1.0,
        size_rule=SizeRule(min_size=1),
        dynamic_shapes=True,
        after_load=_after_load,
        signature_keys=_SIGNATURE,
        deploy_checkpoint=_deploy_checkpoint,
        # Pure 3x3 convs: conv_1 + 6 SPABs x 3 (c1_r..c3_r) + conv_2 + upsampler = 21 on the
        # longest path, 1 px each (1x1 conv_cat and the attention are pointwise); measured 21.
        receptive_field=21,
    )
)
