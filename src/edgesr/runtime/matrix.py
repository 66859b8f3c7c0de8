"""The parity matrix: every model family x every format x precision, exported and verified.

One definition serves the CI tests (tests/test_matrix.py), the aarch64 tests and the
script that regenerates docs/parity_matrix.md, so the table in the README is exactly
what CI proves.

Two kinds of cells:

- ``CELLS``: fp32, every family x {ONNX, TFLite}.  Seeded random weights (the graph and the
  folds are what is checked; random outputs leave [0, 1], which the fp32 bound scales with),
  plus the NTIRE 2023 SAFMN entry from its released checkpoint (its layout has no random
  variant worth checking: one shared GRN norm, bias-free blocks).
- ``PRECISION_CELLS``: fp16 and int8 artifacts from *released trained checkpoints* (int8
  with random weights is meaningless: calibration ranges and the PSNR gate only mean
  something on the image distribution a trained model sees), checked against the fp32
  PyTorch model by PSNR with the precision's threshold (``parity.threshold_for``).  Which
  formats a precision cell runs is asked of ``precision.check_request``, so a format that
  gains a precision (int8 TFLite) gets its cell without an edit here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("onnx", "tflite")


def checkpoint_dir() -> Path:
    """The released checkpoints: ``shared/`` beside the clone (CI), else the team's copy."""
    env = os.environ.get("EDGESR_CHECKPOINTS")
    beside = Path(__file__).resolve().parents[4] / "shared" / "checkpoints"  # <root>/<clone>/src/edgesr/runtime
    for d in ([Path(env)] if env else []) + [beside, Path("/work/shared/checkpoints")]:
        if d.is_dir():
            return d
    return beside  # missing: the export then fails naming this path (no silent skip)


@dataclass(frozen=True)
class Cell:
    model: str
    variant: str
    scale: int
    size: tuple[int, int]
    precision: str = "fp32"
    weights: str | None = None  # a file of the released checkpoints; None: seeded random weights
    formats: tuple[str, ...] = FORMATS  # wanted; `formats_for` keeps those the exporter supports
    max_psnr_drop: float | None = None  # int8 only: the exporter's Y-PSNR budget (None: its default)

    @property
    def id(self) -> str:
        base = f"{self.model}-{self.variant}-x{self.scale}"
        return base if self.precision == "fp32" else f"{base}-{self.precision}"

    def weights_path(self) -> Path | None:
        return None if self.weights is None else checkpoint_dir() / self.weights


# Small sizes keep CI fast; odd/non-square where the size rule allows it.  The NTIRE 2023
# SAFMN checkpoint runs ONNX only in CI: its TFLite export (78 s here) shares every rewrite
# with the SAFMN base TFLite cell but the GRN norm, and passed when measured (32x48: 5.8e-6
# x86, 5.9e-6 aarch64 vs PyTorch, 4.8e-7 aarch64 vs x86).
CELLS = (
    Cell("span", "ch48", 4, (36, 28)),
    Cell("safmn", "base", 4, (32, 40)),
    Cell("safmn_ntire23", "base", 4, (16, 32), weights="team15_SAFMN_ntire2023.pth", formats=("onnx",)),
    Cell("safmnpp", "base", 4, (32, 40)),
    Cell("safmnpp", "light", 4, (32, 40)),
    Cell("plainusr", "base", 4, (36, 29)),
    Cell("plainusr", "base-train", 4, (36, 29)),
    Cell("srconvnet", "base", 4, (24, 20)),
    Cell("darkir", "m", 1, (40, 36)),
)

# Reduced precision: trained checkpoints, one cell per (precision, format) kind that has a
# distinct code path on some architecture:
# - fp16 ONNX, SPAN ch28: onnxruntime's aarch64 kernels compute fp16 graphs in fp16
#   arithmetic (x86 widens to fp32), the case the aarch64 fp16 threshold is measured on.
# - fp16 TFLite, PlainUSR-U: fp16 weights behind DEQUANTIZE (ai-edge-quantizer).
# - int8 ONNX and TFLite (TFLite runs because `check_request` accepts it), PlainUSR-U: the
#   exporter's default calibration set and 0.15 dB budget (9 Convs: the sensitivity search
#   costs seconds at 32x28); the aarch64-vs-x86 int8 difference in output LSBs is measured
#   on this cell.
PRECISION_CELLS = (
    Cell("span", "ch28", 4, (24, 24), "fp16", "team38_span_ch28_slim.pth", formats=("onnx",)),
    Cell("plainusr", "u", 4, (32, 28), "fp16", "PlainUSRU_Rep_x4.pth", formats=("tflite",)),
    Cell("plainusr", "u", 4, (32, 28), "int8", "PlainUSRU_Rep_x4.pth"),
)

# Dynamic-shape ONNX cases: exported once with symbolic H/W, verified at two sizes.
DYNAMIC_CELLS = (
    Cell("span", "ch48", 2, (32, 32)),
    Cell("safmn", "base", 4, (32, 32)),
)


def formats_for(cell: Cell) -> tuple[str, ...]:
    """The cell's formats that ``edgesr export`` accepts at the cell's precision."""
    from ..errors import EdgeSRError
    from ..export.precision import check_request

    supported = []
    for fmt in cell.formats:
        try:
            check_request(fmt, cell.precision, None, cell.max_psnr_drop)
        except EdgeSRError:
            continue
        supported.append(fmt)
    return tuple(supported)


