#!/usr/bin/env python
"""int8 vs fp32 latency on both runtimes (onnxruntime CPU EP, ai-edge-litert + XNNPACK), 256x256.

    python benchmarks/int8_speed.py                       # PlainUSR-U, PlainUSR-T, SPAN-28 x4; 1 and 2 threads
    python benchmarks/int8_speed.py --checkpoints /work/shared/checkpoints/PlainUSRU_Rep_x4.pth --profile

Per checkpoint, every form that ``edgesr export`` writes, from one fp32 export per runtime:

- onnxruntime: dynamic fp32 ONNX; ``--precision int8`` (QDQ, mixed precision); naive
  int8 (every Conv QDQ, no float fallback: the fastest int8 ORT graph, quality aside);
- litert: fp32 TFLite at 256x256; ``--precision int8`` (ai-edge-quantizer static int8,
  mixed precision searched at this size); all-int8 (every op the quantizer supports, no
  float fallback: the most integer graph).

Runs are interleaved (every form once, then again, ...) so that load changes on the shared
machine hit all forms alike; ratios come from medians of this one run.  Timed: ORT
``session.run`` (NCHW array in, output array out), LiteRT ``interpreter.invoke`` (input set
once; the NHWC transposes of edgesr's runner are not the model's time).  The headline
"best int8 vs best fp32" divides the fastest fp32 form (either runtime) by the fastest
int8 form (either runtime).

``--profile`` adds, at 1 thread, where the time goes: onnxruntime's per-op-type profile,
and for LiteRT each operator of the graph run alone as a one-op model on XNNPACK (the
python interpreter has no op profiler), summed per op type.  Prints Markdown.
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from precision import cpu_flag_set, cpu_flags, cpu_name  # noqa: E402  (benchmarks/precision.py)

CKPT = Path("/work/shared/checkpoints")
DEFAULT = ["PlainUSRU_Rep_x4.pth", "PlainUSRT_Rep_x4.pth", "team38_span_ch28_slim.pth"]


def int8_isa() -> str:
    """Which int8 dot-product instructions the CPU has: what int8 kernels can gain here."""
    flags = cpu_flag_set()
    if flags is None:
        return "int8 ISA unknown"
    have = {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")}
    return ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in have.items())


def onnx_forms(checkpoint: Path, loaded, work: Path) -> dict[str, Path]:
    from edgesr.export.precision import _quantize, calibration_inputs, load_calibration, reduce_precision
    from edgesr.pipeline import export_model
    from onnxruntime.quantization import CalibrationMethod

    fp32 = work / f"{checkpoint.stem}_fp32.onnx"
    export_model(loaded, "onnx", size=(64, 64), dynamic=True, output=fp32, verify=False)
    mult = loaded.spec.size_rule.multiple_of
    mixed = work / f"{checkpoint.stem}_int8.onnx"
    shutil.copy(fp32, mixed)
    rep = reduce_precision(mixed, "int8", scale=loaded.scale, size=(64, 64), dynamic=True, multiple_of=mult)
    print(f"<!-- {checkpoint.stem} ORT int8: {rep['quantized_nodes']} Convs int8, {len(rep['kept_float'])} float, "
          f"probe drop {rep['psnr_drop']} dB -->", flush=True)
    naive = work / f"{checkpoint.stem}_int8_naive.onnx"
    _quantize(fp32, naive, calibration_inputs(load_calibration(None), loaded.scale, None, mult), [], ("Conv",),
              CalibrationMethod.MinMax, work / f"{checkpoint.stem}_naive.json")
    return {"ort fp32": fp32, "ort int8": mixed, "ort int8 every Conv": naive}


def tflite_forms(checkpoint: Path, loaded, work: Path, size: int) -> dict[str, Path]:
    """The int8 float-kept set is searched as ``edgesr export --precision int8`` does, on a
    64x64 export (a search at 256x256 probes every trial on 256x256 tiles: minutes per
    model), then applied to the same ops of the 256x256 graph (same converter, same op
    order, checked), with the 256x256 calibration."""
    from edgesr.export.int8_tflite import TfliteInt8Quantizer, graph_ops
    from edgesr.export.precision import calibration_inputs, load_calibration, reduce_precision
    from edgesr.pipeline import export_model

    mult = loaded.spec.size_rule.multiple_of
    fp32_64, small = work / f"{checkpoint.stem}_fp32_64.tflite", work / f"{checkpoint.stem}_int8_64.tflite"
    export_model(loaded, "tflite", size=(64, 64), output=fp32_64, verify=False)
    shutil.copy(fp32_64, small)
    t = time.perf_counter()
    rep = reduce_precision(small, "int8", scale=loaded.scale, size=(64, 64), dynamic=False, multiple_of=mult)
    seconds = time.perf_counter() - t
    fp32 = work / f"{checkpoint.stem}_fp32.tflite"
    export_model(loaded, "tflite", size=(size, size), output=fp32, verify=False)
    q = TfliteInt8Quantizer(fp32, calibration_inputs(load_calibration(None), loaded.scale, (size, size), mult),
                            schemes=[rep["calibration_method"]])
    ops = graph_ops(q.float_model)
    if [o.op_type for o in ops] != [o.op_type for o in graph_ops(fp32_64.read_bytes())]:
        raise SystemExit(f"{checkpoint.stem}: the 64x64 and {size}x{size} graphs differ; cannot transfer the search")
    mixed = work / f"{checkpoint.stem}_int8.tflite"
    mixed.write_bytes(q.quantize([ops[i] for i in rep["float_op_indices"]]))
    every = work / f"{checkpoint.stem}_int8_all.tflite"
    every.write_bytes(q.quantize([]))
    print(f"<!-- {checkpoint.stem} LiteRT int8 (searched at 64x64, {seconds:.0f} s): {rep['int8_ops']} of "
          f"{len(ops)} ops int8, float {rep['float_ops']}, probe drop {rep['psnr_drop']} dB "
          f"({rep['calibration_method']}) -->", flush=True)
    return {"litert fp32": fp32, "litert int8": mixed, "litert int8 all ops": every}


class OrtForm:
    def __init__(self, path: Path, threads: int, x: np.ndarray):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.feed = {"input": x}

    def __call__(self) -> None:
        self.sess.run(None, self.feed)


class LiteRTForm:
    def __init__(self, path: Path, threads: int, x: np.ndarray):
        from ai_edge_litert.interpreter import Interpreter

        self.it = Interpreter(model_path=str(path), num_threads=threads)  # XNNPACK by default
        self.it.allocate_tensors()
        d = self.it.get_input_details()[0]
        self.it.set_tensor(d["index"], np.ascontiguousarray(x.transpose(0, 2, 3, 1)))  # NHWC

    def __call__(self) -> None:
        self.it.invoke()


def bench(paths: dict[str, Path], size: int, threads: int, runs: int) -> dict[str, float]:
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    forms = {k: (OrtForm if p.suffix == ".onnx" else LiteRTForm)(p, threads, x) for k, p in paths.items()}
    for f in forms.values():
        f()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in forms}
    for _ in range(runs):
        for k, f in forms.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}


def litert_op_profile(path: Path, threads: int = 1, runs: int = 5) -> dict[str, float]:
    """ms per op type: each operator of the graph alone in a one-op model (same tensors,
    same quantization), on XNNPACK.  Sums of isolated ops, so fusion/cache effects of the
    whole graph are not in it; the fp32-vs-int8 comparison of the same op type is."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_litert.tools import flatbuffer_utils as fu

    m = fu.read_model_from_bytearray(path.read_bytes())
    sg = m.subgraphs[0]

    def constant(i: int) -> bool:
        data = m.buffers[sg.tensors[i].buffer].data
        return data is not None and len(data) > 0

    by_type: dict[str, float] = {}
    for op in sg.operators:
        one = copy.copy(m)
        sub = copy.copy(sg)
        sub.operators = [op]
        sub.inputs = [i for i in op.inputs if i >= 0 and not constant(i)]
        sub.outputs = list(op.outputs)
        one.subgraphs = [sub]
        one.signatureDefs = []
        it = Interpreter(model_content=bytes(fu.convert_object_to_bytearray(one)), num_threads=threads)
        it.allocate_tensors()
        for d in it.get_input_details():
            it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
        it.invoke()
        ts = []
        for _ in range(runs):
            t = time.perf_counter()
            it.invoke()
            ts.append(time.perf_counter() - t)
        name = fu.opcode_to_name(m, op.opcodeIndex)
        by_type[name] = by_type.get(name, 0.0) + float(np.median(ts)) * 1e3
    return by_type


