#!/usr/bin/env python
"""Wall time and peak memory of `edgesr export` per model and format, as a user runs it.

    python benchmarks/export_times.py [--models span,darkir] [--formats onnx,tflite] [--size 256x256]

Each export is the real CLI in a fresh process (default variant, seeded random weights,
verification on), so the figures include import time, fold, rewrite, export and parity.
Stage times come from the report the CLI writes beside the artifact; peak RSS is the
child's own (``os.wait4``).  Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from edgesr.models import all_specs  # noqa: E402


def run_export(model: str, fmt: str, size: str | None, out: Path) -> dict:
    cmd = [sys.executable, "-m", "edgesr.cli", "export", "--model", model, "--format", fmt, "--output", str(out)]
    if size:
        cmd += ["--input-size", size]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage (peak RSS)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen, or it warns on __del__
    wall = time.perf_counter() - t0
    row = {"model": model, "format": fmt, "rc": proc.returncode, "wall_s": wall,
           "peak_rss_gb": usage.ru_maxrss / 2**20}  # ru_maxrss is in KiB on Linux
    report = Path(str(out) + ".json")
    if report.exists():
        doc = json.loads(report.read_text())
        row["stages"] = doc.get("stage_seconds") or {}
        row["size"] = doc.get("input_size") or size
        row["passed"] = doc.get("passed")
    else:
        row["error"] = (stderr.strip().splitlines() or ["?"])[-1]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=None, help="comma list (default: every registered family)")
    ap.add_argument("--formats", default="onnx,tflite")
    ap.add_argument("--size", default=None, help="HxW (default: each model's default export size)")
    args = ap.parse_args()
    names = args.models.split(",") if args.models else [s.name for s in all_specs()]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            for fmt in args.formats.split(","):
                print(f"== {name} {fmt}", file=sys.stderr, flush=True)
                rows.append(run_export(name, fmt, args.size, Path(d) / f"{name}.{fmt}"))
    print("| model | format | input | export s | verify s | total wall s | peak RSS GB | parity |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        st = r.get("stages", {})
        exp = st.get(f"export {r['format']}", st.get("export"))
        ver = st.get("verify")
        f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        verdict = "error: " + r["error"] if "error" in r else ("passed" if r.get("passed") else "FAILED")
        print(f"| {r['model']} | {r['format']} | {r.get('size') or '-'} | {f(exp)} | {f(ver)} | {r['wall_s']:.1f} | "
              f"{r['peak_rss_gb']:.2f} | {verdict} |")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
