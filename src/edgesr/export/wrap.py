"""The artifact I/O contract, put inside the exported graph.

Every artifact takes float32 RGB in [0, 1] and returns float32 RGB in [0, 1]; ONNX uses
NCHW, TFLite NHWC.  A model's native value range (SRConvNet works in [0, 255]) and the
layout change are wrapped around the model here, so callers and runners never scale or
permute by model.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ExportError
from ..models.registry import SizeRule

LAYOUTS = ("NCHW", "NHWC")
INPUT_NAME = "input"
OUTPUT_NAME = "output"


def normalize_layout(layout: str) -> str:
    up = layout.upper()
    if up not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    return up


class IOWrapper(nn.Module):
    """``[0,1]`` input in ``layout`` -> model in its native range (NCHW) -> ``[0,1]`` output in ``layout``.

    ``input_range`` is the model's native peak value (1.0 or 255.0).  With
    ``input_range == 1`` and NCHW the wrapper adds no op to the graph.
    """

    def __init__(self, model: nn.Module, input_range: float = 1.0, layout: str = "NCHW"):
        super().__init__()
        if not input_range > 0:
            raise ValueError(f"input_range must be positive, got {input_range}")
        self.model = model
        self.input_range = float(input_range)
        self.layout = normalize_layout(layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        if self.input_range != 1.0:
            x = x * self.input_range
        y = self.model(x)
        if self.input_range != 1.0:
            y = y / self.input_range
        if self.layout == "NHWC":
            y = y.permute(0, 2, 3, 1)
        return y

    def example_input(self, height: int, width: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """A seeded [0, 1] input of the wrapped (artifact) layout."""
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(batch, 3, height, width, generator=g)
        return x.permute(0, 2, 3, 1).contiguous() if self.layout == "NHWC" else x


@dataclass
class ExportResult:
    """What an exporter wrote: enough to report on without reopening the file."""

    path: Path
    format: str  # "onnx" | "tflite"
    layout: str  # "NCHW" | "NHWC"
    input_shape: tuple[int | str, ...]  # symbolic dims by name ("H", "4*W") when dynamic
    output_shape: tuple[int | str, ...]
    ops: dict[str, int]  # op type -> count, most frequent first
    file_size: int  # bytes, including an external-data side file if any
    seconds: float  # wall time of the whole export (capture, convert, checks, write)
    metadata: dict[str, str] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)  # structural checks and their figures

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def contract_metadata(
    fmt: str,
    layout: str,
    native_range: float,
    input_shape: tuple[int | str, ...],
    dynamic: bool,
    multiple_of: int,
    min_size: int,
) -> dict[str, str]:
    """The metadata keys every artifact carries about its own I/O contract."""
    from .. import __version__

    return {
        "edgesr_version": __version__,
        "format": fmt,
        "layout": layout,
        "input_range": "[0,1]",
        "native_range": f"[0,{native_range:g}]",
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_shape": json.dumps(list(input_shape)),
        "dynamic": "true" if dynamic else "false",
        "multiple_of": str(multiple_of),
        "min_size": str(min_size),
    }


def check_export_size(input_size: tuple[int, int], multiple_of: int, min_size: int) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in input_size)
    except (TypeError, ValueError):
        raise ExportError(f"input_size must be (height, width), got {input_size!r}") from None
    if multiple_of < 1 or min_size < 1:
        raise ExportError(f"multiple_of and min_size must be >= 1, got {multiple_of}, {min_size}")
    SizeRule(min_size=min_size, multiple_of=multiple_of).check(h, w, what="export")
    return h, w


def op_histogram(names) -> dict[str, int]:
    return dict(Counter(names).most_common())


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 3)
