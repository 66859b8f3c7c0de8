"""DarkIR (cidautai/DarkIR, CVPR 2025): low-light restoration + deblurring, scale 1.

Train-time form
    Same module tree, parameter names and forward as the official ``archs/DarkIR.py`` /
    ``arch_model.py`` / ``arch_util.py`` at HEAD (no ``adapter``; 343 tensors for -m incl.
    the ``side_out`` conv that only feeds the side loss).  Quirks kept on purpose:

    - input is zero-padded on the right/bottom to a multiple of 8 and the output is cropped
      back (the pad changes the GAP and FFT statistics, so it is part of the model);
    - ``LayerNorm2d`` is an ``autograd.Function`` (channel LN, biased var, eps 1e-6);
    - EBlock: ``conv1(extra_conv(norm1(x)))`` (depthwise first); DBlock:
      ``extra_conv(conv1(norm1(x)))`` with a *grouped* ``extra_conv`` (groups=c, 2 in/out
      per group, weight ``(2c, 2, 3, 3)``);
    - EBlock's second half is multiplicative: ``y + gamma * (y * FreMLP(norm2(y)))`` where
      FreMLP = ``rfft2`` (backward norm) -> MLP on the magnitude -> polar with the original
      phase -> ``irfft2(s=(H, W))``;
    - ``x = middle_blks_dec(x_light) + x_light``; no clamp at the end (inference.py clamps).

Deploy form (``edgesr.deploy``) -- folds (exact) then export-safe rewrites, see the
comment blocks above the rules at the bottom of this file.  The FFT bases are built per
feature size (lazily, see :class:`SafeFreMLP`), so the deploy form exports with static
shapes only.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..reparam.rules import register_fold, register_rewrite
from ..reparam.safe_ops import ChannelLayerNorm, ChannelNormShift, per_bin_dft, with_magnitude
from .registry import Misfit, ModelSpec, SizeRule, StateDict, Variant, register

ENC_BLOCKS = (1, 2, 3)
DEC_BLOCKS = (3, 1, 1)
MIDDLE_ENC = 2
MIDDLE_DEC = 2
DILATIONS = (1, 4, 9)
LN_EPS = 1e-6


# =====================================================================================
# Train-time form (official keys and forward)
# =====================================================================================


class LayerNormFunction(torch.autograd.Function):
    """Channel LayerNorm as in the official code (NAFNet lineage), with its own backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        ctx.eps = eps
        c = x.size(1)
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        y = (x - mu) / (var + eps).sqrt()
        ctx.save_for_backward(y, var, weight)
        return weight.view(1, c, 1, 1) * y + bias.view(1, c, 1, 1)

    @staticmethod
    def backward(ctx, grad_output):
        y, var, weight = ctx.saved_tensors
        c = grad_output.size(1)
        g = grad_output * weight.view(1, c, 1, 1)
        mean_g = g.mean(dim=1, keepdim=True)
        mean_gy = (g * y).mean(dim=1, keepdim=True)
        gx = (g - y * mean_gy - mean_g) / (var + ctx.eps).sqrt()
        return gx, (grad_output * y).sum(dim=(0, 2, 3)), grad_output.sum(dim=(0, 2, 3)), None


class LayerNorm2d(nn.Module):
    def __init__(self, channels: int, eps: float = LN_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return LayerNormFunction.apply(x, self.weight, self.bias, self.eps)


class SimpleGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return x1 * x2


class FreMLP(nn.Module):
    """rfft2 -> 1x1 MLP on |X| (per bin, mixing channels) -> polar with angle(X) -> irfft2."""

    def __init__(self, nc: int, expand: int = 2):
        super().__init__()
        self.process1 = nn.Sequential(
            nn.Conv2d(nc, expand * nc, 1, 1, 0),
            nn.LeakyReLU(0.1),
            nn.Conv2d(expand * nc, nc, 1, 1, 0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        xf = torch.fft.rfft2(x, norm="backward")
        mag = self.process1(torch.abs(xf))
        pha = torch.angle(xf)
        out = torch.complex(mag * torch.cos(pha), mag * torch.sin(pha))
        return torch.fft.irfft2(out, s=(h, w), norm="backward")


class Branch(nn.Module):
    """One depthwise 3x3 (optionally dilated) conv, wrapped as ``branch.0`` like the official."""

    def __init__(self, c: int, dw_expand: int, dilation: int = 1):
        super().__init__()
        ch = dw_expand * c
        self.branch = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=dilation, stride=1, groups=ch, bias=True, dilation=dilation)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x)


def _sca(c: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1, bias=True))


