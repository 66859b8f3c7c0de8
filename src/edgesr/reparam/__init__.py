"""Deploy transformation: exact folds, then export-safe rewrites.

``deploy(model) == make_export_safe(fold(model)[0])``; both steps work on deep copies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..models.registry import input_range_of, probe_size
from ..stats import count_macs, count_params
from .rules import TARGETS, apply_folds, apply_rewrites, register_fold, register_rewrite

__all__ = [
    "FoldReport",
    "TARGETS",
    "deploy",
    "fold",
    "make_contiguous_",
    "make_export_safe",
    "register_fold",
    "register_rewrite",
]


@dataclass
class FoldReport:
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    probe_shape: tuple[int, ...]
    max_abs: float

    def as_dict(self) -> dict:
        return asdict(self)


def _probe(model: nn.Module, size: tuple[int, int] | None = None) -> torch.Tensor:
    h, w = size or probe_size(model)
    g = torch.Generator().manual_seed(0)
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return (torch.rand(1, 3, h, w, generator=g, dtype=torch.float64) * input_range_of(model)).to(dtype)


@torch.no_grad()
def fold(model: nn.Module, probe: tuple[int, int] | None = None) -> tuple[nn.Module, FoldReport]:
    """Fold train-time structures into plain convs; report sizes and the deviation on a probe."""
    was_training = model.training
    model.eval()
    folded = apply_folds(model).eval()
    x = _probe(model, probe)
    ref, out = model(x), folded(x)
    model.train(was_training)
    report = FoldReport(
        params_before=count_params(model),
        params_after=count_params(folded),
        macs_before=count_macs(model, x),
        macs_after=count_macs(folded, x),
        probe_shape=tuple(x.shape),
        max_abs=float((ref - out).abs().max()),
    )
    return folded, report


def make_contiguous_(model: nn.Module) -> nn.Module:
    """Make every parameter and buffer contiguous, in place.

    litert-torch 0.10 fingerprints constants by the storage address of
    ``x.contiguous()``; for a non-contiguous tensor that is a freed temporary whose
    address gets reused, so distinct weights are silently merged.  Contiguous
    tensors make the fingerprint the tensor's own storage.
    """
    for p in model.parameters():
        if not p.is_contiguous():
            p.data = p.data.contiguous()
    for mod in model.modules():
        for name, b in list(mod._buffers.items()):
            if b is not None and not b.is_contiguous():
                mod._buffers[name] = b.contiguous()
    return model


def make_export_safe(model: nn.Module, target: str = "onnx") -> nn.Module:
    """Swap export-hostile modules for exactly equivalent export-safe forms (deep copy)."""
    safe = apply_rewrites(model, target).eval()
    return make_contiguous_(safe)


def deploy(model: nn.Module, target: str = "onnx") -> nn.Module:
    """The deploy form: ``make_export_safe(fold(model))``."""
    folded, _ = fold(model)
    return make_export_safe(folded, target)