def ort_op_profile(path: Path, size: int) -> dict[str, float]:
    from ort_profile import profile

    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    nodes, runs = profile(str(path), {"input": x}, 1, 3, 1)
    by_type: dict[str, float] = {}
    for ev in nodes:
        op = ev["args"].get("op_name", "?")
        by_type[op] = by_type.get(op, 0.0) + ev["dur"] / max(len(runs), 1) / 1e3
    return by_type


def top(by_type: dict[str, float], n: int = 7) -> str:
    total = sum(by_type.values())
    items = sorted(by_type.items(), key=lambda kv: -kv[1])[:n]
    return f"total {total:.1f}: " + ", ".join(f"{op} {ms:.1f}" for op, ms in items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="*", default=[str(CKPT / c) for c in DEFAULT])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    from edgesr.pipeline import obtain_model

    t0 = time.perf_counter()
    print(f"Machine: {cpu_name()} ({cpu_flags()}; {int8_isa()}), {os.cpu_count()} cores; "
          f"{args.size}x{args.size} input; median of {args.runs} interleaved runs; "
          f"load average {os.getloadavg()[0]:.2f} before.\n")
    rows, headline, profiles = [], [], []
    work = Path(tempfile.mkdtemp(prefix="edgesr-int8-speed-"))
    try:
        for ck in map(Path, args.checkpoints):
            loaded = obtain_model(None, weights=ck)
            paths = {**onnx_forms(ck, loaded, work), **tflite_forms(ck, loaded, work, args.size)}
            for th in (int(t) for t in args.threads.split(",")):
                ms = bench(paths, args.size, th, args.runs)
                for k, v in ms.items():
                    ref = ms["ort fp32" if k.startswith("ort") else "litert fp32"]
                    rows.append(f"| {ck.stem} | {th} | {k} | {v:.1f} | {ref / v:.2f}x |")
                f32 = min((v, k) for k, v in ms.items() if "fp32" in k)
                i8 = min((v, k) for k, v in ms.items() if "int8" in k)
                i8_export = min((v, k) for k, v in ms.items() if k.endswith("int8"))
                headline.append(f"| {ck.stem} | {th} | {f32[1]} {f32[0]:.1f} | {i8_export[1]} {i8_export[0]:.1f} "
                                f"({f32[0] / i8_export[0]:.2f}x) | {i8[1]} {i8[0]:.1f} ({f32[0] / i8[0]:.2f}x) |")
                print(rows[-len(ms)], "...", flush=True)
            if args.profile:
                for k in ("ort fp32", "ort int8 every Conv"):
                    profiles.append(f"- {ck.stem} {k} (onnxruntime profile, 1 thread, ms/run): "
                                    f"{top(ort_op_profile(paths[k], args.size))}")
                for k in ("litert fp32", "litert int8 all ops", "litert int8"):
                    profiles.append(f"- {ck.stem} {k} (each op alone on XNNPACK, 1 thread, ms): "
                                    f"{top(litert_op_profile(paths[k]))}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| checkpoint | threads | form | median ms | vs fp32 of the same runtime |")
    print("|---|---:|---|---:|---:|")
    print("\n".join(rows))
    print("\n| checkpoint | threads | best fp32 (ms) | best int8 as exported (ms, speed-up) "
          "| best int8 any (ms, speed-up) |")
    print("|---|---:|---|---|---|")
    print("\n".join(headline))
    if profiles:
        print("\nWhere the time goes:\n")
        print("\n".join(profiles))
    print(f"\n({time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.2f} after)")


if __name__ == "__main__":
    main()
