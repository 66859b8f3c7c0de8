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


# --- SoftPool ----------------------------------------------------------------------

# --- Dynamic convolution -----------------------------------------------------------
