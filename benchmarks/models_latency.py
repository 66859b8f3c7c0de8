#!/usr/bin/env python
"""README table: every registered model (default variant and scale) at 256x256 -- eager
folded PyTorch vs onnxruntime vs LiteRT, with GMAC and best-exported / eager-folded speed-up.

    python benchmarks/models_latency.py [--runs 5] [--threads 2] [--size 256] [--models span,safmn] [--json out.json]

Each model is benchmarked by `edgesr bench --model` in its own process, and every cell
of it in a worker process of its own (see edgesr.bench).  Goal: best exported >= 1.5x
faster than eager folded.  Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from edgesr.bench import load_result
from edgesr.models import all_specs

RUNTIMES = ["torch-folded", "onnxruntime", "litert"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--models", default=None, help="comma list (default: all registered)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    specs = all_specs()
    if args.models:
        wanted = args.models.split(",")
        specs = [s for s in specs if s.name in wanted]
    docs = []
    rows = ["| model | variant | input | GMAC | eager folded ms | ORT ms | LiteRT ms | best | best / folded speed-up "
            "| best GFLOP/s | % own peak | goal (>= 1.5x) |", "|" + "---|" * 12]
    for spec in specs:
        v = spec.variant(None)
        m, lo = spec.size_rule.multiple_of, spec.size_rule.min_size
        side = -(-max(args.size, lo) // m) * m
        print(f"== {spec.name} {v.name} x{v.default_scale} at {side}x{side}", file=sys.stderr, flush=True)
        # One process per model: exporters keep caches, and six models in one process grew to >7 GB.
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "r.json"
            proc = subprocess.run([sys.executable, "-m", "edgesr.cli", "bench", "--model", spec.name, "--variant",
                                   v.name, "--scale", str(v.default_scale), "--sizes", f"{side}x{side}",
                                   "--runtimes", ",".join(RUNTIMES), "--threads", str(args.threads), "--runs",
                                   str(args.runs), "--warmup", str(args.warmup), "--json", str(out)],
                                  stdout=subprocess.DEVNULL)
            if not out.exists():
                rows.append(f"| {spec.name} | {v.name} | {side}² | error: bench exited {proc.returncode} |"
                            + " |" * 8)
                continue
            doc = load_result(out)
        docs.append(doc)
        cell = {r["runtime"]: r for r in doc["results"]}
        ms = {rt: c["latency_ms"]["median"] for rt, c in cell.items() if not c.get("error")}
        f = lambda x, s=".0f": "-" if x is None else format(x, s)  # noqa: E731
        exported = {rt: ms[rt] for rt in ("onnxruntime", "litert") if rt in ms}
        best = min(exported, key=exported.get) if exported else None
        ratio = ms["torch-folded"] / exported[best] if (best and "torch-folded" in ms) else None
        macs = next((c["macs"] for c in cell.values() if c.get("macs")), None)
        goal = "-" if ratio is None else ("met" if ratio >= 1.5 else f"MISSED by {1.5 - ratio:.3f}x")
        errs = "; ".join(f"{rt}: {c['error']}" for rt, c in cell.items() if c.get("error"))
        rows.append(f"| {spec.name} | {v.name} x{v.default_scale} | {side}² | {f(macs and macs / 1e9, '.2f')} | "
                    f"{f(ms.get('torch-folded'))} | {f(ms.get('onnxruntime'))} | {f(ms.get('litert'))} | "
                    f"{best or '-'} | {f(ratio, '.2f')}x | {f(best and cell[best]['gflops'], '.1f')} | "
                    f"{f(best and cell[best]['pct_of_peak'])} | {goal}{' (' + errs + ')' if errs else ''} |")
    peaks = {}
    for d in docs:
        for p in d["peaks"]:
            if p.get("gflops"):
                peaks.setdefault((p["family"], p["threads"]), []).append(p["gflops"])
    print(f"\n## Exported latency at {args.size}x{args.size}, {args.threads} thread(s), median of {args.runs}\n")
    print("\n".join(rows))
    print("\nsgemm peaks (GFLOP/s, one probe per model run): " + ", ".join(
        f"{fam} {t} thr {min(g):.0f}-{max(g):.0f}" for (fam, t), g in sorted(peaks.items())))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(docs, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
