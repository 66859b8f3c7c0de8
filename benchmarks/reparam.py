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

Latency: median of ``--runs`` timed forwards after ``--warmup`` untimed ones, batch 1,
random [0, 1] input of ``size x size``, ``torch.set_num_threads(threads)``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import edgesr
from edgesr.stats import count_macs, count_params


@torch.no_grad()
def latency_ms(model: torch.nn.Module, x: torch.Tensor, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


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

    rows = []  # (model, form, params, macs, ms)

    def measure(label: str, form: str, model: torch.nn.Module, train_mode: bool = False) -> float:
        model.train(train_mode)
        ms = latency_ms(model, x, args.runs, args.warmup)
        rows.append((label, form, count_params(model), count_macs(model, x), ms))
        return ms

    span = edgesr.create_model("span", 4, "ch48")
    span_deploy = edgesr.deploy(span)
    t_train = measure("SPAN-48 x4", "train form (branches)", span, train_mode=True)
    measure("SPAN-48 x4", "train form, eval (functional fold)", span)
    t_dep = measure("SPAN-48 x4", "deploy (folded)", span_deploy)
    span_ratio = t_train / t_dep

    pusr = edgesr.create_model("plainusr", 4, "base-train")
    pusr_deploy = edgesr.deploy(pusr)
    p_train = measure("PlainUSR x4", "train form (RepMBConv/ASR/PConv)", pusr)
    measure("PlainUSR x4", "Rep (released form, in-place writes)",
            edgesr.fold(pusr, probe=(16, 16))[0])
    p_dep = measure("PlainUSR x4", "deploy (folded, cat, window SoftPool)", pusr_deploy)

    print(f"input 1x3x{args.size}x{args.size}, {args.threads} threads, median of {args.runs} "
          f"after {args.warmup} warm-up, torch {torch.__version__}")
    print()
    print(f"| model | form | params | GMACs | ms | speed-up vs train |")
    print(f"|---|---|---:|---:|---:|---:|")
    base = {"SPAN-48 x4": t_train, "PlainUSR x4": p_train}
    for label, form, params, macs, ms in rows:
        print(f"| {label} | {form} | {params:,} | {macs / 1e9:.2f} | {ms:.1f} | {base[label] / ms:.2f}x |")
    print()
    print(f"SPAN folded speed-up: {span_ratio:.2f}x (target >= 3.5x) -> {'OK' if span_ratio >= 3.5 else 'MISSED'}")
    print(f"PlainUSR folded speed-up: {p_train / p_dep:.2f}x")


if __name__ == "__main__":
    main()
