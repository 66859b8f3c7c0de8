#!/usr/bin/env python
"""Per-node onnxruntime profile: where the time of an ONNX graph goes.

    python benchmarks/ort_profile.py --dft 256                 # export-safe DFT round trip (1, 32, S, S)
    python benchmarks/ort_profile.py --dft 256 --layout tflite # the other DFT op arrangement
    python benchmarks/ort_profile.py --onnx out/span.onnx      # any exported artifact (e.g. from `edgesr export`)

Runs the graph ``--runs`` times with ``enable_profiling``, drops the warm-up runs and
prints the mean time per op type and the slowest nodes with their input shapes, so a
"why is it slow" claim (e.g. "transposes are 42 ms of the DFT round trip") can be
re-checked, and the time by kind (int8 kernels, QuantizeLinear/DequantizeLinear, float
ops, layout: Transpose and NCHWc reorders) for int8 graphs.  One thread by default:
per-node times are then additive and the machine's other load matters less.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # safe_ops: the DFT round trips


def export_dft(size: int, channels: int, layout: str, path: str) -> dict[str, np.ndarray]:
    import torch
    from safe_ops import RoundTrip, SpectralRoundTrip, export_onnx_file

    mod = SpectralRoundTrip(size) if layout == "spectral" else RoundTrip(size, True, layout)
    x = torch.randn(1, channels, size, size)
    export_onnx_file(mod.eval(), x, path)
    return {"x": x.numpy()}


def category(op: str) -> str:
    """Which part of an int8 graph an op type is (ORT op names, or LiteRT names + " int8")."""
    if op in ("QuantizeLinear", "DequantizeLinear", "QUANTIZE", "DEQUANTIZE", "DynamicQuantizeLinear"):
        return "Q/DQ"
    if op.startswith("QLinear") or op.endswith(" int8") or op in ("ConvInteger", "MatMulInteger", "QGemm"):
        return "int8"
    if op in ("Transpose", "ReorderInput", "ReorderOutput", "TRANSPOSE"):
        return "layout"
    return "float"


def random_feed(sess) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 64 for d in i.shape]
        feed[i.name] = rng.random(shape, dtype=np.float32)
    return feed


def profile(path: str, feed: dict | None, threads: int, runs: int, warmup: int) -> list[dict]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = feed or random_feed(sess)
    for _ in range(warmup + runs):
        sess.run(None, feed)
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    runs_seen = [e for e in events if e.get("name") == "model_run"]
    keep_after = runs_seen[warmup]["ts"] if len(runs_seen) > warmup else 0
    return [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
            and e["ts"] >= keep_after], runs_seen[warmup:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", help="an .onnx file (inputs fed with seeded uniform [0,1) data)")
    src.add_argument("--dft", type=int, metavar="S", help="export and profile the DFT round trip at S x S")
    ap.add_argument("--layout", default="onnx", help="DFT op arrangement for --dft: edgesr.reparam.dft.LAYOUTS, or spectral (edgesr.reparam.dft_spectral)")
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        feed = None
        path = args.onnx
        if args.dft:
            path = os.path.join(tmp, "dft.onnx")
            feed = export_dft(args.dft, args.channels, args.layout, path)
        nodes, runs = profile(path, feed, args.threads, args.runs, args.warmup)

    n = max(len(runs), 1)
    total_run = sum(r["dur"] for r in runs) / n / 1e3
    by_type: dict[str, float] = collections.defaultdict(float)
    by_node: dict[str, list] = {}
    for e in nodes:
        op = e["args"].get("op_name", "?")
        by_type[op] += e["dur"] / n / 1e3
        name = e["name"][: -len("_kernel_time")]
        rec = by_node.setdefault(name, [op, 0.0, e["args"].get("input_type_shape", [])])
        rec[1] += e["dur"] / n / 1e3
    kernels = sum(by_type.values())
    print(f"{path if args.onnx else f'DFT round trip (1, {args.channels}, {args.dft}, {args.dft}), layout={args.layout}'}"
          f": {args.threads} thread(s), mean of {n} runs: model_run {total_run:.2f} ms, kernels {kernels:.2f} ms\n")
    print(f"{'op type':<24} {'ms':>8} {'share':>6} {'nodes':>6}")
    counts = collections.Counter(rec[0] for rec in by_node.values())
    for op, ms in sorted(by_type.items(), key=lambda kv: -kv[1]):
        print(f"{op:<24} {ms:8.2f} {ms / kernels:6.1%} {counts[op]:6d}")
    kinds: dict[str, float] = collections.defaultdict(float)
    for op, ms in by_type.items():
        kinds[category(op)] += ms
    print("\nby kind: " + ", ".join(f"{k} {ms:.2f} ms ({ms / kernels:.1%})"
                                   for k, ms in sorted(kinds.items(), key=lambda kv: -kv[1])))
    print(f"\nslowest {args.top} nodes:")
    for name, (op, ms, shapes) in sorted(by_node.items(), key=lambda kv: -kv[1][1])[: args.top]:
        dims = "; ".join("x".join(str(d) for d in list(s.values())[0]) for s in shapes if s)
        print(f"{ms:8.2f} ms  {op:<12} {name[:48]:<48} in: {dims}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
