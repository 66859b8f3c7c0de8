#!/usr/bin/env python
"""int8 vs fp32 latency on both runtimes (onnxruntime CPU EP, ai-edge-litert + XNNPACK), 256x256.

    python benchmarks/int8_speed.py                       # PlainUSR-U, PlainUSR-T, SPAN-28 x4; 1 and 2 threads
    python benchmarks/int8_speed.py --checkpoints ../shared/checkpoints/PlainUSRU_Rep_x4.pth --profile
    python benchmarks/int8_speed.py --variants --checkpoints ../shared/checkpoints/team15_SAFMN_ntire2023.pth

Per checkpoint, every form that ``edgesr export`` writes, from one fp32 export per runtime:

- onnxruntime: dynamic fp32 ONNX; ``--precision int8`` (QDQ, mixed precision); naive
  int8 (every Conv QDQ, no float fallback: the fastest int8 ORT graph, quality aside);
- litert: fp32 TFLite at 256x256; ``--precision int8`` (ai-edge-quantizer static int8,
  mixed precision searched at 64x64, applied to the same ops at this size); all-int8 (every op the quantizer supports, no
  float fallback: the most integer graph).

Runs are interleaved (every form once, then again, ...) so that load changes on the shared
machine hit all forms alike; ratios come from medians of this one run.  Timed: ORT
``session.run`` (NCHW array in, output array out), LiteRT ``interpreter.invoke`` (input set
once; the NHWC transposes of edgesr's runner are not the model's time).  The headline
"best int8 vs best fp32" divides the fastest fp32 form (either runtime) by the fastest
int8 form (either runtime).

``--profile`` adds, at 1 thread, where the time goes: onnxruntime's per-op-type profile,
and for LiteRT each operator of the graph run alone as a one-op model on XNNPACK (the
python interpreter has no op profiler), summed per op type ("CONV_2D int8" vs "CONV_2D"),
each split by kind: int8 kernels, Q/DQ, float ops, layout (Transpose / NCHWc reorders).

``--variants`` asks where int8 speed could come from on this CPU, all in one interleaved
run: onnxruntime QOperator vs QDQ, u8s8 / s8s8 / u8u8, reduce_range, per-tensor weights,
optimization level "extended" (no NHWC/NCHWc layout transformers), every Conv int8 or every
op int8 (the most integer graph, quality aside), and the exported mixed-precision Conv set in
the other formats; LiteRT with int8 input/output (boundary QUANTIZE/DEQUANTIZE dropped) and
with TFLite's builtin kernels instead of XNNPACK.  ``--reuse DIR`` takes the mixed graphs of
an earlier ``--keep DIR`` run instead of re-running the searches.  Prints Markdown.
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

from ort_profile import category  # noqa: E402
from precision import cpu_flag_set, cpu_flags, cpu_name  # noqa: E402  (benchmarks/precision.py)

CKPT = Path(__file__).resolve().parents[1].parent / "shared" / "checkpoints"  # ../shared beside the repo
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
    def __init__(self, path: Path, threads: int, x: np.ndarray, level: str = "all", config: dict | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level.upper()}")
        for k, v in (config or {}).items():
            so.add_session_config_entry(k, v)
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.feed = {"input": x}

    def __call__(self) -> None:
        self.sess.run(None, self.feed)


class LiteRTForm:
    def __init__(self, path: Path, threads: int, x: np.ndarray, xnnpack: bool = True):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        self.it = Interpreter(model_path=str(path), num_threads=threads, experimental_op_resolver_type=resolver)
        self.it.allocate_tensors()
        d = self.it.get_input_details()[0]
        nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        if d["dtype"] != np.float32:  # int8 input (--variants: QUANTIZE/DEQUANTIZE stripped)
            scale, zero = d["quantization"]
            info = np.iinfo(d["dtype"])
            nhwc = np.clip(np.round(nhwc / scale + zero), info.min, info.max).astype(d["dtype"])
        self.it.set_tensor(d["index"], nhwc)  # NHWC

    def __call__(self) -> None:
        self.it.invoke()


def make_form(spec, threads: int, x: np.ndarray):
    """A form is a model path, or (path, options) for --variants: ORT ``level`` / ``config``
    session options, LiteRT ``xnnpack``."""
    path, opts = spec if isinstance(spec, tuple) else (spec, {})
    return (OrtForm if path.suffix == ".onnx" else LiteRTForm)(path, threads, x, **opts)


# --variants: where is real int8 speed on this CPU?  Same calibration for every ORT variant
# (onnxruntime MinMax on the shipped calibration set: speed does not depend on the range values).
INT8_OP_TYPES = ("Conv", "Mul", "Add", "Sigmoid", "Concat", "LeakyRelu", "Relu", "Clip", "AveragePool",
                 "GlobalAveragePool", "MaxPool", "Resize", "DepthToSpace", "Transpose", "Reshape", "Slice",
                 "Split", "Pad", "Softmax", "MatMul", "Gemm", "Where")  # ops onnxruntime's quantizer/CPU EP run int8


def float_convs(int8_onnx: Path) -> list[str]:
    """The Conv nodes a QDQ graph keeps float (their weight does not come from a DequantizeLinear)."""
    import onnx

    g = onnx.load(str(int8_onnx)).graph
    made_by = {o: n.op_type for n in g.node for o in n.output}
    return [n.name for n in g.node if n.op_type == "Conv" and made_by.get(n.input[1]) != "DequantizeLinear"]


def ort_variant(fp32: Path, dst: Path, cache: Path, inputs, exclude=(), op_types=("Conv",), fmt="QDQ",
                act="QUInt8", weight="QInt8", per_channel=True, reduce_range=False) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{"input": x} for x in inputs])

        def get_next(self):
            return next(self._it, None)

    quantize_static(str(fp32), str(dst), Reader(), quant_format=getattr(QuantFormat, fmt), per_channel=per_channel,
                    reduce_range=reduce_range, activation_type=getattr(QuantType, act),
                    weight_type=getattr(QuantType, weight), calibrate_method=CalibrationMethod.MinMax,
                    op_types_to_quantize=list(op_types), nodes_to_exclude=list(exclude),
                    calibration_cache_path=str(cache))
    return dst


def strip_io_quantization(src: Path, dst: Path) -> bool:
    """int8 input/output: drop a QUANTIZE that only reads a graph input and a DEQUANTIZE that
    only writes a graph output (what an int8-I/O deployment would not run)."""
    from ai_edge_litert.tools import flatbuffer_utils as fu

    m = fu.read_model_from_bytearray(src.read_bytes())
    sg = m.subgraphs[0]
    name = [fu.opcode_to_name(m, op.opcodeIndex) for op in sg.operators]
    drop, ins, outs = set(), [], []
    for t in sg.inputs:
        readers = [i for i, op in enumerate(sg.operators) if t in op.inputs]
        if len(readers) == 1 and name[readers[0]] == "QUANTIZE":
            drop.add(readers[0])
            t = sg.operators[readers[0]].outputs[0]
        ins.append(t)
    for t in sg.outputs:
        writer = next((i for i, op in enumerate(sg.operators) if t in op.outputs), None)
        if writer is not None and name[writer] == "DEQUANTIZE":
            drop.add(writer)
            t = sg.operators[writer].inputs[0]
        outs.append(t)
    sg.operators = [op for i, op in enumerate(sg.operators) if i not in drop]
    sg.inputs, sg.outputs = ins, outs
    m.signatureDefs = []
    dst.write_bytes(bytes(fu.convert_object_to_bytearray(m)))
    return len(drop) == len(ins) + len(outs)


def variant_forms(checkpoint: Path, loaded, work: Path, size: int, reuse: Path | None) -> dict:
    """Every int8 form worth timing on this CPU, with the exported mixed-precision sets.

    ``reuse``: a folder with ``{stem}_int8.onnx`` (the mixed QDQ graph ``--precision int8``
    writes) and ``{stem}_fp32.tflite`` / ``{stem}_int8.tflite`` at ``size`` (e.g. an earlier
    run's ``--keep`` folder) instead of re-running the mixed-precision searches."""
    from edgesr.export.precision import calibration_inputs, load_calibration
    from edgesr.pipeline import export_model

    stem, mult = checkpoint.stem, loaded.spec.size_rule.multiple_of
    have = lambda name: reuse is not None and (reuse / name).is_file()  # noqa: E731
    fp32 = work / f"{stem}_fp32.onnx"
    export_model(loaded, "onnx", size=(64, 64), dynamic=True, output=fp32, verify=False)
    if have(f"{stem}_int8.onnx") and have(f"{stem}_fp32.tflite") and have(f"{stem}_int8.tflite"):
        mixed = work / f"{stem}_int8.onnx"
        for suffix in ("int8.onnx", "fp32.tflite", "int8.tflite"):
            shutil.copy(reuse / f"{stem}_{suffix}", work / f"{stem}_{suffix}")
        tfl = {"litert fp32": work / f"{stem}_fp32.tflite", "litert int8 mixed": work / f"{stem}_int8.tflite"}
        every = work / f"{stem}_int8_all.tflite"
        if have(every.name):
            shutil.copy(reuse / every.name, every)
        else:  # every op int8; 16 calibration inputs (the ranges do not change the speed)
            from edgesr.export.int8_tflite import TfliteInt8Quantizer

            q = TfliteInt8Quantizer(tfl["litert fp32"], calibration_inputs(load_calibration(None), loaded.scale,
                                    (size, size), mult)[:16], schemes=["minmax"])
            every.write_bytes(q.quantize([]))
        tfl["litert int8 all ops"] = every
        print(f"<!-- {stem}: mixed ONNX and TFLite int8 graphs reused from {reuse} -->", flush=True)
    else:
        onnx_paths = onnx_forms(checkpoint, loaded, work)
        mixed = onnx_paths["ort int8"]
        t = tflite_forms(checkpoint, loaded, work, size)
        tfl = {"litert fp32": t["litert fp32"], "litert int8 mixed": t["litert int8"],
               "litert int8 all ops": t["litert int8 all ops"]}
    keep_float = float_convs(mixed)
    import onnx

    graph_ops = sorted({n.op_type for n in onnx.load(str(fp32)).graph.node})
    int8_ops = [o for o in graph_ops if o in INT8_OP_TYPES]
    calib = calibration_inputs(load_calibration(None), loaded.scale, None, mult)[:32]  # ranges do not change speed

    def v(name: str, **kw) -> Path | None:  # one calibration cache per set of quantized op types
        cache = work / f"{stem}_minmax_{'-'.join(kw.get('op_types', ('Conv',)))}.json"
        try:
            path = ort_variant(fp32, work / f"{stem}_{name}.onnx", cache, calib, **kw)
            import onnxruntime as ort

            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # loads and has kernels
            return path
        except Exception as e:  # a variant onnxruntime cannot build or run is reported, not timed
            print(f"<!-- {stem} {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]} -->", flush=True)
            return None

    every = dict(exclude=())
    forms: dict = {
        "ort fp32": fp32,
        "ort fp32, level extended": (fp32, {"level": "extended"}),
        "ort int8 mixed (as exported: QDQ u8s8 per-channel)": mixed,
        "ort int8 mixed, QOperator": v("mixed_qop", exclude=keep_float, fmt="QOperator"),
        "ort int8 mixed, per-tensor weights": v("mixed_pt", exclude=keep_float, per_channel=False),
        "ort int8 mixed, level extended (no NHWC)": (mixed, {"level": "extended"}),
        "ort int8 every Conv, QDQ u8s8": v("conv_u8s8", **every),
        "ort int8 every Conv, QOperator u8s8": v("conv_qop", fmt="QOperator", **every),
        "ort int8 every Conv, QDQ s8s8": v("conv_s8s8", act="QInt8", **every),
        "ort int8 every Conv, QDQ u8u8": v("conv_u8u8", weight="QUInt8", **every),
        "ort int8 every Conv, reduce_range": v("conv_rr", reduce_range=True, **every),
        "ort int8 every Conv, per-tensor weights": v("conv_pt", per_channel=False, **every),
        "ort int8 every Conv, level extended (no NHWC)": (v("conv_u8s8_x", **every), {"level": "extended"}),
        f"ort int8 every op ({'/'.join(int8_ops)}), QDQ u8s8": v("ops_u8s8", op_types=int8_ops, **every),
        "ort int8 every op, QOperator": v("ops_qop", op_types=int8_ops, fmt="QOperator", **every),
        **tfl,
        "litert fp32, no XNNPACK (builtin kernels)": (tfl["litert fp32"], {"xnnpack": False}),
        "litert int8 all ops, int8 I/O": work / f"{stem}_int8_all_io.tflite",
        "litert int8 all ops, no XNNPACK (builtin kernels)": (tfl["litert int8 all ops"], {"xnnpack": False}),
    }
    forms = {k: f for k, f in forms.items() if (f[0] if isinstance(f, tuple) else f) is not None}  # failed variants
    if not strip_io_quantization(tfl["litert int8 all ops"], forms["litert int8 all ops, int8 I/O"]):
        print(f"<!-- {stem}: not every graph input/output had a lone QUANTIZE/DEQUANTIZE -->", flush=True)
    print(f"<!-- {stem}: {len(keep_float)} Convs float in the mixed ONNX; every-op int8 types {int8_ops} -->",
          flush=True)
    return forms


def probe_drops(checkpoint: Path, loaded, work: Path) -> list[str]:
    """Quality of the most integer ORT graphs --variants times: Y-PSNR drop on edgesr's
    16-pair probe (the gate's probe) with onnxruntime MinMax ranges on all 144 calibration
    inputs, every Conv int8 and every op int8 (no float fallback)."""
    import onnx
    from edgesr.export.precision import calibration_inputs, load_calibration, mean_y_psnr, quality_pairs
    from edgesr.pipeline import export_model

    mult, stem = loaded.spec.size_rule.multiple_of, checkpoint.stem
    fp32 = work / f"{stem}_probe_fp32.onnx"
    export_model(loaded, "onnx", size=(64, 64), dynamic=True, output=fp32, verify=False)
    calib = calibration_inputs(load_calibration(None), loaded.scale, None, mult)
    pairs = quality_pairs(load_calibration(None), loaded.scale, None, mult)
    base = mean_y_psnr(onnx.load(str(fp32)), pairs, loaded.scale)
    ops = [o for o in sorted({n.op_type for n in onnx.load(str(fp32)).graph.node}) if o in INT8_OP_TYPES]
    out = []
    for name, types in (("every Conv", ("Conv",)), ("every op", tuple(ops))):
        q = ort_variant(fp32, work / f"{stem}_probe_q.onnx", work / f"{stem}_probe_{'-'.join(types)}.json", calib,
                        op_types=types)
        out.append(f"- {stem} ORT int8 {name}, QDQ u8s8 (onnxruntime MinMax, {len(calib)} inputs): probe drop "
                   f"{base - mean_y_psnr(onnx.load(str(q)), pairs, loaded.scale):.3f} dB")
    return out


def bench(paths: dict[str, Path], size: int, threads: int, runs: int) -> dict[str, float]:
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    forms = {k: make_form(p, threads, x) for k, p in paths.items()}
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
        if name not in ("QUANTIZE", "DEQUANTIZE"):  # int8 / float32 version of the op (its first input)
            name += " int8" if sg.tensors[op.inputs[0]].type == 9 else ""  # TensorType.INT8
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
    shares: dict[str, float] = {}
    for op, ms in by_type.items():
        shares[category(op)] = shares.get(category(op), 0.0) + ms
    split = ", ".join(f"{c} {ms:.1f} ({ms / total:.0%})" for c, ms in sorted(shares.items(), key=lambda kv: -kv[1]))
    return f"total {total:.1f} [{split}]: " + ", ".join(f"{op} {ms:.1f}" for op, ms in items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", nargs="*", default=[str(CKPT / c) for c in DEFAULT])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--variants", action="store_true",
                    help="time every int8 variant (ORT QOperator/QDQ, u8s8/s8s8/u8u8, reduce_range, per-tensor, "
                         "optimization level, every op int8; LiteRT int8 I/O, builtin kernels)")
    ap.add_argument("--reuse", type=Path, help="--variants: take the mixed int8 graphs from this folder (see "
                    "variant_forms) instead of re-running the mixed-precision searches")
    ap.add_argument("--keep", type=Path, help="copy every form timed into this folder")
    ap.add_argument("--probe-drop", action="store_true",
                    help="instead of timing: the probe Y-PSNR drop of ORT every-Conv / every-op int8 (no float fallback)")
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
            if args.probe_drop:  # quality only, no timing
                print("\n".join(probe_drops(ck, loaded, work)), flush=True)
                continue
            if args.variants:
                paths = variant_forms(ck, loaded, work, args.size, args.reuse)
                exported = ("ort int8 mixed (as exported: QDQ u8s8 per-channel)", "litert int8 mixed")
            else:
                paths = {**onnx_forms(ck, loaded, work), **tflite_forms(ck, loaded, work, args.size)}
                exported = ("ort int8", "litert int8")
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                for f in work.glob(f"{ck.stem}_*"):
                    if f.suffix in (".onnx", ".tflite"):
                        shutil.copy(f, args.keep / f.name)
            for th in (int(t) for t in args.threads.split(",")):
                ms = bench(paths, args.size, th, args.runs)
                load = os.getloadavg()[0]
                for k, v in ms.items():
                    ref = ms["ort fp32" if k.startswith("ort") else "litert fp32"]
                    rows.append(f"| {ck.stem} | {th} | {k} | {v:.1f} | {ref / v:.2f}x |")
                f32 = min((v, k) for k, v in ms.items() if "fp32" in k)
                i8 = min((v, k) for k, v in ms.items() if "int8" in k)
                i8_export = min((v, k) for k, v in ms.items() if k in exported)
                headline.append(f"| {ck.stem} | {th} | {f32[1]} {f32[0]:.1f} | {i8_export[1]} {i8_export[0]:.1f} "
                                f"({f32[0] / i8_export[0]:.2f}x) | {i8[1]} {i8[0]:.1f} ({f32[0] / i8[0]:.2f}x) "
                                f"| {load:.1f} |")
                print(rows[-len(ms)], "...", headline[-1], flush=True)
            if args.profile:
                ort_keys = ((["ort fp32", exported[0], "ort int8 every Conv, QDQ u8s8"]
                             + [k for k in paths if k.startswith("ort int8 every op") and k.endswith("u8s8")])
                            if args.variants else ["ort fp32", "ort int8 every Conv"])
                ort_keys = [k for k in ort_keys if k in paths]
                for k in ort_keys:
                    profiles.append(f"- {ck.stem} {k} (onnxruntime profile, 1 thread, ms/run): "
                                    f"{top(ort_op_profile(paths[k], args.size))}")
                lite_keys = ["litert fp32", "litert int8 all ops", exported[1]] + (
                    ["litert int8 all ops, int8 I/O"] if args.variants else [])
                for k in lite_keys:
                    profiles.append(f"- {ck.stem} {k} (each op alone on XNNPACK, 1 thread, ms): "
                                    f"{top(litert_op_profile(paths[k]))}")
                print("\n".join(profiles[-len(ort_keys) - len(lite_keys):]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| checkpoint | threads | form | median ms | vs fp32 of the same runtime |")
    print("|---|---:|---|---:|---:|")
    print("\n".join(rows))
    print("\n| checkpoint | threads | best fp32 (ms) | best int8 as exported (ms, speed-up) "
          "| best int8 any (ms, speed-up) | load average after |")
    print("|---|---:|---|---|---|---:|")
    print("\n".join(headline))
    if profiles:
        print("\nWhere the time goes (total [by kind: int8 kernels, Q/DQ, float ops, layout]: top op types):\n")
        print("\n".join(profiles))
    print(f"\n({time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.2f} after)")


if __name__ == "__main__":
    main()
