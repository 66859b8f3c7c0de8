"""SAFMN family: SAFMN / SAFMN-L (ICCV'23), SAFMN++ (NTIRE'24 ESR) and light SAFMN++ (AIS'24 RTSR).

Train-time forms with the official state-dict keys and forward passes (quirks included),
their exact export-safe rewrites and the one exact fold.  Three specs are registered,
because the families have different keys (every config is read off the shapes: dim,
block count, ffn_scale from the CCM hidden width, scale from ``to_img``):

``safmn`` -- ``SAFMN(dim, n_blocks, ffn_scale, upscaling_factor)`` (``basicsr/archs/safmn_arch.py``)
    ``base``: dim 36, 8 blocks, ffn 2.0, x2/x3/x4 (227,820 / 232,695 / 239,520 params,
    148 tensors).  ``l`` (SAFMN-L): dim 128, 16 blocks, ffn 2.0 (x4: 5,600,816 params).
    ``f = to_feat(x); f = feats(f) + f; y = to_img(f)``; input [0, 1], no normalisation,
    no image skip, no clamp.  ``AttBlock``: ``x = safm(norm1(x)) + x; x = ccm(norm2(x)) + x``
    with channels-first LayerNorm (eps 1e-6, biased variance).  ``SAFM``: ``chunk(4)``;
    level 0 is a depthwise 3x3; level i = 1..3 is ``adaptive_max_pool2d`` to
    ``(h // 2**i, w // 2**i)``, depthwise 3x3, nearest ``interpolate`` back to ``(h, w)``;
    then ``GELU(aggr(cat)) * x`` (x = the *normalised* input).  ``CCM``: 3x3 -> GELU -> 1x1.

``safmnpp`` -- SAFMN++ (``NTIRE2024_ESR/models/team23_safmnpp.py``, class ``SAFMNPP``)
    ``base``: dim 36, 6 blocks, ffn 1.5, x4, no biases anywhere (32 tensors, 211,572
    params).  ``y = to_img(feats(to_feat(x))) + bilinear_up(x, s, align_corners=False)``;
    ``AttBlock``: ``conv2(conv1(x)) + x`` with ``conv1 = SimpleSAFM`` (chunk ``dim // 3``)
    and ``conv2`` = CCM with attributes ``conv1`` (3x3) / ``conv2`` (1x1).
    ``light``: light SAFMN++ (AIS'24, ``SAFMN_VIS24``): dim 32, 2 blocks, ffn 1.5, x4, no
    biases (12 tensors, 66,176 params).  ``SimpleSAFM`` splits with ``chunk(2)`` (16 + 16);
    ``AttBlock`` is ``conv2(conv1(x))`` with **no** residual; CCM is ``conv = Sequential(3x3,
    GELU, 1x1)`` (keys ``conv2.conv.{0,2}``); forward ``f = to_feat(x); y = to_img(feats(f) + f)``,
    no bilinear skip.  (Structure checked against the official ``light_safmnpp_arch.py``;
    ``chunk(2)`` of 32 channels is written as ``split([16, 16])``, identical for even dims.)

    ``SimpleSAFM``: ``x0, x1 = proj(x).split([c, dim - c])``; ``x2 = adaptive_max_pool2d(x0,
    (h // 8, w // 8))``; depthwise 3x3; bilinear ``interpolate`` to ``(h, w)`` (the official
    call relies on the ``align_corners=False`` default; passed explicitly here, identical);
    ``x2 = GELU(x2) * x0``; ``out(GELU(cat[x1, x2]))`` -- **x1 first**.
    Only x4 SAFMN++ models were released; x2/x3 builds are allowed (the global skip uses
    the same bilinear ``scale_factor`` form) but x4 is the default.

``safmn_ntire23`` -- the authors' NTIRE 2023 ESR entry (``NTIRE2023_ESR/models/team15_SAFMN.py``)
    ``base``: dim 36, 8 blocks, ffn 2.0, x4 (62 tensors, 237,000 params).  One shared
    ``GRN`` (``norm.gamma/beta``) after ``to_feat``; blocks without norms, SAFM and CCM
    without biases; SAFM pools level i to ``h // 2**(i+1)`` (not ``2**i``); forward
    ``to_img(feats(GRN(to_feat(x)))) + bilinear_up(x)`` (no feature-level residual).  The
    deploy form's fixed windows go up to 16 px, hence its size rule ``multiple_of=16``.
    Released checkpoint: Set5 x4 Y-PSNR 32.16 dB (``tests/test_detection.py``).

Checkpoints: BasicSR dicts.  SAFMN's official inference reads ``params``; the NTIRE24
SAFMN++ test reads ``params_ema``; the AIS24 light script reads ``params``.

Sizes: the train form accepts any ``H, W >= 8`` (``h // 8 >= 1``) and reproduces the
adaptive pooling windows at non-divisible sizes exactly.  The deploy form replaces the
adaptive pools by fixed ``k x k`` windows (exact only for multiples of 8), hence the
spec's size rule ``multiple_of=8, min 8``; other sizes raise ``SizeRuleError``.
Dynamic export: declare H/W as ``8 * Dim(...)``.  torch.export assumes symbolic sizes
>= 2 (its 0/1 specialisation), and resizing a 1x1 pooled map adds a memory-format guard,
so a dynamic program serves every multiple of 8 from 16 up (8 x 16 works too); the
8 x 8 minimum needs a static export.  A plain ``Dim`` fails capture with torch's
constraint-violation message naming the ``% 8`` guard.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SizeRuleError
from ..reparam.rules import register_fold, register_rewrite
from ..reparam.safe_ops import (ChannelNormShift, FixedWindowMaxPool, IntegerUpsample, channels_first_layernorm_for,
                                require_multiple)
from .registry import Misfit, ModelSpec, SizeRule, StateDict, Variant, register

MIN_SIZE = 8  # h // 8 must be >= 1 for the coarsest pooling level (both families)
MIN_SIZE_NTIRE23 = 16  # the NTIRE 2023 SAFM pools to h // 16 at its coarsest level


def _require_min_size(x: torch.Tensor, what: str, min_size: int = MIN_SIZE) -> None:
    """Friendly error where the official code would fail inside ``adaptive_max_pool2d``."""
    h, w = x.shape[-2], x.shape[-1]
    if isinstance(h, torch.SymInt) or isinstance(w, torch.SymInt):
        return
    if h < min_size or w < min_size:
        raise SizeRuleError(f"{what} needs input height and width >= {min_size}, got {h}x{w}")


# ===================================================================================
# SAFMN / SAFMN-L (train-time form, official keys)
# ===================================================================================


class LayerNorm(nn.Module):
    """Channels-first LayerNorm of SAFMN (keys ``weight``/``bias``), official op order."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class SAFM(nn.Module):
    """Spatially-adaptive feature modulation (official, adaptive pooling to ``h // 2**i``).

    ``level_shift=1, bias=False`` is the NTIRE 2023 entry's SAFM (pooling to ``h // 2**(i+1)``,
    bias-free convs).
    """

    def __init__(self, dim: int, n_levels: int = 4, level_shift: int = 0, bias: bool = True):
        super().__init__()
        self.n_levels = n_levels
        self.level_shift = level_shift
        c = dim // n_levels
        self.mfr = nn.ModuleList([nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=bias) for _ in range(n_levels)])
        self.aggr = nn.Conv2d(dim, dim, 1, 1, 0, bias=bias)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        xc = x.chunk(self.n_levels, dim=1)
        out = []
        for i in range(self.n_levels):
            if i > 0:
                k = 2 ** (i + self.level_shift)
                s = F.adaptive_max_pool2d(xc[i], (h // k, w // k))
                s = self.mfr[i](s)
                s = F.interpolate(s, size=(h, w), mode="nearest")
            else:
                s = self.mfr[i](xc[i])
            out.append(s)
        out = self.aggr(torch.cat(out, dim=1))
        return self.act(out) * x


class SAFMExportSafe(nn.Module):
    """SAFM with ``max_pool2d(2**i, 2**i)`` and nearest ``scale_factor=2**i`` (same weights/keys).

    Bit-identical to :class:`SAFM` when ``H, W`` are multiples of ``2**(n_levels-1)`` (8);
    other sizes raise ``SizeRuleError``.  Shape-agnostic (dynamic H/W export works).
    """

    def __init__(self, safm: SAFM):
        super().__init__()
        self.n_levels = safm.n_levels
        self.mfr = safm.mfr
        self.aggr = safm.aggr
        self.act = safm.act
        ks = [2 ** (i + safm.level_shift) for i in range(1, self.n_levels)]
        self.k_max = ks[-1] if ks else 1
        self.pools = nn.ModuleList([FixedWindowMaxPool(k, "SAFMN deploy form") for k in ks])
        self.ups = nn.ModuleList([IntegerUpsample(k, "nearest") for k in ks])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        require_multiple(x, self.k_max, "SAFMN deploy form")
        xc = x.chunk(self.n_levels, dim=1)
        out = [self.mfr[0](xc[0])]
        for i in range(1, self.n_levels):
            out.append(self.ups[i - 1](self.mfr[i](self.pools[i - 1](xc[i]))))
        out = self.aggr(torch.cat(out, dim=1))
        return self.act(out) * x


class CCM(nn.Module):
    """Convolutional channel mixer: 3x3 (dim -> int(dim*growth)) -> GELU -> 1x1, with biases."""

    def __init__(self, dim: int, growth_rate: float = 2.0, bias: bool = True):
        super().__init__()
        hidden = int(dim * growth_rate)
        self.ccm = nn.Sequential(
            nn.Conv2d(dim, hidden, 3, 1, 1, bias=bias),
            nn.GELU(),
            nn.Conv2d(hidden, dim, 1, 1, 0, bias=bias),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ccm(x)


class AttBlock(nn.Module):
    def __init__(self, dim: int, ffn_scale: float = 2.0):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.safm = SAFM(dim)
        self.ccm = CCM(dim, ffn_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.safm(self.norm1(x)) + x
        x = self.ccm(self.norm2(x)) + x
        return x


class SAFMN(nn.Module):
    def __init__(self, dim: int, n_blocks: int = 8, ffn_scale: float = 2.0, upscaling_factor: int = 4):
        super().__init__()
        self.to_feat = nn.Conv2d(3, dim, 3, 1, 1)
        self.feats = nn.Sequential(*[AttBlock(dim, ffn_scale) for _ in range(n_blocks)])
        self.to_img = nn.Sequential(
            nn.Conv2d(dim, 3 * upscaling_factor**2, 3, 1, 1),
            nn.PixelShuffle(upscaling_factor),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _require_min_size(x, "SAFMN")
        x = self.to_feat(x)
        x = self.feats(x) + x
        return self.to_img(x)


# ===================================================================================
# SAFMN NTIRE 2023 ESR entry (``NTIRE2023_ESR/models/team15_SAFMN.py``)
# ===================================================================================


class GRN(nn.Module):
    """Global response normalisation (ConvNeXt-V2), the NTIRE 2023 entry's one shared norm."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(2, 3), keepdim=True)
        nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class AttBlock23(nn.Module):
    """NTIRE 2023 block: no norms; bias-free SAFM (pools ``h // 2**(i+1)``) and CCM."""

    def __init__(self, dim: int, ffn_scale: float = 2.0):
        super().__init__()
        self.safm = SAFM(dim, level_shift=1, bias=False)
        self.ccm = CCM(dim, ffn_scale, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.safm(x) + x
        return self.ccm(x) + x


class SAFMN23(nn.Module):
    """``to_img(feats(GRN(to_feat(x)))) + bilinear_up(x)`` -- no feature-level global residual."""

    def __init__(self, dim: int, n_blocks: int = 8, ffn_scale: float = 2.0, upscaling_factor: int = 4):
        super().__init__()
        self.scale = upscaling_factor
        self.norm = GRN(dim)
        self.to_feat = nn.Conv2d(3, dim, 3, 1, 1)
        self.feats = nn.Sequential(*[AttBlock23(dim, ffn_scale) for _ in range(n_blocks)])
        self.to_img = nn.Sequential(
            nn.Conv2d(dim, 3 * upscaling_factor**2, 3, 1, 1),
            nn.PixelShuffle(upscaling_factor),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _require_min_size(x, "SAFMN (NTIRE 2023)", MIN_SIZE_NTIRE23)
        ident = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        x = self.norm(self.to_feat(x))
        return self.to_img(self.feats(x)) + ident


# ===================================================================================
# SAFMN++ (NTIRE24) and light SAFMN++ (AIS24) (train-time form, official keys)
# ===================================================================================


class SimpleSAFM(nn.Module):
    """SAFMN++'s single-level SAFM: ``chunk_dim`` channels go through pool(h//8)/dwconv/bilinear.

    ``chunk_dim = dim // 3`` for SAFMN++ (``split([12, 24])``), ``dim // 2`` for light
    SAFMN++ (``chunk(2)``).  No biases.
    """

    def __init__(self, dim: int, chunk_dim: int):
        super().__init__()
        self.dim = dim
        self.chunk_dim = chunk_dim
        self.proj = nn.Conv2d(dim, dim, 3, 1, 1, bias=False)
        self.dwconv = nn.Conv2d(chunk_dim, chunk_dim, 3, 1, 1, groups=chunk_dim, bias=False)
        self.out = nn.Conv2d(dim, dim, 1, 1, 0, bias=False)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x0, x1 = self.proj(x).split([self.chunk_dim, self.dim - self.chunk_dim], dim=1)
        x2 = F.adaptive_max_pool2d(x0, (h // 8, w // 8))
        x2 = self.dwconv(x2)
        x2 = F.interpolate(x2, size=(h, w), mode="bilinear", align_corners=False)
        x2 = self.act(x2) * x0
        x = torch.cat([x1, x2], dim=1)
        return self.out(self.act(x))


class SimpleSAFMExportSafe(nn.Module):
    """SimpleSAFM with ``max_pool2d(8, 8)`` and bilinear ``scale_factor=8`` (same weights/keys).

    Identical to :class:`SimpleSAFM` when ``H, W`` are multiples of 8 (the bilinear source
    coordinates coincide exactly); other sizes raise ``SizeRuleError``.
    """

    def __init__(self, m: SimpleSAFM):
        super().__init__()
        self.dim = m.dim
        self.chunk_dim = m.chunk_dim
        self.proj = m.proj
        self.dwconv = m.dwconv
        self.out = m.out
        self.act = m.act
        self.pool = FixedWindowMaxPool(8, "SAFMN++ deploy form")
        self.up = IntegerUpsample(8, "bilinear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0, x1 = self.proj(x).split([self.chunk_dim, self.dim - self.chunk_dim], dim=1)
        x2 = self.up(self.dwconv(self.pool(x0)))
        x2 = self.act(x2) * x0
        x = torch.cat([x1, x2], dim=1)
        return self.out(self.act(x))


class PPCCM(nn.Module):
    """SAFMN++ CCM: ``conv1`` 3x3 -> GELU -> ``conv2`` 1x1, no biases."""

    def __init__(self, dim: int, ffn_scale: float):
        super().__init__()
        hidden = int(dim * ffn_scale)
        self.conv1 = nn.Conv2d(dim, hidden, 3, 1, 1, bias=False)
        self.conv2 = nn.Conv2d(hidden, dim, 1, 1, 0, bias=False)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


class PPAttBlock(nn.Module):
    """SAFMN++ block: ``conv2(conv1(x)) + x`` (one residual around both)."""

    def __init__(self, dim: int, ffn_scale: float):
        super().__init__()
        self.conv1 = SimpleSAFM(dim, dim // 3)
        self.conv2 = PPCCM(dim, ffn_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x)) + x


class SAFMNPP(nn.Module):
    """SAFMN++ (NTIRE24): no biases, bilinear global skip."""

    def __init__(self, dim: int, n_blocks: int = 8, ffn_scale: float = 2.0, upscaling_factor: int = 4):
        super().__init__()
        self.scale = upscaling_factor
        self.to_feat = nn.Conv2d(3, dim, 3, 1, 1, bias=False)
        self.feats = nn.Sequential(*[PPAttBlock(dim, ffn_scale) for _ in range(n_blocks)])
        self.to_img = nn.Sequential(
            nn.Conv2d(dim, 3 * upscaling_factor**2, 3, 1, 1, bias=False),
            nn.PixelShuffle(upscaling_factor),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _require_min_size(x, "SAFMN++")
        res = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        x = self.to_feat(x)
        x = self.feats(x)
        return self.to_img(x) + res


class LightCCM(nn.Module):
    """Light SAFMN++ CCM: ``conv = Sequential(3x3, GELU, 1x1)``, no biases."""

    def __init__(self, dim: int, ffn_scale: float):
        super().__init__()
        hidden = int(dim * ffn_scale)
        self.conv = nn.Sequential(
            nn.Conv2d(dim, hidden, 3, 1, 1, bias=False),
            nn.GELU(),
            nn.Conv2d(hidden, dim, 1, 1, 0, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class LightAttBlock(nn.Module):
    """Light SAFMN++ block: ``conv2(conv1(x))`` -- no residual (official)."""

    def __init__(self, dim: int, ffn_scale: float):
        super().__init__()
        self.conv1 = SimpleSAFM(dim, dim // 2)
        self.conv2 = LightCCM(dim, ffn_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class LightSAFMNPP(nn.Module):
    """Light SAFMN++ (AIS24 RTSR, official class ``SAFMN_VIS24``): ``to_img(feats(f) + f)``."""

    def __init__(self, dim: int = 32, n_blocks: int = 2, ffn_scale: float = 1.5, upscaling_factor: int = 4):
        super().__init__()
        self.scale = upscaling_factor
        self.to_feat = nn.Conv2d(3, dim, 3, 1, 1, bias=False)
        self.feats = nn.Sequential(*[LightAttBlock(dim, ffn_scale) for _ in range(n_blocks)])
        self.to_img = nn.Sequential(
            nn.Conv2d(dim, 3 * upscaling_factor**2, 3, 1, 1, bias=False),
            nn.PixelShuffle(upscaling_factor),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _require_min_size(x, "light SAFMN++")
        x = self.to_feat(x)
        x = self.feats(x) + x
        return self.to_img(x)


# ===================================================================================
# Export-safe rewrites (target-independent: ONNX and TFLite take the same form)
# ===================================================================================


register_rewrite(LayerNorm)(channels_first_layernorm_for)  # matmul channel means for onnxruntime


@register_rewrite(SAFM)
def _safm_export_safe(m: SAFM, target: str) -> nn.Module:
    return SAFMExportSafe(m)


@register_rewrite(SimpleSAFM)
def _simple_safm_export_safe(m: SimpleSAFM, target: str) -> nn.Module:
    return SimpleSAFMExportSafe(m)


# GELU stays the exact erf form: ONNX (opset 18) exports Erf, litert-torch maps it to
# the TFLite GELU builtin.  The tanh approximation (max diff 4.7e-4) is not exact.


# ===================================================================================
# Folds -- the record of what was considered
# ===================================================================================
#
# ACCEPTED  SAFMN norm2 scale -> CCM 3x3 (register_fold(AttBlock) below).
#     ccm.0 is a zero-padded conv, so conv_W(g*n + b) == conv_{W*g}(n + b/g) exactly:
#     the zero padding of ``n + b/g`` scaled by ``g`` is still zero, and interior taps
#     see ``g*(n + b/g) = g*n + b``.  Applied only when every g is nonzero and b/g and
#     W*g are finite (else the block is left as is).  Removes one Mul per block.
#     fp64: ~1e-15; fp32: rounding level (the error of ``n + b/g`` scaled by ``g`` is
#     ~ulp(b), as in the original).
# REJECTED  norm2 shift b into the CCM conv bias: conv_W(b) over a zero-padded
#     constant map is not constant -- the 1-px border sees fewer taps -- so the fold is
#     wrong on the border (only interior pixels match).
# REJECTED  norm1 affine (either part): SAFM multiplies its output by the *normalised*
#     input (``GELU(aggr) * x``), and max-pooling does not commute with a negative
#     per-channel scale, so neither g nor b can move past norm1.
# REJECTED  CCM 3x3 -> 1x1 and SAFM aggr -> anything: a GELU sits between every pair
#     of linear layers.
# REJECTED  SAFM mfr/upsample/aggr restructure (aggr split per level and applied at
#     low resolution before the nearest upsample): mathematically equal, but it is a
#     re-association (not a fold), upsamples 4x more channels and adds three Adds.
# REJECTED  SAFMN++ / light: no norms and no biases; every conv is followed by GELU,
#     a split or a product, so there is nothing to fold.  (Optional, not done: split
#     ``proj`` into two convs to drop the SPLIT, or split ``out`` over the concat to
#     avoid an int8 concat -- both rewrites, unneeded for fp32/fp16 targets.)
# REJECTED  SAFMN++ global bilinear skip into to_img: to_img's input is the feature
#     map, not the image, so the bilinear upsample cannot be absorbed there.


def _fold_scale_into_conv_input(conv: nn.Conv2d, g: torch.Tensor) -> torch.Tensor:
    """Weights of ``conv`` with input channel c scaled by ``g[c]`` (computed in fp64)."""
    w = conv.weight.detach()
    return (w.double() * g.double()[None, :, None, None]).to(w.dtype)


@register_fold(AttBlock)
def _fold_norm2_scale(block: AttBlock) -> nn.Module:
    norm = block.norm2
    conv = block.ccm.ccm[0] if isinstance(block.ccm, CCM) else None
    if not isinstance(norm, LayerNorm) or not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        return block  # already folded, or not the official structure
    g = norm.weight.detach().double()
    b = norm.bias.detach().double()
    if not bool(torch.all(g != 0)):
        return block
    shift = b / g
    w_new = _fold_scale_into_conv_input(conv, g)
    if not (bool(torch.isfinite(shift.float()).all()) and bool(torch.isfinite(w_new).all())):
        return block
    conv.weight = nn.Parameter(w_new.contiguous())
    block.norm2 = ChannelNormShift(shift.to(norm.bias.dtype), norm.eps)
    return block


# ===================================================================================
# Detection (keys and shapes only; never raises)
# ===================================================================================

_BLOCK_RE = re.compile(r"^feats\.(\d+)\.")


def _shape(sd: StateDict, key: str) -> tuple[int, ...] | None:
    t = sd.get(key)
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def _n_blocks(sd: StateDict) -> int | None:
    idx = {int(m.group(1)) for k in sd if isinstance(k, str) and (m := _BLOCK_RE.match(k))}
    if not idx or idx != set(range(max(idx) + 1)):
        return None
    return len(idx)


def _to_feat_dim(sd: StateDict) -> int | None:
    s = _shape(sd, "to_feat.weight")
    if s is None or len(s) != 4 or s[1:] != (3, 3, 3):
        return None
    return s[0]


def _scale(sd: StateDict, dim: int) -> int | None:
    s = _shape(sd, "to_img.0.weight")
    if s is None or len(s) != 4 or s[1:] != (dim, 3, 3) or s[0] % 3:
        return None
    r = math.isqrt(s[0] // 3)
    return r if r >= 1 and 3 * r * r == s[0] else None


def _require(sd: StateDict, key: str, want: tuple[int, ...]) -> None:
    got = _shape(sd, key)
    if got is None:
        raise Misfit(f"{key} is missing (expected shape {want})")
    if got != want:
        raise Misfit(f"{key} has shape {got}, expected {want}")


def _ffn_scale(dim: int, hidden: int) -> float:
    """The ``ffn_scale`` with ``int(dim * ffn_scale) == hidden`` (the official hidden-width rule)."""
    for f in (round(hidden / dim, 4), hidden / dim, (hidden + 0.5) / dim):
        if int(dim * f) == hidden:
            return f
    raise Misfit(f"no ffn_scale gives a hidden width of {hidden} at dim {dim}")


def _common(sd: StateDict, bias: bool) -> tuple[int, int, int] | None:
    """``(dim, n_blocks, scale)`` from to_feat/feats/to_img, or None if these are not SAFMN-style keys."""
    dim = _to_feat_dim(sd)
    if dim is None:
        return None
    n = _n_blocks(sd)
    if n is None:
        raise Misfit("feats.N block indices are not 0..N-1 without gaps")
    if bias:
        _require(sd, "to_feat.bias", (dim,))
    up = _shape(sd, "to_img.0.weight")
    if up is None or len(up) != 4:
        raise Misfit("to_img.0.weight is missing or not a conv weight")
    scale = _scale(sd, dim)
    if scale is None:
        raise Misfit(f"to_img.0.weight has shape {up}, expected (3 x scale^2, {dim}, 3, 3)")
    return dim, n, scale


def _safm_shapes(sd: StateDict, dim: int) -> None:
    if dim % 4:
        raise Misfit(f"to_feat.weight gives dim {dim}: SAFM splits it into 4 levels (dim must be a multiple of 4)")
    _require(sd, "feats.0.safm.mfr.0.weight", (dim // 4, 1, 3, 3))
    _require(sd, "feats.0.safm.aggr.weight", (dim, dim, 1, 1))


def _ccm_ffn(sd: StateDict, key: str, dim: int) -> float:
    hid = _shape(sd, key)
    if hid is None or len(hid) != 4:
        raise Misfit(f"{key} is missing or not a conv weight")
    _require(sd, key, (hid[0], dim, 3, 3))
    return _ffn_scale(dim, hid[0])


def _read_safmn(sd: StateDict) -> tuple[dict, int] | None:
    if "feats.0.norm1.weight" not in sd or "feats.0.safm.aggr.weight" not in sd:
        return None
    found = _common(sd, bias=True)
    if found is None:
        return None
    dim, n, scale = found
    _require(sd, "feats.0.norm1.weight", (dim,))
    _safm_shapes(sd, dim)
    return {"dim": dim, "n_blocks": n, "ffn_scale": _ccm_ffn(sd, "feats.0.ccm.ccm.0.weight", dim)}, scale


def _read_safmn23(sd: StateDict) -> tuple[dict, int] | None:
    if "norm.gamma" not in sd or "feats.0.safm.aggr.weight" not in sd:
        return None
    found = _common(sd, bias=True)
    if found is None:
        return None
    dim, n, scale = found
    _require(sd, "norm.gamma", (1, dim, 1, 1))
    _safm_shapes(sd, dim)
    return {"dim": dim, "n_blocks": n, "ffn_scale": _ccm_ffn(sd, "feats.0.ccm.ccm.0.weight", dim)}, scale


_PP_ARCHS = {
    # arch: (CCM first conv key, SimpleSAFM chunk ratio fixed by the official class)
    "ntire24": ("feats.0.conv2.conv1.weight", 3),
    "ais24": ("feats.0.conv2.conv.0.weight", 2),
}


def _read_safmnpp(sd: StateDict) -> tuple[dict, int] | None:
    if "feats.0.conv1.proj.weight" not in sd or "feats.0.conv1.dwconv.weight" not in sd:
        return None
    arch = next((a for a, (key, _) in _PP_ARCHS.items() if key in sd), None)
    if arch is None:
        return None
    found = _common(sd, bias=False)
    if found is None:
        return None
    dim, n, scale = found
    if "to_feat.bias" in sd:
        raise Misfit("to_feat.bias is present: SAFMN++ convs have no biases")
    key, ratio = _PP_ARCHS[arch]
    _require(sd, "feats.0.conv1.proj.weight", (dim, dim, 3, 3))
    _require(sd, "feats.0.conv1.dwconv.weight", (dim // ratio, 1, 3, 3))
    cfg = {"arch": arch, "dim": dim, "n_blocks": n, "ffn_scale": _ccm_ffn(sd, key, dim), "chunk_ratio": ratio}
    return cfg, scale


def _label(config) -> str:
    return f"dim{config['dim']}-b{config['n_blocks']}-ffn{config['ffn_scale']:g}"


def _label_pp(config) -> str:
    return f"{config['arch']}-{_label(config)}"


# ===================================================================================
# Specs
# ===================================================================================

SAFMN_VARIANTS = (
    Variant(
        "base",
        {"dim": 36, "n_blocks": 8, "ffn_scale": 2.0},
        scales=(2, 3, 4),
        default_scale=4,
        description="SAFMN (ICCV'23): dim 36, 8 blocks; 239,520 params at x4",
        checkpoint_key="params",  # the official inference script loads ['params']
    ),
    Variant(
        "l",
        {"dim": 128, "n_blocks": 16, "ffn_scale": 2.0},
        scales=(2, 3, 4),
        default_scale=4,
        description="SAFMN-L (classic / real-world SR): dim 128, 16 blocks; 5,600,816 params at x4",
        checkpoint_key="params",  # the official inference script loads ['params']
    ),
)

SAFMNPP_VARIANTS = (
    Variant(
        "base",
        {"arch": "ntire24", "dim": 36, "n_blocks": 6, "ffn_scale": 1.5, "chunk_ratio": 3},
        scales=(2, 3, 4),
        default_scale=4,
        description="SAFMN++ (NTIRE'24 ESR): dim 36, 6 blocks, no biases, bilinear skip; "
        "211,572 params at x4 (only x4 released)",
    ),
    Variant(
        "light",
        {"arch": "ais24", "dim": 32, "n_blocks": 2, "ffn_scale": 1.5, "chunk_ratio": 2},
        scales=(2, 3, 4),
        default_scale=4,
        description="light SAFMN++ (AIS'24 RTSR): dim 32, 2 blocks, no biases; "
        "66,176 params at x4 (only x4 released)",
        checkpoint_key="params",  # the official inference script loads ['params']
    ),
)


def _build_safmn(cfg, scale: int) -> nn.Module:
    return SAFMN(cfg["dim"], cfg["n_blocks"], cfg["ffn_scale"], scale)


def _build_safmnpp(cfg, scale: int) -> nn.Module:
    cls = {"ntire24": SAFMNPP, "ais24": LightSAFMNPP}[cfg["arch"]]
    model = cls(cfg["dim"], cfg["n_blocks"], cfg["ffn_scale"], scale)
    assert all(b.conv1.chunk_dim == cfg["dim"] // cfg["chunk_ratio"] for b in model.feats)
    return model


def _build_safmn23(cfg, scale: int) -> nn.Module:
    return SAFMN23(cfg["dim"], cfg["n_blocks"], cfg["ffn_scale"], scale)


_DEPLOY_SIZES = SizeRule(min_size=MIN_SIZE, multiple_of=8)

SAFMN_SPEC = register(
    ModelSpec(
        name="safmn",
        description="SAFMN / SAFMN-L: spatially-adaptive feature modulation (ICCV'23)",
        variants=SAFMN_VARIANTS,
        default_variant="base",
        build_fn=_build_safmn,
        read_config=_read_safmn,
        custom_label=_label,
        input_range=1.0,
        size_rule=_DEPLOY_SIZES,
        receptive_field=None,  # max pooling + interpolation: grid-dependent, ~70 px measured
        dynamic_shapes=True,
        signature_keys=(
            "to_feat.weight",
            "feats.0.norm1.weight",
            "feats.0.safm.aggr.weight",
            "to_img.0.weight",
        ),
    )
)

SAFMNPP_SPEC = register(
    ModelSpec(
        name="safmnpp",
        description="SAFMN++ (NTIRE'24 ESR) and light SAFMN++ (AIS'24 RTSR)",
        variants=SAFMNPP_VARIANTS,
        default_variant="base",
        build_fn=_build_safmnpp,
        read_config=_read_safmnpp,
        custom_label=_label_pp,
        input_range=1.0,
        size_rule=_DEPLOY_SIZES,
        receptive_field=None,  # max pooling + interpolation: grid-dependent, ~70 px measured
        dynamic_shapes=True,
        signature_keys=(
            "to_feat.weight",
            "feats.0.conv1.proj.weight",
            "feats.0.conv1.dwconv.weight",
            "to_img.0.weight",
        ),
        aliases=("safmn_pp", "safmnplusplus"),
    )
)

SAFMN_NTIRE23_SPEC = register(
    ModelSpec(
        name="safmn_ntire23",
        description="SAFMN NTIRE 2023 ESR entry (team15): one shared GRN norm, bias-free blocks, bilinear skip",
        variants=(
            Variant(
                "base",
                {"dim": 36, "n_blocks": 8, "ffn_scale": 2.0},
                scales=(2, 3, 4),
                default_scale=4,
                description="NTIRE2023_ESR/models/team15_SAFMN.py: dim 36, 8 blocks; 237,000 params at x4 "
                "(only x4 released)",
                checkpoint_key="params",  # NTIRE2023_ESR/test_demo.py loads ['params']
            ),
        ),
        default_variant="base",
        build_fn=_build_safmn23,
        read_config=_read_safmn23,
        custom_label=_label,
        input_range=1.0,
        # The coarsest SAFM level pools to h // 16: fixed 16x16 windows are exact for multiples of 16.
        size_rule=SizeRule(min_size=MIN_SIZE_NTIRE23, multiple_of=16),
        # GRN divides by the L2 norm over all of H x W: a tile normalises by its own statistics.
        tiling_inexact=lambda config: "GRN normalises by whole-image statistics (L2 norm over H x W)",
        dynamic_shapes=True,
        signature_keys=("norm.gamma", "to_feat.weight", "feats.0.safm.aggr.weight", "to_img.0.weight"),
        aliases=("safmn23", "safmn_2023"),
    )
)
