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

# --- Normalisation -----------------------------------------------------------------

# --- SoftPool ----------------------------------------------------------------------

# --- Dynamic convolution -----------------------------------------------------------