def jobs(cells) -> list[tuple[Cell, str]]:
    """(cell, format) pairs to run: every supported format of every cell."""
    return [(c, f) for c in cells for f in formats_for(c)]


def export_args(cell: Cell, fmt: str, out: Path, dynamic: bool = False) -> list[str]:
    """The `edgesr export` command line of one cell."""
    args = ["export", "--format", fmt, "--input-size", f"{cell.size[0]}x{cell.size[1]}", "--output", str(out)]
    if cell.weights is None:  # random weights: the architecture comes from the cell
        args += ["--model", cell.model, "--variant", cell.variant, "--scale", str(cell.scale)]
    else:  # a checkpoint: the architecture is detected (the report's model/variant are checked by callers)
        args += ["--weights", str(cell.weights_path())]
    if cell.precision != "fp32":
        args += ["--precision", cell.precision]
    if cell.max_psnr_drop is not None:
        args += ["--max-psnr-drop", str(cell.max_psnr_drop)]
    if dynamic:
        args.append("--dynamic")
    return args


def export_cell(cell: Cell, fmt: str, outdir: Path, dynamic: bool = False) -> dict:
    """Export one cell through the CLI pipeline and return its report (plus exit code and path)."""
    from ..cli import main

    out = outdir / f"{cell.id}{'-dyn' if dynamic else ''}.{fmt}"
    rc = main(export_args(cell, fmt, out, dynamic))
    report_path = Path(str(out) + ".json")
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report["exit_code"] = rc
    report["artifact_path"] = str(out)
    return report


def parity_args(cell: Cell, artifact: str | Path, arch: str, json_out: Path, photos: bool = False) -> list[str]:
    """The `edgesr parity` command line that re-checks a cell's artifact (against fp32 PyTorch);
    ``photos``: every shipped photograph instead of one (the reduced-precision cells, whose
    PSNR and aarch64-vs-x86 figures are about real images)."""
    args = ["parity", str(artifact), "--arch", arch, "--json", str(json_out)]
    if cell.weights is not None:
        args += ["--weights", str(cell.weights_path())]
    if photos:
        from ..data import IMAGE_DIR

        args += ["--images", str(IMAGE_DIR)]
    return args


# --------------------------------------------------------------------------- figures

LSB = 1.0 / 255.0  # one step of an 8-bit image on the artifact's [0, 1] output scale


def gated_cases(cases: list[dict], reference_is_torch: bool, precision: str, arch: str) -> list[dict]:
    """Cases of a parity report (JSON dicts) against PyTorch or against x86 that the
    precision's threshold gates (int8: photographs only; noise is reported, not gated)."""
    from .parity import ParityCase, threshold_for

    t = threshold_for(precision, arch)
    return [c for c in cases if ("torch" in c["reference"]) == reference_is_torch and t.judges(ParityCase.from_dict(c))]


def worst(cases: list[dict]) -> tuple[float, float] | None:
    """(largest max-abs, lowest PSNR relative to max(1, output peak)) over ``cases``."""
    from .parity import Metrics, relative_psnr

    if not cases:
        return None
    ms = [Metrics.from_dict(c["metrics"]) for c in cases]
    return max(m.max_abs for m in ms), min(relative_psnr(m) for m in ms)


@dataclass(frozen=True)
class CrossArch:
    """aarch64 vs x86 of one reduced-precision artifact on a real photograph."""

    max_abs_lsb: float  # largest |aarch64 - x86| in 8-bit output steps
    psnr_arm_vs_x86: float  # dB, peak 1
    psnr_x86_vs_torch: float  # dB vs the fp32 PyTorch model
    psnr_arm_vs_torch: float

    @property
    def psnr_difference(self) -> float:
        """How much closer (+) or further (-) from fp32 PyTorch aarch64 is than x86, in dB."""
        return self.psnr_arm_vs_torch - self.psnr_x86_vs_torch

    def line(self, label: str) -> str:
        return (f"{label}: aarch64 vs x86 on a photograph: max {self.max_abs_lsb:.1f} output LSB (1/255), "
                f"{self.psnr_arm_vs_x86:.1f} dB apart; vs fp32 PyTorch x86 {self.psnr_x86_vs_torch:.2f} dB, "
                f"aarch64 {self.psnr_arm_vs_torch:.2f} dB (difference {self.psnr_difference:+.2f} dB)")


def cross_arch(x86_cases: list[dict], arm_cases: list[dict]) -> CrossArch:
    """From `edgesr parity` on x86 and with ``--arch aarch64`` (same inputs): the worst over
    the photograph inputs only (the images int8 is calibrated for)."""
    def photo(cases, pred):
        sel = [c for c in cases if not c["input"].startswith("random") and pred(c)]
        if not sel:
            raise ValueError("no photograph case in the parity report")
        return sel

    arm_x86 = photo(arm_cases, lambda c: "torch" not in c["reference"])
    arm_torch = photo(arm_cases, lambda c: "torch" in c["reference"])
    x86_torch = photo(x86_cases, lambda c: "torch" in c["reference"])
    return CrossArch(
        max_abs_lsb=max(float(c["metrics"]["max_abs"]) for c in arm_x86) / LSB,
        psnr_arm_vs_x86=min(float(c["metrics"]["psnr_db"]) for c in arm_x86),
        psnr_x86_vs_torch=min(float(c["metrics"]["psnr_db"]) for c in x86_torch),
        psnr_arm_vs_torch=min(float(c["metrics"]["psnr_db"]) for c in arm_torch),
    )
