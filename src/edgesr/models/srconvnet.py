"""SRConvNet (lifengcs/SRConvNet, ``models/m_block.py`` + ``models/m_network.py``).

Train-time form with the official state-dict keys, written from the spec
(``specs/srconvnet_darkir.md`` §1.1/§2.1).  The forward pass is the official one with
three deliberate, output-preserving differences:

- The removed ``torch.rfft``/``torch.irfft`` calls are expressed with ``torch.fft``:
  ``view_as_real(rfft2(x, norm='ortho'))`` and ``irfft2(view_as_complex(z), s=(H, W),
  norm='ortho')`` (``normalized=True`` is the orthonormal scaling).
- ``FConvMod`` splits the flattened H*W axis into ``N // 4`` chunks and concatenates
  them again before a *global* softmax; everything in between is elementwise, so the
  split is a no-op and is not reproduced.  That split is also the only reason the
  official code needs ``H * W >= 4``: this implementation accepts any H, W >= 1.
- The three feature-map dumping calls in ``FConvMod.forward`` (undefined names,
  ``x.cpu().numpy()``) cannot run and are dropped.

I/O: RGB in **[0, 255]** in and out (``rgb_range=255``, no normalisation).  The
``sub_mean``/``add_mean`` ``MeanShift`` convs are built and stored (frozen) exactly as
the official model does, but ``forward`` never uses them.

Non-Hermitian spectra.  The 1x1 conv + GELU between ``rfft2`` and ``irfft2`` produces a
spectrum whose DC/Nyquist columns are not Hermitian.  The canonical definition here is
torch-CPU / numpy semantics: full complex inverse along H, then C2R along W, which
ignores the imaginary parts of the DC (and, for even W, Nyquist) columns *after* the H
inverse.  Equivalently, those spectrum columns are replaced by their Hermitian part
along H, ``(Z[m] + conj(Z[-m])) / 2`` (tests/test_srconvnet.py checks both forms).  A
backend that instead rebuilds half of those columns from the other half, as a
Hermitian-assuming 2-D C2R may, gives different outputs: CUDA ``irfft2`` is known to
differ on such input (pytorch#154496, #104867), and SRConvNet was most likely trained
with the legacy CUDA ``torch.irfft``.  Not checked on a GPU here.

Deploy form (``edgesr.deploy``): folds drop the MeanShift modules and replace the
channel interleave before ``proj_out`` by a concat plus permuted ``proj_out`` columns;
rewrites turn ``FourierUnit`` into a real matmul DFT (bases baked per input size, so
``dynamic_shapes=False``), ``KernelAttention`` into mean + linear layers, and the
dynamic convolution into either a runtime-filter depthwise conv (default) or a
constant depthwise bank (``edgesr.reparam.safe_ops.dynamic_conv_form("constant")``).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..reparam.rules import register_fold, register_rewrite
from .registry import Misfit, ModelSpec, SizeRule, StateDict, Variant, register

RGB_MEAN = (0.4488, 0.4371, 0.4040)


# ----------------------------------------------------------------------------------
# Train-time modules (official names and parameter layout)
# ----------------------------------------------------------------------------------


class MeanShift(nn.Conv2d):
    """Fixed 1x1 conv ``x - sign*range*mean`` (built and saved, never used in forward)."""

    def __init__(self, rgb_range: float, rgb_mean=RGB_MEAN, rgb_std=(1.0, 1.0, 1.0), sign: int = -1):
        super().__init__(3, 3, kernel_size=1)
        std = torch.tensor(rgb_std)
        self.weight.data = torch.eye(3).view(3, 3, 1, 1) / std.view(3, 1, 1, 1)
        self.bias.data = sign * rgb_range * torch.tensor(rgb_mean) / std
        for p in self.parameters():
            p.requires_grad = False


class LayerNorm(nn.Module):
    """ConvNeXt LayerNorm; SRConvNet only uses ``channels_first`` (biased variance, eps 1e-6)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-6, data_format: str = "channels_last"):
        super().__init__()
        if data_format not in ("channels_last", "channels_first"):
            raise NotImplementedError(data_format)
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        self.normalized_shape = (normalized_shape,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class FourierUnit(nn.Module):
    """rfft2(ortho) -> interleaved [re_0, im_0, re_1, ...] -> 1x1 conv -> GELU -> irfft2.

    ``fft_norm`` is stored but ignored, as officially (the transform is always
    orthonormal); ``groups`` goes to the 1x1 conv and is always 1 in SRConvNet.
    """

    def __init__(self, dim: int, groups: int = 1, fft_norm: str = "ortho"):
        super().__init__()
        self.groups = groups
        self.fft_norm = fft_norm
        self.conv_layer = nn.Conv2d(dim * 2, dim * 2, kernel_size=1, stride=1, padding=0, groups=groups, bias=False)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # Legacy torch.rfft(signal_ndim=2, normalized=True) == rfft2(norm="ortho").
        f = torch.view_as_real(torch.fft.rfft2(x, norm="ortho"))  # (b, c, h, wf, 2)
        wf = f.shape[-2]
        f = f.permute(0, 1, 4, 2, 3).reshape(b, 2 * c, h, wf)  # channel 2k = re_k, 2k+1 = im_k
        f = self.act(self.conv_layer(f))
        f = f.view(b, c, 2, h, wf).permute(0, 1, 3, 4, 2).contiguous()
        return torch.fft.irfft2(torch.view_as_complex(f), s=(h, w), norm="ortho")


class FConvMod(nn.Module):
    """Fourier modulation: ``x + proj(softmax_HW(layer_scale * FU(n) * v(n)) + CPE(x))``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = LayerNorm(dim, eps=1e-6, data_format="channels_first")
        self.a = FourierUnit(dim)
        self.v = nn.Conv2d(dim, dim, 1)
        self.act = nn.GELU()  # official: built, never used
        self.layer_scale = nn.Parameter(1e-6 * torch.ones(num_heads))
        self.CPE = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        shortcut = x
        pos_embed = self.CPE(x)
        x = self.norm(x)
        a = self.a(x)
        v = self.v(x)
        heads = self.num_heads
        # 'b (head c) h w -> b head c (h w)'; the official N//4 split + cat is a no-op.
        attn = (a * v).reshape(b, heads, c // heads, h * w)
        attn = self.layer_scale.view(1, heads, 1, 1) * attn
        attn = F.softmax(attn, dim=-1).reshape(b, c, h, w)
        return self.proj(attn + pos_embed) + shortcut


class KernelAggregation(nn.Module):
    """Per-sample kernel ``sum_k att[b,k] W_k`` applied as one batch-folded grouped conv."""

    def __init__(self, dim: int, kernel_size: int, groups: int, num_kernels: int, bias: bool = True):
        super().__init__()
        self.groups = groups
        self.num_kernels = num_kernels
        self.kernel_size = kernel_size
        self.dim = dim
        self.weight = nn.Parameter(torch.randn(num_kernels, dim, dim // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(num_kernels, dim)) if bias else None
        for i in range(num_kernels):
            nn.init.kaiming_uniform_(self.weight[i])

    def forward(self, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        k = self.kernel_size
        x = x.contiguous().view(1, b * self.dim, h, w)
        weight = torch.mm(attention, self.weight.view(self.num_kernels, -1))
        weight = weight.view(b * self.dim, self.dim // self.groups, k, k)
        bias = torch.mm(attention, self.bias).view(-1) if self.bias is not None else None
        x = F.conv2d(x, weight, bias, stride=1, padding=k // 2, groups=self.groups * b)
        return x.view(b, self.dim, x.shape[-2], x.shape[-1])


class KernelAttention(nn.Module):
    """GAP -> 1x1 -> GELU -> 1x1 -> sigmoid: one weight per kernel, shape (B, K)."""

    def __init__(self, dim: int, reduction: int = 8, num_kernels: int = 8):
        super().__init__()
        mid = dim // reduction if dim != 3 else num_kernels
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv1 = nn.Conv2d(dim, mid, 1)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(mid, num_kernels, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.act(self.conv1(self.avg_pool(x))))
        return self.sigmoid(x.view(x.shape[0], -1))


class DynamicKernelAggregation(nn.Module):
    def __init__(self, dim: int, kernel_size: int, groups: int = 1, num_kernels: int = 4):
        super().__init__()
        assert dim % groups == 0
        self.attention = KernelAttention(dim, num_kernels=num_kernels)
        self.aggregation = KernelAggregation(dim, kernel_size=kernel_size, groups=groups, num_kernels=num_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aggregation(x, self.attention(x))


class DyConv(nn.Module):
    """Dynamic conv for ``num_kernels > 1``; otherwise (never in the released config) a
    plain conv *without padding*, exactly as the official code (it breaks the residual)."""

    def __init__(self, dim: int, kernel_size: int, groups: int, num_kernels: int = 1):
        super().__init__()
        if num_kernels > 1:
            self.conv = DynamicKernelAggregation(dim, kernel_size=kernel_size, groups=groups, num_kernels=num_kernels)
        else:
            self.conv = nn.Conv2d(dim, dim, kernel_size=kernel_size, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class MixFFN(nn.Module):
    """LN -> 1x1 (dim->2dim) -> GELU -> split -> dyn DW 5x5 | dyn DW 7x7 -> GELU ->
    channel interleave [x1_0, x2_0, x1_1, ...] -> 1x1 (2dim->dim) -> + shortcut."""

    def __init__(self, dim: int, num_kernels: int):
        super().__init__()
        self.proj_in = nn.Conv2d(dim, dim * 2, 1)
        self.conv1 = DyConv(dim, kernel_size=5, groups=dim, num_kernels=num_kernels)
        self.conv2 = DyConv(dim, kernel_size=7, groups=dim, num_kernels=num_kernels)
        self.proj_out = nn.Conv2d(dim * 2, dim, 1)
        self.norm = LayerNorm(dim, eps=1e-6, data_format="channels_first")
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act(self.proj_in(self.norm(x)))
        x1, x2 = torch.chunk(x, 2, dim=1)
        x1 = self.act(self.conv1(x1))
        x2 = self.act(self.conv2(x2))
        b, c, h, w = x1.shape
        # rearrange('b c g h w -> b (c g) h w') of stack([x1, x2], dim=2)
        x = torch.stack([x1, x2], dim=2).reshape(b, 2 * c, h, w)
        return self.proj_out(x) + shortcut


class BasicBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kernels: int):
        super().__init__()
        self.attention = FConvMod(dim, num_heads)
        self.ffn = MixFFN(dim, num_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.attention(x))


class SRConvNet(nn.Module):
    """The official ``SRNet``: ``tail(up(blocks(f) + f)) + bilinear(x)``, f = to_feat(x)."""

    def __init__(
        self,
        scale: int = 4,
        dim: int = 64,
        num_blocks: int = 8,
        num_heads: int = 8,
        num_kernels: int = 16,
        colors: int = 3,
        rgb_range: float = 255.0,
    ):
        super().__init__()
        self.sub_mean = MeanShift(rgb_range)
        self.add_mean = MeanShift(rgb_range, sign=1)
        self.scale = scale
        self.num_heads = num_heads
        self.num_kernels = num_kernels
        self.colors = colors
        self.dim = dim
        self.num_blocks = num_blocks
        self.to_feat = nn.Conv2d(colors, dim, kernel_size=3, stride=1, padding=1)
        self.blocks = nn.Sequential(*[BasicBlock(dim, num_heads, num_kernels) for _ in range(num_blocks)])
        if scale == 4:
            self.upsampling = nn.Sequential(
                nn.Conv2d(dim, dim * 4, 1, 1, 0),
                nn.PixelShuffle(2),
                nn.GELU(),
                nn.Conv2d(dim, dim * 4, 1, 1, 0),
                nn.PixelShuffle(2),
                nn.GELU(),
            )
        else:
            self.upsampling = nn.Sequential(
                nn.Conv2d(dim, dim * scale * scale, 1, 1, 0),
                nn.PixelShuffle(scale),
                nn.GELU(),
            )
        self.tail = nn.Conv2d(dim, colors, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = x
        x = self.to_feat(x)
        x = self.blocks(x) + x
        x = self.tail(self.upsampling(x))
        base = F.interpolate(base, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return x + base


SRNet = SRConvNet  # the official class name


# ----------------------------------------------------------------------------------
# Folds (exact, target-independent)
# ----------------------------------------------------------------------------------


class MixFFNCat(nn.Module):
    """MixFFN with ``cat(x1, x2)`` instead of the channel interleave.

    ``proj_out`` columns are permuted to match: ``W' = cat(W[:, 0::2], W[:, 1::2])``.
    Output is mathematically identical (same products, summed in a different order).
    """

    def __init__(self, ffn: MixFFN):
        super().__init__()
        self.norm = ffn.norm
        self.proj_in = ffn.proj_in
        self.act = ffn.act
        self.conv1 = ffn.conv1
        self.conv2 = ffn.conv2
        old = ffn.proj_out
        self.proj_out = nn.Conv2d(old.in_channels, old.out_channels, 1)
        with torch.no_grad():
            w = old.weight
            self.proj_out.weight.copy_(torch.cat([w[:, 0::2], w[:, 1::2]], dim=1))
            self.proj_out.bias.copy_(old.bias)
        self.proj_out.to(old.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act(self.proj_in(self.norm(x)))
        x1, x2 = torch.chunk(x, 2, dim=1)
        x1 = self.act(self.conv1(x1))
        x2 = self.act(self.conv2(x2))
        return self.proj_out(torch.cat([x1, x2], dim=1)) + shortcut


@register_fold(MixFFN)
def _fold_mixffn(m: MixFFN) -> nn.Module:
    return MixFFNCat(m)


@register_fold(SRConvNet)
def _fold_drop_mean_shift(m: SRConvNet) -> nn.Module:
    # sub_mean/add_mean are stored in the checkpoint but never used by forward.
    for name in ("sub_mean", "add_mean"):
        if name in m._modules:
            del m._modules[name]
    return m


# ----------------------------------------------------------------------------------
# Export-safe rewrites
# ----------------------------------------------------------------------------------


class SafeKernelAttention(nn.Module):
    """``KernelAttention`` without adaptive pooling: spatial mean -> linear -> GELU ->
    linear -> sigmoid (the 1x1 convs on a 1x1 map are linear layers)."""

    def __init__(self, m: KernelAttention):
        super().__init__()
        c1, c2 = m.conv1, m.conv2
        self.fc1 = nn.Linear(c1.in_channels, c1.out_channels)
        self.fc2 = nn.Linear(c2.in_channels, c2.out_channels)
        with torch.no_grad():
            for fc, conv in ((self.fc1, c1), (self.fc2, c2)):
                fc.weight.copy_(conv.weight.reshape(conv.out_channels, conv.in_channels))
                fc.bias.copy_(conv.bias)
        self.to(c1.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return torch.sigmoid(self.fc2(F.gelu(self.fc1(x))))


class SafeDynamicConv(nn.Module):
    """``attention(x)`` -> (B, K) weights, then a safe dynamic depthwise conv block."""

    def __init__(self, attention: nn.Module, conv: nn.Module):
        super().__init__()
        self.attention = attention
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.attention(x))


@register_rewrite(KernelAttention)
def _safe_kernel_attention(m: KernelAttention, target: str) -> nn.Module:
    return SafeKernelAttention(m)


@register_rewrite(DynamicKernelAggregation)
def _safe_dynamic_conv(m: DynamicKernelAggregation, target: str) -> nn.Module:
    from ..reparam import safe_ops

    agg = m.aggregation
    if agg.groups != agg.dim or agg.weight.shape[2] != 1:
        return m  # only the depthwise case exists in SRConvNet
    form = safe_ops.dynamic_conv_form_for(target)
    block_type = safe_ops.RuntimeDepthwiseConv if form == "runtime" else safe_ops.DepthwiseConvBank
    block = block_type(agg.weight.detach(), None if agg.bias is None else agg.bias.detach(), agg.kernel_size // 2)
    return SafeDynamicConv(m.attention, block)


_TRACE_DFT: dict[tuple, tuple[nn.Module, nn.Module]] = {}


@torch._dynamo.assume_constant_result
def _build_trace_dft(height: int, width: int, dtype: torch.dtype, device: torch.device,
                     layout: str) -> int:
    """Fill ``_TRACE_DFT`` for one size.  Under dynamo (strict export) this runs eagerly
    and its result is taken as a constant, so the bases are computed outside the graph."""
    from ..reparam.safe_ops import per_bin_dft

    key = (height, width, dtype, device, layout)
    if key not in _TRACE_DFT:
        while len(_TRACE_DFT) >= 8:
            _TRACE_DFT.pop(next(iter(_TRACE_DFT)))
        _TRACE_DFT[key] = tuple(m.to(device) for m in per_bin_dft(height, width, "ortho", dtype, layout))
    return 0


def _trace_time_dft(height: int, width: int, dtype: torch.dtype, device: torch.device,
                    layout: str = "onnx"):
    """DFT modules with *real* constant bases while a graph is being traced.

    Strict export (dynamo): via ``assume_constant_result``.  Non-strict export (fake
    tensors + proxy tracing, e.g. litert-torch's default): built with fake mode and
    proxy tracing switched off, so they are real tensors that the exporter lifts as
    constants instead of recording the basis computation.
    """
    if torch.compiler.is_dynamo_compiling():
        _build_trace_dft(height, width, dtype, device, layout)
    else:
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

        with unset_fake_temporarily(), disable_proxy_modes_tracing():
            _build_trace_dft(height, width, dtype, device, layout)
    return _TRACE_DFT[(height, width, dtype, device, layout)]


class SafeFourierUnit(nn.Module):
    """``FourierUnit`` with a real matmul DFT and ``[all re | all im]`` channel order.

    The 1x1 conv rows and columns are permuted from the interleaved order
    ``[re_0, im_0, re_1, ...]`` to ``[re_0..re_{C-1}, im_0..im_{C-1}]`` (exact), so the
    spectrum halves are concatenated and split instead of stacked and reshaped.

    DFT bases depend on the input size (one graph per export size).  They are built
    lazily for the (H, W, dtype, device) of the call and kept as *non-persistent*
    buffers of ``self.rfft``/``self.irfft`` (one size at a time; a new size rebuilds):

    - eager call, or :meth:`prepare` ``(h, w)``, before ``torch.export``: the bases are
      ordinary module buffers of the exported program (recommended: the export step runs
      an eager reference forward at the export size anyway);
    - ``torch.export`` (strict or not) with no bases for the traced size: they are built
      outside the graph (:func:`_trace_time_dft`) and enter the exported program as
      constant tensors, shared by all units of the same size.

    Either way the graph holds no trig/arange ops, only matmuls against constants.  For
    B > 1 nothing changes (the DFT is applied per (batch, channel) plane).  ``layout``
    (= the export target) picks the DFT pair (:func:`edgesr.reparam.dft_spectral.per_bin_dft`).
    """

    def __init__(self, m: FourierUnit, layout: str = "onnx"):
        super().__init__()
        self.layout = layout  # DFT pair, = the export target (edgesr.reparam.dft_spectral.per_bin_dft)
        w = m.conv_layer.weight
        if m.conv_layer.groups != 1:
            raise ValueError("SafeFourierUnit supports groups=1 only")
        c2 = w.shape[0]
        perm = torch.cat([torch.arange(0, c2, 2), torch.arange(1, c2, 2)])
        self.conv = nn.Conv2d(c2, c2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(w[perm][:, perm])
        self.conv.to(device=w.device, dtype=w.dtype)
        self.act = nn.GELU()
        self.rfft: nn.Module | None = None
        self.irfft: nn.Module | None = None
        self._key: tuple | None = None

    def prepare(self, height: int, width: int, dtype: torch.dtype | None = None,
                device: torch.device | None = None) -> "SafeFourierUnit":
        """Build the DFT bases for a (height, width) input (no-op if already built)."""
        from ..reparam.safe_ops import per_bin_dft

        dtype = dtype or self.conv.weight.dtype
        device = torch.device(device) if device is not None else self.conv.weight.device
        key = (int(height), int(width), dtype, device)
        if self._key != key:
            rfft, irfft = per_bin_dft(key[0], key[1], "ortho", dtype, self.layout)
            self.rfft, self.irfft = rfft.to(device), irfft.to(device)
            self._key = key
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = x.shape[-3:]
        key = (h, w, x.dtype, x.device)
        if self._key == key:
            rfft, irfft = self.rfft, self.irfft
        elif torch.compiler.is_compiling():
            rfft, irfft = _trace_time_dft(h, w, x.dtype, x.device, self.layout)
        else:
            self.prepare(h, w, x.dtype, x.device)
            rfft, irfft = self.rfft, self.irfft
        re, im = rfft(x)
        y = self.act(self.conv(torch.cat([re, im], dim=1)))
        return irfft(y[:, :c], y[:, c:])


@register_rewrite(LayerNorm)
def _layernorm_for_target(m: LayerNorm, target: str) -> nn.Module:
    """Kept as is, except where the channel mean runs faster as a matmul (onnxruntime)."""
    from ..reparam.safe_ops import channels_first_layernorm_for

    return channels_first_layernorm_for(m, target) if m.data_format == "channels_first" else m


@register_rewrite(FourierUnit)
def _safe_fourier_unit(m: FourierUnit, target: str) -> nn.Module:
    return SafeFourierUnit(m, layout=target)  # DFT pair tuned per runtime


# ----------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------

BASE = {"dim": 64, "num_blocks": 8, "num_heads": 8, "num_kernels": 16, "colors": 3, "rgb_range": 255.0}


def _build(config: Mapping[str, Any], scale: int) -> nn.Module:
    return SRConvNet(scale=scale, **config)


_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def _read_config(sd: StateDict) -> tuple[dict[str, Any], int] | None:
    fu = sd.get("blocks.0.attention.a.conv_layer.weight")
    agg = sd.get("blocks.0.ffn.conv1.conv.aggregation.weight")
    feat = sd.get("to_feat.weight")
    up0 = sd.get("upsampling.0.weight")
    ls = sd.get("blocks.0.attention.layer_scale")
    if not all(isinstance(t, torch.Tensor) for t in (fu, agg, feat, up0, ls)):
        return None
    if feat.dim() != 4 or up0.dim() != 4 or agg.dim() != 5 or fu.dim() != 4 or ls.dim() != 1:
        raise Misfit("to_feat/upsampling/aggregation/layer_scale tensors have the wrong number of dims")
    dim, colors = int(feat.shape[0]), int(feat.shape[1])
    if colors != 3:
        raise Misfit(f"to_feat.weight takes {colors} channels; edgesr models take RGB (3)")
    if tuple(fu.shape) != (2 * dim, 2 * dim, 1, 1):
        raise Misfit(f"blocks.0.attention.a.conv_layer.weight has shape {tuple(fu.shape)}, expected {(2 * dim, 2 * dim, 1, 1)}")
    num_kernels, num_heads = int(agg.shape[0]), int(ls.shape[0])
    if tuple(agg.shape) != (num_kernels, dim, 1, 5, 5):
        raise Misfit(f"blocks.0.ffn.conv1.conv.aggregation.weight has shape {tuple(agg.shape)}, "
                     f"expected ({num_kernels}, {dim}, 1, 5, 5)")
    if num_heads < 1 or dim % num_heads:
        raise Misfit(f"blocks.0.attention.layer_scale gives {num_heads} heads, which do not divide dim {dim}")
    idx = {int(m.group(1)) for k in sd if isinstance(k, str) and (m := _BLOCK_RE.match(k))}
    if idx != set(range(len(idx))):
        raise Misfit("blocks.N indices are not 0..N-1 without gaps")
    out = int(up0.shape[0])
    if "upsampling.3.weight" in sd:
        scale = 4 if out == 4 * dim else None
    else:
        s = math.isqrt(out // dim) if out % dim == 0 else 0
        scale = s if s * s * dim == out and s in (2, 3) else None
    if scale is None:
        raise Misfit(f"upsampling.0.weight has shape {tuple(up0.shape)}: no x2/x3/x4 upsampler of dim {dim}")
    config = {**BASE, "dim": dim, "num_blocks": len(idx), "num_heads": num_heads, "num_kernels": num_kernels}
    return config, scale


def _custom_label(config: Mapping[str, Any]) -> str:
    return f"dim{config['dim']}-b{config['num_blocks']}-h{config['num_heads']}-k{config['num_kernels']}"


def _detect(sd: StateDict) -> tuple[str, int] | None:
    return SPEC.detect(sd)


SPEC = register(
    ModelSpec(
        name="srconvnet",
        description="SRConvNet: Fourier modulation + dynamic mixing convs (lifengcs/SRConvNet, IJCV)",
        variants=(
            Variant(
                "base",
                BASE,
                scales=(2, 3, 4),
                default_scale=4,
                description="configs/config.yml: dim 64, 8 blocks, 8 heads, 16 kernels",
            ),
        ),
        default_variant="base",
        build_fn=_build,
        read_config=_read_config,
        custom_label=_custom_label,
        input_range=255.0,
        size_rule=SizeRule(min_size=1, multiple_of=1),
        dynamic_shapes=False,  # DFT bases are baked per input size
        receptive_field=None,  # FFT mixing: every output pixel sees the whole input
        tiling_inexact=lambda config: "FFT mixing: every output pixel sees the whole input",
        signature_keys=(
            "blocks.0.attention.a.conv_layer.weight",
            "blocks.0.attention.layer_scale",
            "blocks.0.ffn.conv1.conv.aggregation.weight",
        ),
    )
)
