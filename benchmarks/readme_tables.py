#!/usr/bin/env python
"""Regenerate every README performance table in one command.

    python benchmarks/readme_tables.py            # all three, then rewrite the README section
    python benchmarks/readme_tables.py --quick    # fewer runs (a smoke run, not for the README)

Runs, one after another (each in its own process, each cell of them in its own worker):

1. ``span_runtimes.py``  SPAN-48 x4 at 256x256: train form vs folded vs deploy vs
   onnxruntime vs LiteRT, 1 and 2 threads, % of the measured sgemm peak;
2. ``models_latency.py`` every model's exported latency at 256x256, both runtimes, with
   best-exported / eager-folded;
3. ``export_times.py``   `edgesr export` wall time and peak RSS per model and format;
4. ``safe_ops.py``       the FFT models' export-safe DFT and FFT blocks vs eager ``torch.fft``.

The output goes to ``docs/benchmarks.md`` (with the machine, the load average before and
after, and the versions) and replaces the text between the ``<!-- bench:begin -->`` and
``<!-- bench:end -->`` markers of ``README.md``.  Both files are written atomically and
only if every script succeeded.  Run it on an otherwise idle machine: the load average is
printed beside the tables so a reader can judge them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from edgesr.bench.device_bench import cpu_name, load_average  # noqa: E402
from edgesr.io import atomic_write_text  # noqa: E402
from edgesr.pipeline import runtime_versions  # noqa: E402

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def jobs(quick: bool) -> list[tuple[str, list[str], bool]]:
    """(title, command, output is Markdown) per table."""
    py = sys.executable
    here = Path(__file__).resolve().parent
    runs = ["--runs", "3"] if quick else ["--runs", "10"]
    return [
        ("SPAN-48 x4 at 256×256: training form vs deploy form vs runtimes",
         [py, str(here / "span_runtimes.py"), *runs], True),
        ("Every model at 256×256, 2 threads: eager folded vs exported",
         [py, str(here / "models_latency.py"), "--threads", "2", *(["--runs", "2"] if quick else ["--runs", "5"])],
         True),
        ("`edgesr export` per model and format at the default size: wall time and peak memory",
         [py, str(here / "export_times.py"), *(["--models", "span"] if quick else [])], True),
        ("FFT: export-safe DFT round trip on (1, 32, S, S) and whole FFT blocks vs eager torch.fft "
         "(1 thread, CPU time)",
         [py, str(here / "safe_ops.py"), "--threads", "1", "--clock", "cpu", "--sizes", "64", "256",
          *([] if quick else ["1024"]), "--onnx-size", "64", "256", "--tflite", "--blocks"], False),
    ]


_PROGRESS = re.compile(r"^\(\d\d:\d\d\) \[(START|  ?DONE)\]|^(ExportedProgram Run Decompositions|Decompositions|MLIR Module)( \(\+\d\d:\d\d\))?$")


def strip_converter_progress(text: str) -> str:
    """Drop litert-torch's progress lines (and their wrapped tails) if a script let them through."""
    return "\n".join(line for line in text.splitlines() if not _PROGRESS.match(line.strip()))


def machine() -> str:
    shown = ("torch", "onnxruntime", "ai-edge-litert", "litert-torch")
    versions = ", ".join(f"{k} {v}" for k, v in runtime_versions().items() if k in shown)
    return (f"{platform.machine()} · {cpu_name()} · {os.cpu_count()} cores · Python {platform.python_version()} · "
            f"{versions}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs; does not touch README.md")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()

    start = time.time()
    load_before = load_average()
    parts = []
    for title, cmd, is_markdown in jobs(args.quick):
        print(f"== {title}\n   {' '.join(Path(c).name if c.endswith('.py') else c for c in cmd)}", file=sys.stderr,
              flush=True)
        t0 = time.time()
        env = {**os.environ, "LITERT_TORCH_SHOW_PROGRESS": "n"}  # its progress lines go to stdout
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        if proc.returncode:
            print(f"error: {cmd[1]} exited {proc.returncode}; nothing written", file=sys.stderr)
            return 1
        body = strip_converter_progress(proc.stdout).strip()
        if is_markdown:  # the scripts' own headings sit below this section's
            body = "\n".join("##" + line if line.startswith("#") else line for line in body.splitlines())
        else:
            body = f"```\n{body}\n```"
        command = "python " + " ".join(str(Path(c).relative_to(ROOT)) if c.endswith(".py") else c for c in cmd[1:])
        parts.append(f"### {title}\n\n`{command}` ({time.time() - t0:.0f} s)\n\n{body}\n")
    load_after = load_average()

    header = (f"Measured {dt.date.today().isoformat()} by `python benchmarks/readme_tables.py` "
              f"({(time.time() - start) / 60:.0f} min). Machine: {machine()}. "
              f"Load average (1 min) {load_before} before, {load_after} after.\n")
    text = header + "\n" + "\n".join(parts)
    atomic_write_text(args.out, "# Benchmarks\n\n" + text)
    print(f"wrote {args.out}", file=sys.stderr)
    if args.quick:
        return 0
    readme = ROOT / "README.md"
    old = readme.read_text()
    if BEGIN not in old or END not in old:
        print(f"README.md has no {BEGIN} ... {END} section; only {args.out} was written", file=sys.stderr)
        return 1
    head, rest = old.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    atomic_write_text(readme, f"{head}{BEGIN}\n{text}\n{END}{tail}")
    print("rewrote the README benchmark section", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