class EBlock(nn.Module):
    def __init__(self, c: int, dw_expand: int = 2, dilations=(1,), extra_depth_wise: bool = True):
        super().__init__()
        dw = dw_expand * c
        self.extra_conv = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=True) if extra_depth_wise else nn.Identity()
        self.conv1 = nn.Conv2d(c, dw, 1, bias=True)
        self.branches = nn.ModuleList(Branch(c, dw_expand, d) for d in dilations)
        self.sca = _sca(dw // 2)
        self.sg1 = SimpleGate()
        self.conv3 = nn.Conv2d(dw // 2, c, 1, bias=True)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        self.freq = FreMLP(c, expand=2)
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.extra_conv(self.norm1(inp)))
        z = 0
        for branch in self.branches:
            z = z + branch(x)
        z = self.sg1(z)
        x = self.sca(z) * z
        x = self.conv3(x)
        y = inp + self.beta * x
        x = y * self.freq(self.norm2(y))
        return y + x * self.gamma


class DBlock(nn.Module):
    def __init__(self, c: int, dw_expand: int = 2, ffn_expand: int = 2, dilations=DILATIONS,
                 extra_depth_wise: bool = True):
        super().__init__()
        dw = dw_expand * c
        self.conv1 = nn.Conv2d(c, dw, 1, bias=True)
        self.extra_conv = nn.Conv2d(dw, dw, 3, padding=1, groups=c, bias=True) if extra_depth_wise else nn.Identity()
        self.branches = nn.ModuleList(Branch(dw, 1, d) for d in dilations)
        self.sca = _sca(dw // 2)
        self.sg1 = SimpleGate()
        self.sg2 = SimpleGate()
        self.conv3 = nn.Conv2d(dw // 2, c, 1, bias=True)
        ffn = ffn_expand * c
        self.conv4 = nn.Conv2d(c, ffn, 1, bias=True)
        self.conv5 = nn.Conv2d(ffn // 2, c, 1, bias=True)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.extra_conv(self.conv1(self.norm1(inp)))
        z = 0
        for branch in self.branches:
            z = z + branch(x)
        z = self.sg1(z)
        x = self.sca(z) * z
        x = self.conv3(x)
        y = inp + self.beta * x
        x = self.conv5(self.sg2(self.conv4(self.norm2(y))))
        return y + x * self.gamma


class CustomSequential(nn.Module):
    """The official container: a ``ModuleList`` named ``modules_list`` applied in order."""

    def __init__(self, *modules: nn.Module):
        super().__init__()
        self.modules_list = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.modules_list:
            x = m(x)
        return x


class DarkIR(nn.Module):
    def __init__(self, img_channel: int = 3, width: int = 32, middle_blk_num_enc: int = MIDDLE_ENC,
                 middle_blk_num_dec: int = MIDDLE_DEC, enc_blk_nums=ENC_BLOCKS, dec_blk_nums=DEC_BLOCKS,
                 dilations=DILATIONS, extra_depth_wise: bool = True):
        super().__init__()
        self.intro = nn.Conv2d(img_channel, width, 3, padding=1, bias=True)
        self.ending = nn.Conv2d(width, img_channel, 3, padding=1, bias=True)
        self.encoders = nn.ModuleList()
        self.decoders = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.downs = nn.ModuleList()
        chan = width
        for num in enc_blk_nums:
            blocks = [EBlock(chan, extra_depth_wise=extra_depth_wise) for _ in range(num)]
            self.encoders.append(CustomSequential(*blocks))
            self.downs.append(nn.Conv2d(chan, 2 * chan, 2, 2))
            chan *= 2
        self.middle_blks_enc = CustomSequential(
            *[EBlock(chan, extra_depth_wise=extra_depth_wise) for _ in range(middle_blk_num_enc)]
        )
        self.middle_blks_dec = CustomSequential(
            *[DBlock(chan, dilations=dilations, extra_depth_wise=extra_depth_wise) for _ in range(middle_blk_num_dec)]
        )
        for num in dec_blk_nums:
            self.ups.append(nn.Sequential(nn.Conv2d(chan, chan * 2, 1, bias=False), nn.PixelShuffle(2)))
            chan //= 2
            blocks = [DBlock(chan, dilations=dilations, extra_depth_wise=extra_depth_wise) for _ in range(num)]
            self.decoders.append(CustomSequential(*blocks))
        self.padder_size = 2 ** len(self.encoders)
        # Only feeds the side loss; kept so official checkpoints load strictly.  The deploy
        # form drops it (set to None).
        self.side_out = nn.Conv2d(width * 2 ** len(self.encoders), img_channel, 3, padding=1)

    def forward(self, inp: torch.Tensor, side_loss: bool = False):
        h, w = inp.shape[-2:]
        # Zero pad right/bottom to a multiple of 8.  Shapes are static ints here (the deploy
        # form exports with static shapes), so a zero pad emits no op at all.
        ph = (self.padder_size - h % self.padder_size) % self.padder_size
        pw = (self.padder_size - w % self.padder_size) % self.padder_size
        padded = ph > 0 or pw > 0
        if padded:
            inp = F.pad(inp, (0, pw, 0, ph), value=0.0)
        x = self.intro(inp)
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x_light = self.middle_blks_enc(x)
        if side_loss:
            if self.side_out is None:
                raise ValueError("side_out was dropped by the deploy fold; use the train-time model")
            out_side = self.side_out(x_light)
        x = self.middle_blks_dec(x_light) + x_light
        for decoder, up, skip in zip(self.decoders, self.ups, skips[::-1]):
            x = decoder(up(x) + skip)
        x = self.ending(x) + inp
        if padded:
            x = x[:, :, :h, :w]
        return (out_side, x) if side_loss else x


# =====================================================================================
# Deploy forms
# =====================================================================================


class GlobalAvgPool2d(nn.Module):
    """``AdaptiveAvgPool2d(1)`` as a plain mean over H, W (ReduceMean / MEAN)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


class _DFTPair(nn.Module):
    """The per-bin DFT pair (backward norm) of one feature size, dtype and target
    (:func:`~edgesr.reparam.dft_spectral.per_bin_dft`: FreMLP only works per bin)."""

    def __init__(self, h: int, w: int, dtype: torch.dtype, layout: str = "onnx"):
        super().__init__()
        self.rfft, self.irfft = per_bin_dft(h, w, "backward", dtype, layout)


class _DFTCache:
    """Bounded LRU of ``_DFTPair`` s, one per (H, W, dtype, device, layout), stored as *attributes*.

    Attributes rather than a dict on purpose: dynamo snapshots a global dict the first
    time a trace reads it, so entries added later in the same trace (the next encoder
    level's size) would be invisible; attribute reads on a plain object are live.
    """

    capacity = 16  # one input size needs 4 (one per encoder level)

    def __init__(self):
        self._order: list[str] = []

    @staticmethod
    def name(h: int, w: int, dtype: torch.dtype, device: torch.device, layout: str = "onnx") -> str:
        dev = f"{device.type}{'' if device.index is None else device.index}"
        return f"dft_{h}x{w}_{str(dtype).split('.')[-1]}_{dev}_{layout}"


_DFT_CACHE = _DFTCache()


@torch._dynamo.assume_constant_result
def _build_dft(h: int, w: int, dtype: torch.dtype, device: torch.device, layout: str) -> int:
    """Make sure ``_DFT_CACHE`` holds the bases of one size.

    Under dynamo (strict export) this runs eagerly and its result is taken as a constant,
    so the basis computation never enters the graph.  No grad-mode context in here: a
    pre-dispatch (non-strict) export records grad-mode switches into the graph, which
    breaks its later decomposition; the bases need no grad anyway."""
    name = _DFTCache.name(h, w, dtype, device, layout)
    order = _DFT_CACHE._order
    if name in order:
        order.remove(name)
    else:
        while len(order) >= _DFTCache.capacity:
            delattr(_DFT_CACHE, order.pop(0))
        setattr(_DFT_CACHE, name, _DFTPair(h, w, dtype, layout).to(device))
    order.append(name)  # most recently used last
    return 0


def dft_bases(h: int, w: int, dtype: torch.dtype, device: torch.device,
              layout: str = "onnx") -> _DFTPair:
    """The (shared, cached) DFT modules of one feature size, with *real* constant bases.

    ``layout`` is the export target (``edgesr.reparam.dft.LAYOUTS``); it picks the DFT pair (``per_bin_dft``).
    - eager: built once per (H, W, dtype, device, layout) and reused by every FreMLP of that size;
    - strict export (dynamo): built via ``assume_constant_result``;
    - non-strict export (fake tensors + proxy tracing; the ONNX and litert-torch paths):
      built with fake mode and proxy tracing switched off.
    In both export modes the exporter lifts the bases as constant tensors (shared by the
    FreMLPs of one level) instead of recording the cos/sin computation or caching fakes.
    """
    if torch.compiler.is_dynamo_compiling():
        _build_dft(h, w, dtype, device, layout)
    elif torch.compiler.is_compiling():
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

        with unset_fake_temporarily(), disable_proxy_modes_tracing():
            _build_dft(h, w, dtype, device, layout)
    elif torch.is_inference_mode_enabled():  # inference tensors would be unusable later
        with torch.inference_mode(False):
            _build_dft(h, w, dtype, device, layout)
    else:
        _build_dft(h, w, dtype, device, layout)
    return getattr(_DFT_CACHE, _DFTCache.name(h, w, dtype, device, layout))


class SafeFreMLP(nn.Module):
    """FreMLP with a real matmul DFT (backward norm) and the phase as a unit vector.

    ``X = rfft2(x)`` -> ``(re, im)`` (bins in the pair's own order, see ``per_bin_dft``);
    ``|X| = sqrt(re^2 + im^2)``; MLP on ``|X|``; ``irfft2(mag' cos, mag' sin)`` with the
    phase as the unit vector of :func:`unit_phase` (``cos = re/|X|``, ``sin = im/|X|``; no
    atan2/cos/sin; exactly-zero bins get phase 0, which is what torch gives for
    ``+0 + 0i`` -- zero bins are undefined for parity), computed by :func:`with_magnitude`.
    Exact vs the torch.fft original (fp64 rounding level); no complex tensors.

    The bases depend on the feature size (H, W), known only at call time; they come from
    :func:`dft_bases` (a bounded module-level cache keyed by (H, W, dtype, device, layout)), so the
    module itself holds no size-dependent state, needs no preparation before export, and
    an exported graph holds only matmuls against constant bases (no trig/arange ops).
    """

    def __init__(self, process1: nn.Sequential, layout: str = "onnx"):
        super().__init__()
        self.process1 = process1
        self.layout = layout  # DFT pair, = the export target (edgesr.reparam.dft_spectral.per_bin_dft)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pair = dft_bases(int(x.shape[-2]), int(x.shape[-1]), x.dtype, x.device, self.layout)
        re, im = pair.rfft(x)
        mag = torch.sqrt(re * re + im * im)
        return pair.irfft(*with_magnitude(re, im, mag, self.process1(mag)))


class EBlockDeploy(nn.Module):
    """EBlock after the folds: beta in conv3, gamma in ``freq.process1.2``; GAP as a mean.

    ``norm1`` is either the affine LayerNorm (unchanged) or, when every gamma of norm1 is
    nonzero, a :class:`ChannelNormShift` with its scale folded into ``extra_conv``.
    """

    def __init__(self, norm1, extra_conv, conv1, branch, sca_conv, conv3, norm2, freq):
        super().__init__()
        self.norm1 = norm1
        self.extra_conv = extra_conv
        self.conv1 = conv1
        self.branch = branch
        self.pool = GlobalAvgPool2d()
        self.sca = sca_conv
        self.sg = SimpleGate()
        self.conv3 = conv3
        self.norm2 = norm2
        self.freq = freq

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.extra_conv(self.norm1(inp)))
        z = self.sg(self.branch(x))
        x = self.sca(self.pool(z)) * z
        y = inp + self.conv3(x)
        return y + y * self.freq(self.norm2(y))


class DBlockDeploy(nn.Module):
    """DBlock after the folds.

    ``conv1`` (norm1 affine folded in, rows de-interleaved) emits ``[t[0::2] ; t[1::2]]``;
    ``extra_dw`` is a depthwise 3x3 with channel multiplier 2 (2c -> 4c) and the sum of its
    two output halves is the grouped ``extra_conv`` (groups=c) in the original channel
    order.  Branch biases are summed into branch 0.
    """

    def __init__(self, norm1, conv1, extra_dw, branches, sca_conv, conv3, norm2, conv4, conv5):
        super().__init__()
        self.norm1 = norm1
        self.conv1 = conv1
        self.extra_dw = extra_dw
        self.branches = nn.ModuleList(branches)
        self.pool = GlobalAvgPool2d()
        self.sca = sca_conv
        self.sg = SimpleGate()
        self.conv3 = conv3
        self.norm2 = norm2
        self.conv4 = conv4
        self.conv5 = conv5

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        u = self.extra_dw(self.conv1(self.norm1(inp)))
        half = u.shape[1] // 2
        t = u[:, :half] + u[:, half:]
        z = self.branches[0](t)
        for branch in self.branches[1:]:
            z = z + branch(t)
        z = self.sg(z)
        x = self.sca(self.pool(z)) * z
        y = inp + self.conv3(x)
        return y + self.conv5(self.sg(self.conv4(self.norm2(y))))


# =====================================================================================
# Folds (exact).  Considered and decided, each checked in fp64 by tests/test_darkir.py:
#
#   shipped
#   - DarkIR.side_out -> dropped (unused by forward without side_loss).
#   - DBlock norm1 affine -> conv1 (1x1, no padding): W' = W diag(g), b' = b + W beta.
#   - DBlock norm2 affine -> conv4, same formula.
#   - beta -> conv3 rows (EBlock and DBlock): W' = diag(beta) W, b' = beta * b.
#   - DBlock gamma -> conv5 rows.
#   - EBlock gamma -> freq.process1.2 rows: irfft2 is linear in mag' per channel, so
#     gamma_c * irfft(mag'_c * phase) == irfft((gamma_c mag'_c) * phase); then
#     y + gamma (y F) == y + y F'.
#   - DBlock grouped extra_conv (groups=c, 2 in/out per group) -> conv1 rows permuted to
#     [even ; odd] and a depthwise conv with channel multiplier 2 whose two output halves
#     are summed: an exact regrouping of the same products, no extra MACs or params (the
#     spec's [W; P W] variant doubles conv1, +13% MACs for DarkIR-m; a channel gather
#     t[:, arange(2c) ^ 1] would add a Gather op).
#   - DBlock branch biases (dil 1/4/9) summed into branch 0.
#   - EBlock norm1 gamma -> depthwise extra_conv kernel, beta kept as an add of beta/gamma
#     before the conv (ChannelNormShift): conv_{W g}(n + b/g) == conv_W(g n + b) including
#     the zero-padded border, *only if every g != 0* (and |b/g| <= 1e3, so the shifted
#     input stays on the scale of n) -- otherwise this fold is skipped and the affine
#     LayerNorm stays.
#   rejected
#   - EBlock norm1 beta *through* the zero-padded depthwise extra_conv into its bias:
#     wrong at the border (the padded zeros do not carry beta; spec measured 0.49).
#   - EBlock norm2 affine -> FreMLP: |rfft2(g n + b)| is not linear in (g, b) (the sign of
#     g flips the phase, b only hits the DC bin), so there is no exact fold.
#   - EBlock extra_conv (dw 3x3) into conv1 (1x1): exact but a dense 3x3 c -> 2c conv costs
#     more than the pair.  Dilated branches -> one 19x19 kernel: exact, 13x the taps.
#   - sca (GAP -> 1x1) cannot fold into anything (data-dependent scale).
# =====================================================================================


def _conv(w: torch.Tensor, b: torch.Tensor | None, **kw) -> nn.Conv2d:
    out_c, in_per_group, kh, kw_ = w.shape
    groups = kw.pop("groups", 1)
    conv = nn.Conv2d(in_per_group * groups, out_c, (kh, kw_), groups=groups, bias=b is not None,
                     dtype=w.dtype, device=w.device, **kw)
    conv.weight.data.copy_(w)
    if b is not None:
        conv.bias.data.copy_(b)
    return conv


def _affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return norm.weight.detach().reshape(-1), norm.bias.detach().reshape(-1)


def _fold_affine_into_1x1(conv: nn.Conv2d, g: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = conv.weight.detach()
    w2 = w[:, :, 0, 0]
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(w2[:, 0])
    return w * g[None, :, None, None], bias + w2 @ b


def _scale_rows(conv: nn.Conv2d, s: torch.Tensor) -> nn.Conv2d:
    s = s.detach().reshape(-1)
    return _conv(conv.weight.detach() * s[:, None, None, None],
                 None if conv.bias is None else conv.bias.detach() * s)


_MAX_NORM_SHIFT = 1e3


def _bare_norm(norm: nn.Module) -> ChannelLayerNorm:
    return ChannelLayerNorm(None, None, norm.eps, channels=norm.weight.numel())


@register_fold(EBlock)
@torch.no_grad()
def _fold_eblock(m: EBlock) -> nn.Module:
    if len(m.branches) != 1 or not isinstance(m.extra_conv, nn.Conv2d):
        return m  # configurations DarkIR never builds: leave unfolded
    g1, b1 = _affine(m.norm1)
    shift = b1 / g1
    # exact for any nonzero g; the bound keeps n + b/g from swamping n (and within fp16)
    if bool((g1 != 0).all()) and bool(shift.abs().max() <= _MAX_NORM_SHIFT):
        norm1 = ChannelNormShift(shift, m.norm1.eps)
        ec = m.extra_conv
        extra = _conv(ec.weight.detach() * g1[:, None, None, None], ec.bias.detach(),
                      padding=ec.padding, groups=ec.groups)
    else:
        norm1, extra = m.norm1, m.extra_conv
    freq = m.freq
    last = freq.process1[2]
    freq.process1[2] = _scale_rows(last, m.gamma)
    return EBlockDeploy(
        norm1=norm1,
        extra_conv=extra,
        conv1=m.conv1,
        branch=m.branches[0].branch[0],
        sca_conv=m.sca[1],
        conv3=_scale_rows(m.conv3, m.beta),
        norm2=m.norm2,
        freq=freq,
    )


@register_fold(DBlock)
@torch.no_grad()
def _fold_dblock(m: DBlock) -> nn.Module:
    if not isinstance(m.extra_conv, nn.Conv2d):
        return m
    c2 = m.conv1.out_channels
    g1, b1 = _affine(m.norm1)
    w1, bias1 = _fold_affine_into_1x1(m.conv1, g1, b1)
    # conv1 rows de-interleaved: u = [t[0::2] ; t[1::2]] (a pure row permutation)
    order = torch.cat([torch.arange(0, c2, 2), torch.arange(1, c2, 2)]).to(w1.device)
    conv1 = _conv(w1[order], bias1[order])
    # grouped conv (groups=c; out o reads t[2g], t[2g+1] with g = o // 2) as a depthwise conv
    # with channel multiplier 2 over u: input j < c (t[2j]) feeds outputs 2j, 2j+1 with
    # W[2j, 0], W[2j+1, 0]; input c + j (t[2j+1]) feeds outputs 2c+2j, 2c+2j+1 with
    # W[2j, 1], W[2j+1, 1].  Summing the two output halves gives every out o in order.
    ew = m.extra_conv.weight.detach()  # (2c, 2, 3, 3)
    bias = m.extra_conv.bias.detach()
    extra_dw = _conv(torch.cat([ew[:, 0], ew[:, 1]])[:, None], torch.cat([bias, torch.zeros_like(bias)]),
                     padding=1, groups=c2)
    branches = []
    bias_sum = sum(br.branch[0].bias.detach() for br in m.branches)
    for i, br in enumerate(m.branches):
        cv = br.branch[0]
        branches.append(_conv(cv.weight.detach(), bias_sum if i == 0 else None,
                              padding=cv.padding, dilation=cv.dilation, groups=cv.groups))
    g2, b2 = _affine(m.norm2)
    w4, bias4 = _fold_affine_into_1x1(m.conv4, g2, b2)
    return DBlockDeploy(
        norm1=_bare_norm(m.norm1),
        conv1=conv1,
        extra_dw=extra_dw,
        branches=branches,
        sca_conv=m.sca[1],
        conv3=_scale_rows(m.conv3, m.beta),
        norm2=_bare_norm(m.norm2),
        conv4=_conv(w4, bias4),
        conv5=_scale_rows(m.conv5, m.gamma),
    )


@register_fold(DarkIR)
def _fold_darkir(m: DarkIR) -> nn.Module:
    m.side_out = None
    return m


# =====================================================================================
# Export-safe rewrites (target independent)
#   - LayerNorm2d (autograd.Function) -> ChannelLayerNorm (plain mean/var ops, bit-equal;
#     for onnxruntime the channel means are ones-row matmuls, rounding level: MATMUL_MEAN_TARGETS).
#     The folds' ChannelNormShift / bare ChannelLayerNorm do the same via export_safe().
#   - FreMLP (torch.fft, abs/angle/cos/sin, complex) -> SafeFreMLP (matmul DFT, unit phase);
#     only the DFT pair depends on the target (edgesr.reparam.dft_spectral.per_bin_dft).
#   - train-form EBlock/DBlock (only when make_export_safe runs without fold): their
#     AdaptiveAvgPool2d(1) -> mean over H, W.  The deploy blocks already use the mean.
#   The grouped DBlock conv is left to the fold (ONNX and LiteRT both take it natively).
# =====================================================================================


@register_rewrite(LayerNorm2d)
def _safe_layernorm(m: LayerNorm2d, target: str) -> nn.Module:
    return ChannelLayerNorm(m.weight, m.bias, m.eps).export_safe(target)  # channel mean per target


@register_rewrite(FreMLP)
def _safe_fremlp(m: FreMLP, target: str) -> nn.Module:
    return SafeFreMLP(m.process1, layout=target)  # DFT pair tuned per runtime


@register_rewrite(EBlock, DBlock)
def _safe_block_pool(m: nn.Module, target: str) -> nn.Module:
    if isinstance(m.sca[0], nn.AdaptiveAvgPool2d):
        m.sca[0] = GlobalAvgPool2d()
    return m


# =====================================================================================
# Registration
# =====================================================================================

_SIGNATURE = (
    "intro.weight",
    "encoders.0.modules_list.0.freq.process1.0.weight",
    "middle_blks_dec.modules_list.0.extra_conv.weight",
    "ups.0.0.weight",
)


def _config(width: int, enc=ENC_BLOCKS, middle_enc=MIDDLE_ENC, middle_dec=MIDDLE_DEC, dec=DEC_BLOCKS) -> dict[str, Any]:
    return {"width": width, "enc_blk_nums": tuple(enc), "middle_blk_num_enc": middle_enc,
            "middle_blk_num_dec": middle_dec, "dec_blk_nums": tuple(dec)}


def _build(config: Mapping[str, Any], scale: int) -> nn.Module:
    if scale != 1:
        raise ValueError(f"DarkIR is a restoration model (scale 1), got x{scale}")
    return DarkIR(width=int(config["width"]), middle_blk_num_enc=config.get("middle_blk_num_enc", MIDDLE_ENC),
                  middle_blk_num_dec=config.get("middle_blk_num_dec", MIDDLE_DEC),
                  enc_blk_nums=tuple(config.get("enc_blk_nums", ENC_BLOCKS)),
                  dec_blk_nums=tuple(config.get("dec_blk_nums", DEC_BLOCKS)))


def _count(sd: StateDict, prefix: str) -> int:
    """How many ``<prefix>.N.`` indices there are (0..N-1 without gaps), 0 if none."""
    idx = {int(k[len(prefix) + 1:].split(".", 1)[0]) for k in sd
           if isinstance(k, str) and k.startswith(prefix + ".") and k[len(prefix) + 1:].split(".", 1)[0].isdigit()}
    if idx != set(range(len(idx))):
        raise Misfit(f"{prefix}.N indices are not 0..N-1 without gaps")
    return len(idx)


def _read_config(sd: StateDict) -> tuple[dict[str, Any], int] | None:
    if not all(k in sd for k in _SIGNATURE):
        return None
    intro = sd["intro.weight"]
    if intro.ndim != 4 or tuple(intro.shape[1:]) != (3, 3, 3):
        raise Misfit(f"intro.weight has shape {tuple(intro.shape)}, expected (width, 3, 3, 3)")
    width = int(intro.shape[0])
    levels = _count(sd, "encoders")
    if _count(sd, "decoders") != levels or _count(sd, "downs") != levels or _count(sd, "ups") != levels:
        raise Misfit(f"{levels} encoders but a different number of decoders/downs/ups")
    enc = tuple(_count(sd, f"encoders.{i}.modules_list") for i in range(levels))
    dec = tuple(_count(sd, f"decoders.{i}.modules_list") for i in range(levels))
    middle_enc = _count(sd, "middle_blks_enc.modules_list")
    middle_dec = _count(sd, "middle_blks_dec.modules_list")
    n_dil = _count(sd, "middle_blks_dec.modules_list.0.branches")
    if n_dil != len(DILATIONS):
        raise Misfit(f"middle_blks_dec.modules_list.0.branches has {n_dil} branches; dilations cannot be read "
                     f"from shapes, only the official {len(DILATIONS)} ({DILATIONS}) are known")
    if "encoders.0.modules_list.0.extra_conv.weight" not in sd:
        raise Misfit("encoders.0.modules_list.0.extra_conv.weight is missing (extra_depth_wise=False is not supported)")
    top = width * 2**levels
    ec = sd["middle_blks_dec.modules_list.0.extra_conv.weight"]
    # the grouped DBlock conv (2c, 2, 3, 3) at the deepest width c
    if tuple(ec.shape) != (2 * top, 2, 3, 3):
        raise Misfit(f"middle_blks_dec.modules_list.0.extra_conv.weight has shape {tuple(ec.shape)}, "
                     f"expected {(2 * top, 2, 3, 3)} for width {width} and {levels} levels")
    return _config(width, enc, middle_enc, middle_dec, dec), 1


def _custom_label(config: Mapping[str, Any]) -> str:
    return (f"w{config['width']}-enc{'-'.join(map(str, config['enc_blk_nums']))}"
            f"-mid{config['middle_blk_num_enc']}-{config['middle_blk_num_dec']}"
            f"-dec{'-'.join(map(str, config['dec_blk_nums']))}")


def _detect(sd: StateDict) -> tuple[str, int] | None:
    return SPEC.detect(sd)


SPEC = register(
    ModelSpec(
        name="darkir",
        description="DarkIR (CVPR 2025): low-light enhancement + deblurring, x1",
        variants=(
            Variant("m", _config(32), scales=(1,), default_scale=1,
                    description="DarkIR-m, width 32 (3.32M params)"),
            Variant("l", _config(64), scales=(1,), default_scale=1,
                    description="DarkIR-l, width 64 (12.96M params)"),
        ),
        default_variant="m",
        build_fn=_build,
        read_config=_read_config,
        custom_label=_custom_label,
        input_range=1.0,
        # The zero pad to a multiple of 8 is part of the model, so any size >= 1 works;
        # the DFT bases are baked per feature size, hence static-shape export only.
        size_rule=SizeRule(min_size=1, multiple_of=1),
        receptive_field=None,  # FFT blocks and global average pooling: global
        tiling_inexact=lambda config: "FFT blocks and global average pooling see the whole input",
        dynamic_shapes=False,
        signature_keys=_SIGNATURE,
    )
)
