"""Train-time form vs folded deploy form: eager PyTorch latency, params and MACs.

    python benchmarks/reparam.py [--size 256] [--threads 2] [--runs 7] [--warmup 2]

Rows:
- SPAN-48 x4 "train form": the training-time branch computation (``model.train()`` under
  ``no_grad``: zero-pad, 1x1 -> 3x3 -> 1x1 plus the 1x1 skip in each of the 20 Conv3XC).
  SPAN has no BatchNorm/dropout, so this is exactly what the training graph computes.
  "train form, eval": the same module in eval mode (our eval path re-folds the kernels
  functionally on every call, as the official code does) -- shown for completeness.
- PlainUSR base x4 "train form": RepMBConv/ASR/PConv (mode-independent).
- "deploy": ``edgesr.deploy(model)`` (folds + export-safe rewrites), what gets exported.

Latency: median (and min) of ``--runs`` timed forwards after ``--warmup`` untimed ones,
batch 1, random [0, 1] input of ``size x size``, ``torch.set_num_threads(threads)``.  The
forms of one model are timed in alternation (round-robin), so load from other processes
on a shared machine affects them alike; the min is the least disturbed run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import edgesr
from edgesr.stats import count_macs, count_params


@torch.no_grad()
def interleaved_latency_ms(models: list[torch.nn.Module], x: torch.Tensor, runs: int,
                           warmup: int) -> list[tuple[float, float]]:
    """(median, min) ms per model; the models are timed in alternation, round by round, so a
    shared machine's load drift hits every form alike."""
    for _ in range(warmup):
        for m in models:
            m(x)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(runs):
        for i, m in enumerate(models):
            t0 = time.perf_counter()
            m(x)
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [(statistics.median(t), min(t)) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(1, 3, args.size, args.size)

    def group(label: str, forms: list[tuple[str, torch.nn.Module, bool]]) -> list[tuple]:
        for _, model, train_mode in forms:
            model.train(train_mode)
        # each form keeps its own mode; MACs are counted in that mode
        stats = []
        for _, model, _ in forms:
            stats.append((count_params(model), count_macs(model, x)))
        lat = interleaved_latency_ms([m for _, m, _ in forms], x, args.runs, args.warmup)
        return [(label, form, p, macs, med, mn) for (form, _, _), (p, macs), (med, mn) in zip(forms, stats, lat)]

    span = edgesr.create_model("span", 4, "ch48")
    span_eval = edgesr.create_model("span", 4, "ch48")
    span_eval.load_state_dict(span.state_dict())
    span_rows = group("SPAN-48 x4", [
        ("train form (branches)", span, True),
        ("train form, eval (functional fold)", span_eval, False),
        ("deploy (folded)", edgesr.deploy(span), False),
    ])
    pusr = edgesr.create_model("plainusr", 4, "base-train")
    pusr_rows = group("PlainUSR x4", [
        ("train form (RepMBConv/ASR/PConv)", pusr, False),
        ("Rep (released form, in-place writes)", edgesr.fold(pusr, probe=(16, 16))[0], False),
        ("deploy (folded, cat, window SoftPool)", edgesr.deploy(pusr), False),
    ])

    print(f"input 1x3x{args.size}x{args.size}, {args.threads} threads, {args.runs} interleaved runs "
          f"after {args.warmup} warm-up, torch {torch.__version__}")
    print()
    print("| model | form | params | GMACs | median ms | min ms | speed-up vs train (median / min) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for rows in (span_rows, pusr_rows):
        base_med, base_min = rows[0][4], rows[0][5]
        for label, form, params, macs, med, mn in rows:
            print(f"| {label} | {form} | {params:,} | {macs / 1e9:.2f} | {med:.1f} | {mn:.1f} | "
                  f"{base_med / med:.2f}x / {base_min / mn:.2f}x |")
    print()
    s_med, s_min = span_rows[0][4] / span_rows[2][4], span_rows[0][5] / span_rows[2][5]
    print(f"SPAN folded speed-up: {s_med:.2f}x median, {s_min:.2f}x min "
          f"(target >= 3.5x) -> {'OK' if s_med >= 3.5 else 'MISSED'}")
    print(f"PlainUSR folded speed-up: {pusr_rows[0][4] / pusr_rows[2][4]:.2f}x median, "
          f"{pusr_rows[0][5] / pusr_rows[2][5]:.2f}x min")


if __name__ == "__main__":
    main()
