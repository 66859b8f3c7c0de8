#!/usr/bin/env python
"""README table: SPAN-48 x4 at 256x256 -- train form (training graph and eval forward) vs
folded/deploy form (torch eager) vs onnxruntime vs LiteRT, at 1 and 2 threads, with
achieved GFLOP/s and % of measured peak.

    python benchmarks/span_runtimes.py [--runs 10] [--threads 1,2] [--size 256] [--json out.json]

Every cell runs in its own process (see edgesr.bench).  Prints a Markdown table and the
goals: folded >= 3.5x faster than train; best exported >= 1.5x faster than eager folded;
>= 85% of peak in the best runtime.  Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import sys

from edgesr.bench import BenchSettings, bench_model, markdown

RUNTIMES = ["torch-trainmode", "torch-train", "torch-folded", "torch-deploy", "onnxruntime", "litert"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    settings = BenchSettings(threads=threads, runs=args.runs, warmup=args.warmup, sizes=[(args.size, args.size)],
                             runtimes=RUNTIMES)
    doc = bench_model("span", "ch48", 4, None, settings, _Echo())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    print(markdown([doc]))
    print(summary(doc))
    return 0


class _Echo:
    def start(self, total):
        self.n, self.total = 0, total

    def step(self, d):
        self.n += 1
        print(f"[{self.n}/{self.total}] {d}", file=sys.stderr, flush=True)

    def done(self):
        pass


def summary(doc: dict) -> str:
    cell = {(r["runtime"], r["threads"]): r for r in doc["results"] if not r.get("error")}
    peaks = {(p["family"], p["threads"]): p["gflops"] for p in doc["peaks"] if p.get("gflops")}
    f = lambda v, s=".0f": "-" if v is None else format(v, s)  # noqa: E731
    lines = ["", "## SPAN-48 x4 summary", "",
             "train (training graph) = train form with training=True: the 1x1-3x3-1x1 + skip branches; "
             "train (eval) = the official eval forward, which folds each Conv3XC on the fly.", "",
             "| threads | train (training graph) ms | train (eval) ms | folded ms | deploy ms | ORT ms | LiteRT ms "
             "| folded vs training graph | best exported vs folded | best runtime | GFLOP/s | % own peak "
             "| % best peak at these threads |",
             "|" + "---|" * 13]
    verdicts = []
    for t in sorted({k[1] for k in cell}):
        ms = {rt: cell[(rt, t)]["latency_ms"]["median"] for rt in RUNTIMES if (rt, t) in cell}
        fold_x = ms["torch-trainmode"] / ms["torch-folded"] if {"torch-trainmode", "torch-folded"} <= set(ms) else None
        exported = {rt: ms[rt] for rt in ("onnxruntime", "litert") if rt in ms}
        exp_x = ms["torch-folded"] / min(exported.values()) if (exported and "torch-folded" in ms) else None
        best_rt = min(ms, key=ms.get)
        best = cell[(best_rt, t)]
        machine_peak = max((g for (fam, th), g in peaks.items() if th == t), default=None)
        pct_machine = 100 * best["gflops"] / machine_peak if (machine_peak and best.get("gflops")) else None
        lines.append(f"| {t} | {f(ms.get('torch-trainmode'))} | {f(ms.get('torch-train'))} | "
                     f"{f(ms.get('torch-folded'))} | {f(ms.get('torch-deploy'))} | {f(ms.get('onnxruntime'))} | "
                     f"{f(ms.get('litert'))} | {f(fold_x, '.2f')}x | {f(exp_x, '.2f')}x | {best_rt} | "
                     f"{f(best.get('gflops'), '.1f')} | {f(best.get('pct_of_peak'))} | {f(pct_machine)} |")
        if fold_x is not None:
            verdicts.append(_goal(f"{t} thr: folded vs train (training graph)", fold_x, 3.5, "x"))
        if exp_x is not None:
            verdicts.append(_goal(f"{t} thr: best exported vs eager folded", exp_x, 1.5, "x"))
        if best.get("pct_of_peak") is not None:
            verdicts.append(_goal(f"{t} thr: {best_rt} % of its own sgemm peak", best["pct_of_peak"], 85, "%"))
        if pct_machine is not None:
            verdicts.append(_goal(f"{t} thr: {best_rt} % of the best sgemm peak at {t} thr", pct_machine, 85, "%"))
    lines.append("")
    lines += ["Peaks: " + ", ".join(f"{fam} {t} thr {g:.1f} GFLOP/s" for (fam, t), g in sorted(peaks.items()))]
    lines += [f"Load average: {doc['host'].get('load_before')} -> {doc['host'].get('load_after')} "
              f"on {doc['host'].get('cpu_count')} cores"]
    lines += ["", "Goals:"] + [f"- {v}" for v in verdicts]
    return "\n".join(lines)


def _goal(what: str, value: float, target: float, unit: str) -> str:
    if value >= target:
        return f"{what}: {value:.2f}{unit} (goal >= {target}{unit}: met)"
    return f"{what}: {value:.2f}{unit} (goal >= {target}{unit}: MISSED by {target - value:.2f}{unit}, " \
           f"{100 * (target - value) / target:.0f}% short)"


if __name__ == "__main__":
    sys.exit(main())
