#!/usr/bin/env python
"""fp16 / int8 vs fp32 ONNX latency (onnxruntime CPU), per checkpoint, 256x256, 1 and 2 threads.

    python benchmarks/precision.py                      # PlainUSR-U x4, SPAN-28 x4, PlainUSR x4
    python benchmarks/precision.py --checkpoints ../shared/checkpoints/PlainUSR_Rep_x4.pth --profile

For each checkpoint: the dynamic fp32 ONNX export, its fp16 conversion, its naive int8
(every Conv quantized, no float fallback) and the mixed-precision int8 that ``edgesr export
--precision int8`` writes.  Runs are interleaved (fp32, fp16, int8, int8-mixed, fp32, ...)
so that load changes on the shared machine hit every form alike; ratios are fp32 median /
form median within this one run.  ``--profile`` adds onnxruntime's per-op-type time of the
fp32 and the naive int8 graph at 1 thread (where int8 time goes: QuantizeLinear /
DequantizeLinear vs the convolutions).  Prints Markdown.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# the shared checkpoints beside the clone (../shared/checkpoints)
CKPT = Path(__file__).resolve().parents[1].parent / "shared" / "checkpoints"
DEFAULT = ["PlainUSRU_Rep_x4.pth", "team38_span_ch28_slim.pth", "PlainUSR_Rep_x4.pth"]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flag_set() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (None where it cannot be read)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_flags() -> str:
    have = cpu_flag_set()
    if have is None:
        return "?"
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "f16c", "avx512_fp16") if f in have)


def forms(checkpoint: Path, work: Path) -> dict[str, Path]:
    from edgesr.export.metadata import read_metadata
    from edgesr.export.precision import (CalibrationSet, _quantize, calibration_inputs, load_calibration,
                                         reduce_precision)
    from edgesr.pipeline import export_model, obtain_model
    from onnxruntime.quantization import CalibrationMethod

    loaded = obtain_model(None, weights=checkpoint)
    fp32 = work / f"{checkpoint.stem}_fp32.onnx"
    export_model(loaded, "onnx", size=(64, 64), dynamic=True, output=fp32, verify=False)
    meta = read_metadata(fp32)
    out = {"fp32": fp32}
    kw = dict(scale=int(meta["scale"]), size=(64, 64), dynamic=True, multiple_of=int(meta.get("multiple_of", 1)))
    for p in ("fp16", "int8"):
        dst = work / f"{checkpoint.stem}_{p}.onnx"
        shutil.copy(fp32, dst)
        t = time.perf_counter()
        rep = reduce_precision(dst, p, **kw)
        if p == "int8":
            print(f"<!-- {checkpoint.name}: int8 mixed precision kept {len(rep['kept_float'])} of "
                  f"{len(rep['kept_float']) + rep['quantized_nodes']} Convs float, probe drop {rep['psnr_drop']} dB, "
                  f"{time.perf_counter() - t:.0f} s -->", flush=True)
        out[p + ("-mixed" if p == "int8" else "")] = dst
    naive = work / f"{checkpoint.stem}_int8_naive.onnx"
    calib = load_calibration(None)
    _quantize(fp32, naive, calibration_inputs(calib, kw["scale"], None, kw["multiple_of"]), [], ("Conv",),
              CalibrationMethod.MinMax,
              work / f"{checkpoint.stem}_naive_cache.json")  # ranges are per graph
    out["int8-all-convs"] = naive
    return out


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def bench(paths: dict[str, Path], size: int, threads: int, runs: int) -> dict[str, float]:
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    sessions = {k: session(p, threads) for k, p in paths.items()}
    for s in sessions.values():
        s.run(None, {"input": x})  # warm-up
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"input": x})
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="*", default=[str(CKPT / c) for c in DEFAULT])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    print(f"Machine: {cpu_name()} ({cpu_flags()}), {os.cpu_count()} cores; onnxruntime CPU EP; "
          f"{args.size}x{args.size} input; median of {args.runs} interleaved runs; load average {load:.2f} before.\n")
    print("| checkpoint | threads | form | median ms | speed vs fp32 |")
    print("|---|---:|---|---:|---:|")
    work = Path(tempfile.mkdtemp(prefix="edgesr-precision-bench-"))
    try:
        for ck in args.checkpoints:
            paths = forms(Path(ck), work)
            for th in (int(t) for t in args.threads.split(",")):
                ms = bench(paths, args.size, th, args.runs)
                for k, v in ms.items():
                    print(f"| {Path(ck).stem} | {th} | {k} | {v:.1f} | {ms['fp32'] / v:.2f}x |", flush=True)
            if args.profile:
                from ort_profile import profile

                x = np.random.default_rng(0).random((1, 3, args.size, args.size), dtype=np.float32)
                for k in ("fp32", "int8-all-convs", "int8-mixed"):
                    by_type: dict[str, float] = {}
                    nodes, runs = profile(str(paths[k]), {"input": x}, 1, 3, 1)
                    for ev in nodes:
                        op = ev["args"].get("op_name", "?")
                        by_type[op] = by_type.get(op, 0.0) + ev["dur"] / max(len(runs), 1) / 1e3
                    top = sorted(by_type.items(), key=lambda kv: -kv[1])[:6]
                    print(f"\n{Path(ck).stem} {k} per op type (1 thread, ms/run): "
                          + ", ".join(f"{op} {ms:.1f}" for op, ms in top))
                print()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n({time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.2f} after)")


if __name__ == "__main__":
    main()
