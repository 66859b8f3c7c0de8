"""Parameter and MAC counts, measured on the actual module (not from tables)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Parameters plus persistent buffers that hold weights (deduplicated by identity)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@torch.no_grad()
def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``x`` (FLOPs / 2, matmuls and convs)."""
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2
