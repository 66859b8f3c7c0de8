"""Export-safe building blocks.

Each block is mathematically equal to the export-hostile op it replaces (fp64 error at
rounding level).  Model files register rewrite rules (keyed by their own module types)
that build their deploy form from these blocks; nothing here knows model names.

Sections are owned by topic; add to a section, keep blocks small and documented.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SizeRuleError

# --- Real DFT (rfft2 / irfft2 as factorized matmuls) -------------------------------
from .dft import RealIRFFT2, RealRFFT2, unit_phase, with_magnitude  # noqa: E402,F401
from .dft_spectral import SpectralIRFFT2, SpectralRFFT2, per_bin_dft  # noqa: E402,F401

# --- Pooling and resizing ----------------------------------------------------------


def require_multiple(x: torch.Tensor, k: int, what: str) -> None:
    """Require ``H, W`` of ``x`` to be positive multiples of ``k`` (exactness of fixed windows).

    Eager / static shapes: raises :class:`SizeRuleError` (one line).  Symbolic shapes
    (``torch.export`` with ``Dim``): ``torch._check`` instead, so capture succeeds when the
    dims are declared as multiples of ``k`` (``8 * Dim("h")``: the check is statically true
    and leaves no assert in the graph) and fails with torch's constraint-violation message
    (naming the ``% k`` guard) for a plain ``Dim``.  A *static* size that breaks the rule
    cannot surface as ``SizeRuleError`` from inside a dynamo trace (dynamo reports an
    "Observed exception"), so exporters check the spec's size rule before tracing.
    """
    h, w = x.shape[-2], x.shape[-1]
    if isinstance(h, torch.SymInt) or isinstance(w, torch.SymInt):
        torch._check(h % k == 0, lambda: f"{what}: height must be a multiple of {k}")
        torch._check(w % k == 0, lambda: f"{what}: width must be a multiple of {k}")
        torch._check(h >= k, lambda: f"{what}: height must be >= {k}")
        torch._check(w >= k, lambda: f"{what}: width must be >= {k}")
        return
    if h % k or w % k or h < k or w < k:
        raise SizeRuleError(
            f"{what} needs height and width that are positive multiples of {k} "
            f"(fixed {k}x{k} pooling windows are exact only then), got {h}x{w}"
        )


class FixedWindowMaxPool(nn.Module):
    """``F.adaptive_max_pool2d(x, (H // k, W // k))`` as ``F.max_pool2d(x, k, k)``.

    Exact (bit-identical) when ``H`` and ``W`` are multiples of ``k``: PyTorch's adaptive
    windows ``[floor(i*H/oh), ceil((i+1)*H/oh))`` are then exactly ``[i*k, (i+1)*k)``.
    Other sizes raise :class:`SizeRuleError` (see :func:`require_multiple`) rather than
    drift.  Shape-agnostic: no adaptive op, no size-dependent attributes.
    """

    def __init__(self, k: int, what: str = "fixed-window max-pool"):
        super().__init__()
        self.k = int(k)
        self.what = what

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        require_multiple(x, self.k, self.what)
        return F.max_pool2d(x, self.k, self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}"


class IntegerUpsample(nn.Module):
    """``F.interpolate(x, size=(k*h, k*w), mode)`` as ``scale_factor=k`` (shape-agnostic).

    ``nearest``: PyTorch's legacy nearest reads source ``floor(dst * in/out)``; with
    ``out = k*in`` that is ``floor(dst / k)`` in both forms (exact for any integer k; for
    k a power of two ``1/k`` is also exact in floating point).  ``bilinear`` with
    ``align_corners=False``: the source coordinate ``(dst + 0.5) * in/out - 0.5`` equals
    ``(dst + 0.5) / k - 0.5`` in both forms, so the outputs are identical.
    """

    def __init__(self, k: int, mode: str = "nearest"):
        super().__init__()
        if mode not in ("nearest", "bilinear"):
            raise ValueError(f"unsupported mode {mode!r}")
        self.k = int(k)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "nearest":
            return F.interpolate(x, scale_factor=self.k, mode="nearest")
        return F.interpolate(x, scale_factor=self.k, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"k={self.k}, mode={self.mode}"


# --- Normalisation -----------------------------------------------------------------


# onnxruntime (1.31, CPU) runs ReduceMean over the channel axis of an NCHW tensor on one
# thread: 25 ms for 64x256x256 at 1 and at 2 threads, where the same mean as a ones-row
# MatMul (a GEMV over the channels) takes 1.1 / 0.5 ms -- and SRConvNet / SAFMN / DarkIR
# take two such means per channels-first LayerNorm.  (A 1x1 conv would be 6.2 / 3.3 ms
# alone, but in a model its NCHWc layout reorders ate most of the gain.)  LiteRT sees
# NHWC, where the channel mean is a MEAN over the innermost axis and already fast, so
# there the official op order is kept.
MATMUL_MEAN_TARGETS = frozenset({"onnx"})


def _channel_mean(x: torch.Tensor, ones: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of (B, C, H, W): ``x.mean(1, keepdim=True)``, or with ``ones`` (a
    (1, C) row of ones) the channel sum as one matmul over the flattened plane, divided by
    C (summation order differs: rounding level, not bit-equal).  Ones, not 1/C: exact in
    every dtype, so a module built in one precision and cast to another stays exact."""
    if ones is None:
        return x.mean(1, keepdim=True)
    if ones.dtype != x.dtype or ones.device != x.device:
        # follow x (a bare norm has no parameter to take dtype/device from when it is built);
        # only when needed: an exported ``.to`` would make the row a computed tensor.
        ones = ones.to(device=x.device, dtype=x.dtype)
    b, c, h, w = x.shape
    return torch.matmul(ones, x.reshape(b, c, h * w)).reshape(b, 1, h, w) / c


class _ChannelNormBase(nn.Module):
    """Shared by the channels-first norms: the optional matmul channel mean."""

    def _init_mean(self, channels: int, mean_as_matmul: bool, like: torch.Tensor | None) -> None:
        self.channels = int(channels)
        ones = None
        if mean_as_matmul:
            kw = {} if like is None else {"dtype": like.dtype, "device": like.device}
            ones = torch.ones((1, self.channels), **kw)
        self.register_buffer("ones", ones, persistent=False)

    @property
    def mean_as_matmul(self) -> bool:
        return self.ones is not None

    def export_safe(self, target: str) -> nn.Module:
        """This norm with matmul channel means for :data:`MATMUL_MEAN_TARGETS` (a copy), else itself."""
        if target not in MATMUL_MEAN_TARGETS or self.mean_as_matmul:
            return self
        fast = copy.deepcopy(self)
        fast._init_mean(self.channels, True, next(self.parameters(), None))
        return fast

    def _moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x - u, s): centred input and biased variance over channels, ConvNeXt op order."""
        d = x - _channel_mean(x, self.ones)
        return d, _channel_mean(d.pow(2), self.ones)


class ChannelNormShift(_ChannelNormBase):
    """Channels-first LayerNorm without the scale: ``(x - u) / sqrt(s + eps) + shift``.

    ``u``/``s`` are the mean and *biased* variance over channels, computed in the same
    op order as the BasicSR/ConvNeXt channels-first LayerNorm.  This is what remains of
    ``g * n + b`` after the scale ``g`` is folded into a following zero-padded conv:
    ``conv_W(g*n + b) == conv_{W*g}(n + b/g)`` exactly (the padding stays zero on both
    sides), provided every ``g`` is nonzero.  ``mean_as_matmul``: the channel means as
    matmuls with a ones row (:data:`MATMUL_MEAN_TARGETS`; what ``export_safe`` gives there).
    """

    def __init__(self, shift: torch.Tensor, eps: float, mean_as_matmul: bool = False):
        super().__init__()
        self.shift = nn.Parameter(shift.detach().clone())
        self.eps = float(eps)
        self._init_mean(shift.numel(), mean_as_matmul, shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, s = self._moments(x)
        return d / torch.sqrt(s + self.eps) + self.shift[:, None, None]

    def extra_repr(self) -> str:
        return f"{self.shift.numel()}, eps={self.eps}" + (", mean as matmul" if self.mean_as_matmul else "")


class ChannelLayerNorm(_ChannelNormBase):
    """Channels-first LayerNorm in plain ops: ``w * (x - u) / sqrt(s + eps) + b``.

    ``u``/``s`` are the mean and *biased* variance over dim 1, in the op order of the
    NAFNet/DarkIR ``LayerNormFunction`` and the ConvNeXt channels-first LayerNorm, so it is
    bit-identical to both (with ``mean_as_matmul``, rounding-level: the means are matmuls
    with a ones row, see :data:`MATMUL_MEAN_TARGETS`).  It replaces autograd-Function LayerNorms (which
    exporters may emit as PythonOp).  ``weight``/``bias`` may be ``None`` when the affine
    part has been folded into a following 1x1 conv (then it is the bare normalisation and
    ``channels`` must be given).
    """

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                 channels: int | None = None, mean_as_matmul: bool = False):
        super().__init__()
        self.weight = None if weight is None else nn.Parameter(weight.detach().clone().reshape(-1))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().reshape(-1))
        self.eps = float(eps)
        ref = weight if weight is not None else bias
        if channels is None:
            if ref is None:
                raise ValueError("ChannelLayerNorm without weight and bias needs channels=")
            channels = ref.numel()
        self._init_mean(channels, mean_as_matmul, ref)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, s = self._moments(x)
        y = d / (s + self.eps).sqrt()
        if self.weight is not None:
            y = self.weight[:, None, None] * y
        if self.bias is not None:
            y = y + self.bias[:, None, None]
        return y

    def extra_repr(self) -> str:
        n = "no affine" if self.weight is None and self.bias is None else "affine"
        return f"{self.channels}, {n}, eps={self.eps}" + (", mean as matmul" if self.mean_as_matmul else "")


def channels_first_layernorm_for(m: nn.Module, target: str) -> nn.Module:
    """Rewrite of an official channels-first LayerNorm (``weight``, ``bias``, ``eps``; ConvNeXt
    op order): kept as is, except where the channel mean runs faster as a matmul."""
    if target not in MATMUL_MEAN_TARGETS:
        return m
    return ChannelLayerNorm(m.weight, m.bias, m.eps).export_safe(target)


# --- SoftPool ----------------------------------------------------------------------


class WindowSoftPool2d(nn.Module):
    """SoftPool ``AvgPool(e^x * x) / AvgPool(e^x)`` (no padding), overflow-free and separable.

    The SoftPool value of a window is ``sum_i e^{x_i} x_i / sum_i e^{x_i}`` (the 1/k^2 of both
    averages cancels).  It is computed in two passes with the online-softmax combination,
    every exponent taken relative to a maximum so that no exponent is positive:

    1. **rows**: for every 1 x k row segment at horizontal stride s (every row),
       ``r = max x``, ``S = sum e^{x-r}``, ``U = sum e^{x-r} (x-r)``;
    2. **columns**: for every k x 1 column of those partials at vertical stride s,
       ``M = max_j r_j``, ``a_j = e^{r_j-M}``, ``S' = sum_j a_j S_j``,
       ``U' = sum_j (a_j U_j + (a_j (r_j-M)) S_j)`` and ``y = M + U'/S'``.

    Bounds: ``S, S'`` are in [1, k] and [1, k^2] (the maximal tap contributes e^0, so no 0/0);
    ``e^d d`` and ``a (r-M)`` lie in [-1/e, 0]; ``U' >= -k^2/e``.  No intermediate exceeds
    the input's magnitude (the differences ``x - r`` at most twice it), so the result is
    finite in fp16 for inputs up to ~3e4, where the original overflows for x > ~11 (fp16) or
    ~88 (fp32).  (``a (r-M)`` is formed before the product with ``S``: ``(r-M) S`` alone
    could overflow fp16 where ``a`` underflows to 0, giving 0 * inf.)

    Built only from convolutions with constant 0/1 kernels, rectangular max-pools and
    elementwise ops -- no reshape, no slicing, no reduction over a non-channel axis -- so it
    exports with symbolic H, W to ONNX and to TFLite builtins:

    - ``row_taps`` / ``col_taps``: depthwise one-hot 1 x k / k x 1 convs (multiplier k,
      stride s along the pooled axis): channel ``c*k + t`` holds tap ``t`` of channel ``c``.
      Exact for finite inputs (one product by 1.0, the others by 0).
    - maxima: ``max_pool2d((1, k), (1, s))`` and ``max_pool2d((k, 1), (s, 1))`` (exact), spread
      to the k tap channels of their channel by a depthwise 1x1 conv with ones (exact).
    - ``gather``: a grouped 1x1 conv with ones (groups = channels) sums the k taps.

    Cost per input pixel and channel (k=7, s=3): the tap convs do ~2 k^2/s + 3 k^2/s^2 ~ 49
    multiply-adds and the passes touch ~25 intermediate elements, against k^4/s^2 ~ 267 and
    ~35 for a direct k^2-tap window softmax.

    Output size is ``floor((H - k) / s) + 1`` like ``AvgPool2d(k, s, padding=0)``; needs
    ``H, W >= k``.  ``channels`` fixes the constant kernels' sizes.
    """

    def __init__(self, channels: int, kernel_size: int = 7, stride: int | None = None):
        super().__init__()
        k = int(kernel_size)
        self.channels = int(channels)
        self.kernel_size = k
        self.stride = int(stride or k)
        c = self.channels
        eye = torch.eye(k)
        self.register_buffer("row_taps", eye.view(k, 1, 1, k).repeat(c, 1, 1, 1), persistent=False)
        self.register_buffer("col_taps", eye.view(k, 1, k, 1).repeat(c, 1, 1, 1), persistent=False)
        self.register_buffer("spread", torch.ones(c * k, 1, 1, 1), persistent=False)
        self.register_buffer("gather", torch.ones(c, k, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, k, s = self.channels, self.kernel_size, self.stride
        # rows: 1 x k segments, stride s along W
        r = F.max_pool2d(x, (1, k), (1, s))
        d = F.conv2d(x, self.row_taps, stride=(1, s), groups=c) - F.conv2d(r, self.spread, groups=c)
        e = torch.exp(d)
        row_s = F.conv2d(e, self.gather, groups=c)
        row_u = F.conv2d(e * d, self.gather, groups=c)
        # columns: k x 1 windows of row partials, stride s along H
        m = F.max_pool2d(r, (k, 1), (s, 1))
        dm = F.conv2d(r, self.col_taps, stride=(s, 1), groups=c) - F.conv2d(m, self.spread, groups=c)
        a = torch.exp(dm)
        st = F.conv2d(row_s, self.col_taps, stride=(s, 1), groups=c)
        ut = F.conv2d(row_u, self.col_taps, stride=(s, 1), groups=c)
        den = F.conv2d(a * st, self.gather, groups=c)
        num = F.conv2d(a * ut + (a * dm) * st, self.gather, groups=c)
        return m + num / den


# --- Dynamic convolution -----------------------------------------------------------

import contextlib  # noqa: E402
from contextvars import ContextVar  # noqa: E402
from typing import Iterator  # noqa: E402

DYNAMIC_CONV_FORMS = ("runtime", "constant")
#: Form used per export target when no override is active.  CPU runtimes (ORT, LiteRT
#: with XNNPACK) run runtime-computed filters fine and the kernel bank is ~3x slower
#: (notes/dry_run_export.md §2.5), so both targets default to ``"runtime"``.
DEFAULT_DYNAMIC_CONV_FORM = {"onnx": "runtime", "tflite": "runtime"}
_dynamic_conv_override: ContextVar[str | None] = ContextVar("edgesr_dynamic_conv_form", default=None)


@contextlib.contextmanager
def dynamic_conv_form(form: str) -> Iterator[None]:
    """Choose how per-sample dynamic convolutions are rewritten inside this block.

    ``"runtime"``: the kernel is mixed in-graph and fed to a depthwise conv as a computed
    weight (:class:`RuntimeDepthwiseConv`; cheapest, CPU targets).  ``"constant"``: one
    static depthwise conv bank with a constant filter plus an attention-weighted sum
    (:class:`DepthwiseConvBank`; for delegates / int8 that need constant filters)::

        with dynamic_conv_form("constant"):
            deployed = edgesr.deploy(model, "tflite")
    """
    if form not in DYNAMIC_CONV_FORMS:
        raise ValueError(f"unknown dynamic conv form {form!r} (known: {', '.join(DYNAMIC_CONV_FORMS)})")
    token = _dynamic_conv_override.set(form)
    try:
        yield
    finally:
        _dynamic_conv_override.reset(token)


def dynamic_conv_form_for(target: str) -> str:
    """The dynamic-conv form a rewrite for ``target`` should build (override, else default)."""
    return _dynamic_conv_override.get() or DEFAULT_DYNAMIC_CONV_FORM.get(target, "runtime")


def _bank_args(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int, int]:
    if weight.dim() != 5 or weight.shape[2] != 1 or weight.shape[3] != weight.shape[4]:
        raise ValueError(f"expected a depthwise kernel bank (K, C, 1, k, k), got {tuple(weight.shape)}")
    k_num, c = int(weight.shape[0]), int(weight.shape[1])
    if bias is not None and tuple(bias.shape) != (k_num, c):
        raise ValueError(f"expected bias of shape ({k_num}, {c}), got {tuple(bias.shape)}")
    return k_num, c, int(weight.shape[3])


class RuntimeDepthwiseConv(nn.Module):
    """``y[b] = sum_k att[b,k] * (W_k (*) x[b] + bias_k)`` with the kernel mixed in-graph.

    ``forward(x, att)`` with ``att`` of shape (B, K): ``w_b = att @ W`` (a matmul against a
    constant (K, C*k*k) bank), then a depthwise conv with that *computed* weight.  For
    B = 1 this is ``conv2d(x, w_0, groups=C)`` with no batch folding; for B > 1 the
    batch is folded into the channels (``groups = B*C``, static at export time), which is
    also what the train-time code does for every B.  Exact: it is the same expression.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, padding: int):
        super().__init__()
        self.num_kernels, self.channels, self.kernel_size = _bank_args(weight, bias)
        self.padding = int(padding)
        self.weight = nn.Parameter(weight.detach().reshape(self.num_kernels, -1).clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        k = self.kernel_size
        weight = torch.matmul(att, self.weight)  # (B, C*k*k)
        bias = None if self.bias is None else torch.matmul(att, self.bias)  # (B, C)
        if b == 1:
            return F.conv2d(x, weight.reshape(c, 1, k, k), None if bias is None else bias.reshape(c),
                            padding=self.padding, groups=c)
        y = F.conv2d(x.reshape(1, b * c, h, w), weight.reshape(b * c, 1, k, k),
                     None if bias is None else bias.reshape(b * c), padding=self.padding, groups=b * c)
        return y.reshape(b, c, y.shape[-2], y.shape[-1])

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernels={self.num_kernels}, k={self.kernel_size}, padding={self.padding}"


class DepthwiseConvBank(nn.Module):
    """Same map as :class:`RuntimeDepthwiseConv` with a *constant* filter.

    One static depthwise conv with channel multiplier K (weight
    ``W.permute(1,0,2,3,4).reshape(C*K, 1, k, k)``, output channel ``c*K + k``; bias
    ``bias.T.reshape(-1)``) computes every ``W_k (*) x + bias_k``; the result is reshaped
    to (B, C, K, H, W), weighted by ``att`` (B, 1, K, 1, 1) and summed over K.  Exact
    (linearity of the conv); costs K times the depthwise MACs.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, padding: int):
        super().__init__()
        self.num_kernels, self.channels, self.kernel_size = _bank_args(weight, bias)
        self.padding = int(padding)
        kn, c, k = self.num_kernels, self.channels, self.kernel_size
        self.weight = nn.Parameter(weight.detach().permute(1, 0, 2, 3, 4).reshape(c * kn, 1, k, k).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().t().reshape(-1).contiguous())

    def forward(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = F.conv2d(x, self.weight, self.bias, padding=self.padding, groups=c)  # (B, C*K, H', W')
        y = y.reshape(b, c, self.num_kernels, y.shape[-2], y.shape[-1])
        return (y * att.reshape(b, 1, self.num_kernels, 1, 1)).sum(dim=2)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernels={self.num_kernels}, k={self.kernel_size}, padding={self.padding}"
