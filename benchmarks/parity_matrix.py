"""Regenerate docs/parity_matrix.md: every matrix cell exported via the CLI and verified.

    .venv/bin/python benchmarks/parity_matrix.py [--no-arm] [--only SUBSTR ...] [--out docs/parity_matrix.md]

Two tables, the cells CI runs (src/edgesr/runtime/matrix.py):

- fp32, every family x format: worst max-abs / lowest PSNR of the artifact on the x86
  runtime vs the train-form PyTorch model (seeded random weights unless a checkpoint is
  named; noise + a real photograph), and -- unless --no-arm -- the same artifact on the
  aarch64 runtime (qemu-user, neoverse-n1) vs PyTorch and vs x86.
- fp16 / int8 from trained checkpoints: max-abs and PSNR vs the fp32 PyTorch model on both
  architectures, the precision's gate, and aarch64 vs x86 in 8-bit output steps (LSB) with
  the PSNR difference, on the photograph.

``--only`` reruns the rows whose "cell format" contains one of the substrings and keeps
every other row as the existing file has it (the full run takes ~20 min with aarch64).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from edgesr.cli import main as cli
from edgesr.runtime.matrix import (CELLS, DYNAMIC_CELLS, PRECISION_CELLS, cross_arch, export_cell, gated_cases, jobs,
                                   parity_args, worst)
from edgesr.runtime.parity import threshold_for

FP32_HEADER = ("| cell | format | sizes | x86 vs torch max-abs | PSNR dB | aarch64 vs torch | aarch64 vs x86 "
               "| seconds | result |")
PRECISION_HEADER = ("| cell | checkpoint | format | size | gate x86 / aarch64 (PSNR dB) | x86 vs torch max-abs "
                    "| x86 PSNR dB | aarch64 vs torch max-abs | aarch64 PSNR dB | aarch64 vs x86, photo "
                    "| PSNR aarch64 - x86 | seconds | result |")


def _worst_all(cases, pred=lambda c: True):
    sel = [c for c in cases if pred(c)]
    if not sel:
        return "-", "-"
    mx = max(c["metrics"]["max_abs"] for c in sel)
    ps = min(float(c["metrics"]["psnr_db"]) for c in sel)
    return f"{mx:.1e}", f"{ps:.0f}"


def _label(cell, dynamic=False) -> str:
    return cell.id + (" (dynamic)" if dynamic else "") + (" (trained)" if cell.weights else "")


def _parity_report(cell, rep, d: Path, fmt: str, arch: str = "aarch64", photos: bool = False) -> tuple[int, dict]:
    jpath = d / f"{cell.id}.{fmt}.{arch}.json"
    rc = cli(parity_args(cell, rep["artifact_path"], arch, jpath, photos=photos))
    return rc, json.loads(jpath.read_text())


def fp32_row(cell, fmt, dyn, arm, d) -> tuple[list[str], bool]:
    t = time.perf_counter()
    rep = export_cell(cell, fmt, d, dynamic=dyn)
    ok = rep["exit_code"] == 0 and rep.get("passed") is True
    x86_max, x86_psnr = _worst_all(rep.get("parity", {}).get("cases", []))
    arm_torch = arm_x86 = "-"
    if arm and ok and not dyn:
        rc, arm_rep = _parity_report(cell, rep, d, fmt)
        ok = ok and rc == 0
        arm_torch = _worst_all(arm_rep["cases"], lambda c: "torch" in c["reference"])[0]
        arm_x86 = _worst_all(arm_rep["cases"], lambda c: "torch" not in c["reference"])[0]
    sizes = sorted({tuple(c["size"]) for c in rep.get("parity", {}).get("cases", [])})
    return [_label(cell, dyn), fmt, ", ".join(f"{h}x{w}" for h, w in sizes), x86_max, x86_psnr, arm_torch,
            arm_x86, f"{time.perf_counter() - t:.0f}", "pass" if ok else "**FAIL**"], ok


def _fmt_worst(cases, precision, arch, torch_ref=True):
    w = worst(gated_cases(cases, torch_ref, precision, arch))
    return ("-", "-") if w is None else (f"{w[0]:.1e}", f"{w[1]:.1f}")


def precision_row(cell, fmt, arm, d) -> tuple[list[str], bool, str | None]:
    t = time.perf_counter()
    rep = export_cell(cell, fmt, d)
    ok = rep["exit_code"] == 0 and rep.get("passed") is True
    x86_max = x86_psnr = arm_max = arm_psnr = cross = diff = "-"
    line = None
    if ok:  # as tests/test_matrix.py: `edgesr parity` over every shipped photograph (+ noise)
        rc, x86_rep = _parity_report(cell, rep, d, fmt, "x86_64", photos=True)
        ok = rc == 0
        x86_cases = x86_rep["cases"]
        x86_max, x86_psnr = _fmt_worst(x86_cases, cell.precision, "x86_64")
    if arm and ok:
        rc, arm_rep = _parity_report(cell, rep, d, fmt, "aarch64", photos=True)
        ok = ok and rc == 0
        arm_max, arm_psnr = _fmt_worst(arm_rep["cases"], cell.precision, "aarch64")
        x = cross_arch(x86_cases, arm_rep["cases"])
        cross = f"{x.max_abs_lsb:.1f} LSB, {x.psnr_arm_vs_x86:.1f} dB"
        diff = f"{x.psnr_difference:+.2f} dB"
        line = x.line(f"{cell.id} {fmt}")
    gates = f"{threshold_for(cell.precision).min_psnr_db:g} / {threshold_for(cell.precision, 'aarch64').min_psnr_db:g}"
    size = f"{cell.size[0]}x{cell.size[1]}"
    return [cell.id, cell.weights or "random", fmt, size, gates, x86_max, x86_psnr, arm_max, arm_psnr, cross, diff,
            f"{time.perf_counter() - t:.0f}", "pass" if ok else "**FAIL**"], ok, line


def _existing_rows(out: Path) -> dict[tuple[str, str], str]:
    """(table header, "cell format") -> row line, from a previously generated file."""
    rows, header = {}, None
    if out.exists():
        for line in out.read_text().splitlines():
            if line.startswith("| cell |"):
                header = line
            elif line.startswith("| ") and header and not line.startswith("|---"):
                cols = [c.strip() for c in line.strip("|").split("|")]
                fmt = cols[2] if header == PRECISION_HEADER else cols[1]
                rows[(header, f"{cols[0]} {fmt}")] = line
    return rows


def _existing_notes(out: Path) -> list[str]:
    """The int8 aarch64-vs-x86 lines of a previously generated file (kept by --only runs that skip them)."""
    if not out.exists():
        return []
    return [line for line in out.read_text().splitlines() if line.startswith("- ") and "output LSB" in line]


def run(arm: bool, out: Path, only: list[str]) -> int:
    keep = _existing_rows(out) if only else {}

    def wanted(key: str) -> bool:
        return not only or any(s in key for s in only)

    fp32_lines, prec_lines, notes, failures = [], [], [], 0
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for cell, fmt, dyn in [(c, f, False) for c, f in jobs(CELLS)] + [(c, "onnx", True) for c in DYNAMIC_CELLS]:
            key = f"{_label(cell, dyn)} {fmt}"
            if not wanted(key) and (FP32_HEADER, key) in keep:
                fp32_lines.append(keep[(FP32_HEADER, key)])
                continue
            row, ok = fp32_row(cell, fmt, dyn, arm, d)
            failures += not ok
            fp32_lines.append("| " + " | ".join(row) + " |")
            print(fp32_lines[-1], flush=True)
        for cell, fmt in jobs(PRECISION_CELLS):
            key = f"{cell.id} {fmt}"
            if not wanted(key) and (PRECISION_HEADER, key) in keep:
                prec_lines.append(keep[(PRECISION_HEADER, key)])
                continue
            row, ok, line = precision_row(cell, fmt, arm, d)
            if line and cell.precision == "int8":
                notes.append(f"- {line}")
            failures += not ok
            prec_lines.append("| " + " | ".join(row) + " |")
            print(prec_lines[-1], flush=True)
    checkpoints = sorted({c.weights for c in CELLS if c.weights})
    lines = [
        "# Parity matrix",
        "",
        "Generated by `python benchmarks/parity_matrix.py` (the same cells CI runs, `src/edgesr/runtime/matrix.py`).",
        "",
        "## fp32",
        "",
        "Seeded random weights (constant-initialised parameters perturbed so every branch contributes),",
        f"except the cells marked (trained): released checkpoints ({', '.join(checkpoints)}).",
        "Inputs: seeded noise + a real photograph per size. Errors are max-abs on the [0, 1] output scale",
        "(threshold 1e-4 x max(1, output peak); aarch64 vs x86 1e-5 x max(1, peak)); PSNR with peak 1.0.",
        "",
        FP32_HEADER,
        "|---|---|---|---|---|---|---|---|---|",
        *fp32_lines,
        "",
        "## Reduced precision (trained checkpoints)",
        "",
        "fp16 / int8 artifacts exported with `--precision` (int8: calibrated on the shipped photographs,",
        "default 0.15 dB budget) vs the **fp32** PyTorch model, judged by the precision's gate",
        "(`runtime/parity.py` `threshold_for`; fp16 on aarch64 has its own: ORT computes fp16 there).",
        "max-abs / PSNR are the worst over the gated inputs (fp16: noise + photograph, PSNR relative to",
        "max(1, output peak); int8: the photographs, noise is reported in the JSON but not gated), by",
        "`edgesr parity --images <the 4 shipped photographs>` on each architecture after the export.",
        "aarch64 vs x86: the same artifact, worst photograph, in 8-bit output steps (1 LSB = 1/255);",
        "PSNR aarch64 - x86: PSNR vs fp32 PyTorch on aarch64 minus the same on x86.",
        "",
        PRECISION_HEADER,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *prec_lines,
        "",
        "int8, aarch64 vs x86 (`tests/test_matrix.py::test_int8_aarch64_vs_x86_in_output_lsbs`):",
        "",
        *(notes or _existing_notes(out)),
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} ({failures} failing cells)")
    return 1 if failures else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-arm", action="store_true", help="skip the aarch64 (qemu) columns")
    ap.add_argument("--only", nargs="+", default=[], metavar="SUBSTR",
                    help='rerun only rows whose "cell format" contains SUBSTR; keep the others from --out')
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "parity_matrix.md")
    a = ap.parse_args()
    sys.exit(run(not a.no_arm, a.out, a.only))
