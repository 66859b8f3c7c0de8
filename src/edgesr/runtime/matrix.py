"""The parity matrix: every model family x every format, exported and verified.

One definition serves the CI tests (tests/test_matrix.py), the aarch64 tests and the
script that regenerates docs/parity_matrix.md, so the table in the README is exactly
what CI proves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("onnx", "tflite")


@dataclass(frozen=True)
class Cell:
    model: str
    variant: str
    scale: int
    size: tuple[int, int]

    @property
    def id(self) -> str:
        return f"{self.model}-{self.variant}-x{self.scale}"


# Small sizes keep CI fast; odd/non-square where the size rule allows it.
CELLS = (
    Cell("span", "ch48", 4, (36, 28)),
    Cell("safmn", "base", 4, (32, 40)),
    Cell("safmnpp", "base", 4, (32, 40)),
    Cell("safmnpp", "light", 4, (32, 40)),
    Cell("plainusr", "base", 4, (36, 29)),
    Cell("plainusr", "base-train", 4, (36, 29)),
    Cell("srconvnet", "base", 4, (24, 20)),
    Cell("darkir", "m", 1, (40, 36)),
)

# Dynamic-shape ONNX cases: exported once with symbolic H/W, verified at two sizes.
DYNAMIC_CELLS = (
    Cell("span", "ch48", 2, (32, 32)),
    Cell("safmn", "base", 4, (32, 32)),
)


def export_cell(cell: Cell, fmt: str, outdir: Path, dynamic: bool = False) -> dict:
    """Export one cell through the CLI pipeline (random seeded weights) and return its report."""
    from ..cli import main

    out = outdir / f"{cell.id}{'-dyn' if dynamic else ''}.{fmt}"
    args = ["export", "--model", cell.model, "--variant", cell.variant, "--scale", str(cell.scale),
            "--format", fmt, "--input-size", f"{cell.size[0]}x{cell.size[1]}", "--output", str(out)]
    if dynamic:
        args.append("--dynamic")
    rc = main(args)
    report_path = Path(str(out) + ".json")
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report["exit_code"] = rc
    report["artifact_path"] = str(out)
    return report
