"""Export-safe building blocks.

Each block is mathematically equal to the export-hostile op it replaces (fp64 error at
rounding level).  Model files register rewrite rules (keyed by their own module types)
that build their deploy form from these blocks; nothing here knows model names.

Sections are owned by topic; add to a section, keep blocks small and documented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SizeRuleError

# --- Real DFT (rfft2 / irfft2 as factorized matmuls) -------------------------------
from .dft import RealIRFFT2, RealRFFT2, unit_phase  # noqa: E402,F401

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


class ChannelNormShift(nn.Module):
    """Channels-first LayerNorm without the scale: ``(x - u) / sqrt(s + eps) + shift``.

    ``u``/``s`` are the mean and *biased* variance over channels, computed in the same
    op order as the BasicSR/ConvNeXt channels-first LayerNorm.  This is what remains of
    ``g * n + b`` after the scale ``g`` is folded into a following zero-padded conv:
    ``conv_W(g*n + b) == conv_{W*g}(n + b/g)`` exactly (the padding stays zero on both
    sides), provided every ``g`` is nonzero.
    """

    def __init__(self, shift: torch.Tensor, eps: float):
        super().__init__()
        self.shift = nn.Parameter(shift.detach().clone())
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return x + self.shift[:, None, None]

    def extra_repr(self) -> str:
        return f"{self.shift.numel()}, eps={self.eps}"


class ChannelLayerNorm(nn.Module):
    """Channels-first LayerNorm in plain ops: ``w * (x - u) / sqrt(s + eps) + b``.

    ``u``/``s`` are the mean and *biased* variance over dim 1, in the op order of the
    NAFNet/DarkIR ``LayerNormFunction`` and the ConvNeXt channels-first LayerNorm, so it is
    bit-identical to both.  It replaces autograd-Function LayerNorms (which exporters may
    emit as PythonOp).  ``weight``/``bias`` may be ``None`` when the affine part has been
    folded into a following 1x1 conv (then it is the bare normalisation).
    """

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
        super().__init__()
        self.weight = None if weight is None else nn.Parameter(weight.detach().clone().reshape(-1))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().reshape(-1))
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        d = x - u
        s = d.pow(2).mean(1, keepdim=True)
        y = d / (s + self.eps).sqrt()
        if self.weight is not None:
            y = self.weight[:, None, None] * y
        if self.bias is not None:
            y = y + self.bias[:, None, None]
        return y

    def extra_repr(self) -> str:
        n = "no affine" if self.weight is None and self.bias is None else "affine"
        return f"{n}, eps={self.eps}"


# --- SoftPool ----------------------------------------------------------------------


class WindowSoftPool2d(nn.Module):
    """SoftPool ``AvgPool(e^x * x) / AvgPool(e^x)`` (no padding) as an overflow-free window softmax.

    For every k x k window (stride s) of every channel, with ``m`` the window maximum and
    ``d_i = x_i - m <= 0``::

        y = m + sum_i e^{d_i} d_i / sum_i e^{d_i}

    which is the SoftPool value ``sum_i e^{x_i} x_i / sum_i e^{x_i}`` rewritten (the 1/k^2 of
    both averages and the factor e^m cancel).  Every exponent is <= 0 (no overflow), the
    denominator is in [1, k^2] (the maximal tap gives e^0, so no 0/0) and every numerator
    term ``e^d d`` lies in [-1/e, 0], so no intermediate exceeds the input's magnitude:
    it stays finite in fp16 for inputs up to the fp16 range, where the original overflows
    for x > ~11 (fp16) or ~88 (fp32).

    Built only from convolutions with constant 0/1 kernels, a max-pool and elementwise
    ops -- no reshape and no softmax over a non-channel axis -- so it exports with symbolic
    H, W to ONNX and TFLite:

    - ``taps``: depthwise one-hot k x k conv (multiplier k^2): channel ``c*k^2 + t`` holds
      tap ``t`` of channel ``c``.  Exact for finite inputs (one product by 1.0, others by 0).
    - ``m``: ``max_pool2d(k, s)`` (exact), spread to the k^2 tap channels of its channel by a
      depthwise 1x1 conv with ones (exact).
    - ``gather``: a grouped 1x1 conv with ones (groups = channels) sums the k^2 taps of each
      channel (converts to a grouped CONV_2D in TFLite; 3-4x cheaper than a dense
      block-diagonal 1x1).

    Output size is ``floor((H - k) / s) + 1`` like ``AvgPool2d(k, s, padding=0)``; needs
    ``H, W >= k``.  ``channels`` fixes the constant kernels' sizes.
    """

    def __init__(self, channels: int, kernel_size: int = 7, stride: int | None = None):
        super().__init__()
        k = int(kernel_size)
        k2 = k * k
        self.channels = int(channels)
        self.kernel_size = k
        self.stride = int(stride or k)
        c = self.channels
        taps = torch.eye(k2).view(k2, 1, k, k).repeat(c, 1, 1, 1)
        self.register_buffer("taps", taps, persistent=False)
        self.register_buffer("spread", torch.ones(c * k2, 1, 1, 1), persistent=False)
        self.register_buffer("gather", torch.ones(c, k2, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.channels
        p = F.conv2d(x, self.taps, stride=self.stride, groups=c)
        m = F.max_pool2d(x, self.kernel_size, self.stride)
        d = p - F.conv2d(m, self.spread, groups=c)
        e = torch.exp(d)
        return m + F.conv2d(e * d, self.gather, groups=c) / F.conv2d(e, self.gather, groups=c)


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
