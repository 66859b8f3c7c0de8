#!/usr/bin/env python3
"""edgesr latency benchmark -- one file, needs only numpy plus onnxruntime or ai-edge-litert.

This file is two things at once:

* the benchmark script that ``edgesr bundle`` copies next to an artifact for an ARM
  board or an Android phone (Termux).  There it runs stand-alone: no edgesr, no torch;
* the single source of the result format for ``edgesr bench`` itself, which imports
  the measuring and record-building functions below.  Both therefore write exactly the
  same JSON, and ``edgesr bench --import device.json`` reads what a device produced.

Usage on a device (see the bundle's README.md)::

    python3 edgesr_bench.py                      # artifact and settings from the bundle
    python3 edgesr_bench.py --threads 1,4 --runs 20 --json pixel7.json --label pixel7

Result format (``schema: "edgesr.bench/1"``) -- one JSON object:

``schema``     "edgesr.bench/1" (a reader accepts the same major version).
``created``    UTC time, ISO 8601.
``host``       label, hostname, system, machine, cpu, cpu_count, python, and the 1-minute
               load average before and after the run (``load_before``/``load_after``; a
               load above 0.5 on an idle board, or near the core count anywhere, means the
               figures are contended).
``versions``   package versions of the runtimes used.
``settings``   runs, warmup, memory method.
``peaks``      one entry per (runtime family, threads): the GEMM probe measured through the
               same runtime: ``family, threads, gemm{k,h,w,layers,channels,m,n,macs},
               latency_ms{...}, gflops, probes`` or ``error``.  The probe runs twice, before
               and after the cells (``PEAK_RUNS`` timed runs each); ``gflops`` comes from
               the fastest of all those runs (a peak is a best case, and a probe that hit a
               busy moment must not lower it); ``latency_ms`` is of the better probe.
``results``    one entry per cell (runtime x threads x input size):
    ``label, model, variant, scale, artifact, form`` (train|trainmode|folded|deploy|artifact),
    ``runtime`` (torch-train|torch-trainmode|torch-folded|torch-deploy|onnxruntime|litert),
    ``family``
    (torch|onnxruntime|litert), ``runtime_version, threads, input_hw, output_hw,
    output_mpix, runs, warmup``,
    ``latency_ms {median, p90, min, mean, max}`` and ``samples_ms`` (every timed run:
    wall time of one ``runner.run(x)`` on a NCHW float32 numpy array, layout conversion
    and copies included),
    ``throughput_mpix_s`` output megapixels per second at the median,
    ``macs`` of the deploy-form graph at this input size (null when unknown),
    ``gflops`` = 2*macs / median, ``peak_gflops`` the family's peak at the same thread
    count, ``pct_of_peak`` = 100*gflops/peak_gflops, ``pct_of_machine_peak`` = against
    the best peak of any family in the document at the same thread count (a runtime's
    convolutions can beat its own GEMM; this one cannot exceed what the machine showed),
    ``memory {method, rss_before_load_mb, peak_rss_mb, run_peak_rss_mb, model_mb}``:
    every cell runs in its own process. ``rss_before_load_mb`` is its resident set after
    imports and after the input array exists, before the model is loaded;
    ``peak_rss_mb`` its high-water mark over its whole life (/proc VmHWM; ru_maxrss where
    there is no /proc -- Linux's ru_maxrss would include the parent's size at fork);
    ``run_peak_rss_mb`` the high-water mark during the timed runs only (Linux: the peak
    is reset through /proc/self/clear_refs after loading and warm-up; null elsewhere);
    ``model_mb`` = (run_peak_rss_mb or peak_rss_mb) - rss_before_load_mb, i.e. what the
    loaded model, the runtime's arena and the activations cost beyond the bare process.
    (``edgesr bench`` adds ``torch_imported``: false for onnxruntime/LiteRT cells, whose
    worker process never loads PyTorch, as on a device.)
    ``error`` is null, or the one-line reason the cell could not run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone

import numpy as np

SCHEMA = "edgesr.bench/1"
SCHEMA_MAJOR = SCHEMA.rsplit("/", 1)[1].split(".")[0]

# Filled in by `edgesr bundle` (artifact name, layout, sizes, MACs, peak probe).
BUNDLE = json.loads(r"""{}""")  # EDGESR-BUNDLE
# Filled in by `edgesr bundle`: the sources of edgesr/runtime/tiling.py and edgesr/imageio.py
# (self-contained numpy/Pillow modules), so `upscale` runs the tested algorithm itself.
EMBEDDED_MODULES: dict = {}  # EDGESR-MODULES

MEMORY_METHOD = "process per cell; /proc VmHWM over its life and over the timed runs (reset after load+warm-up)"
FAMILY_OF_FORMAT = {"onnx": "onnxruntime", "tflite": "litert"}


# --------------------------------------------------------------------------- statistics


def summarize(samples_s) -> dict:
    """Latency statistics in milliseconds of a list of run times in seconds."""
    a = np.asarray(samples_s, dtype=np.float64) * 1e3
    if a.size == 0:
        raise ValueError("no timed runs")
    return {
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "min": float(a.min()),
        "mean": float(a.mean()),
        "max": float(a.max()),
    }


def gflops_of(macs, median_ms):
    if not macs or not median_ms:
        return None
    return 2.0 * macs / (median_ms * 1e-3) / 1e9


def cell_record(*, runtime, family, threads, input_hw, runs, warmup, samples_s=None, output_hw=None, macs=None,
                peak_gflops=None, memory=None, runtime_version=None, label=None, model=None, variant=None,
                scale=None, artifact=None, form="artifact", error=None) -> dict:
    """One result row of the schema; derived figures are computed here and nowhere else."""
    rec = {
        "label": label, "model": model, "variant": variant, "scale": scale, "artifact": artifact, "form": form,
        "runtime": runtime, "family": family, "runtime_version": runtime_version, "threads": int(threads),
        "input_hw": list(input_hw), "output_hw": list(output_hw) if output_hw else None, "output_mpix": None,
        "runs": int(runs), "warmup": int(warmup), "latency_ms": None, "samples_ms": None,
        "throughput_mpix_s": None, "macs": int(macs) if macs else None, "gflops": None,
        "peak_gflops": peak_gflops, "pct_of_peak": None, "pct_of_machine_peak": None, "memory": memory,
        "error": error,
    }
    if error is None and samples_s:
        lat = summarize(samples_s)
        rec["latency_ms"] = lat
        rec["samples_ms"] = [round(s * 1e3, 4) for s in samples_s]
        if output_hw:
            mpix = output_hw[0] * output_hw[1] / 1e6
            rec["output_mpix"] = mpix
            rec["throughput_mpix_s"] = mpix / (lat["median"] * 1e-3)
        rec["gflops"] = gflops_of(macs, lat["median"])
        if rec["gflops"] and peak_gflops:
            rec["pct_of_peak"] = 100.0 * rec["gflops"] / peak_gflops
    return rec


PEAK_RUNS, PEAK_WARMUP = 10, 2


def peak_record(*, family, threads, gemm, samples_s=None, runtime_version=None, error=None) -> dict:
    rec = {"family": family, "threads": int(threads), "gemm": gemm, "runtime_version": runtime_version,
           "latency_ms": None, "gflops": None, "probes": 1, "error": error}
    if error is None and samples_s:
        rec["latency_ms"] = summarize(samples_s)
        # A peak is a best case: the fastest run (cells report their median against it).
        rec["gflops"] = gflops_of(gemm["macs"], rec["latency_ms"]["min"])
    return rec


def merge_peak(first: dict, second: dict) -> dict:
    """Two probes of one (family, threads): keep the faster; an error only if both failed."""
    good = [p for p in (first, second) if p.get("gflops")]
    best = max(good, key=lambda p: p["gflops"]) if good else first
    return {**best, "probes": first.get("probes", 1) + second.get("probes", 1)}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        for key in ("model name", "Hardware", "Processor", "CPU part"):
            for line in info.splitlines():
                if line.lower().startswith(key.lower()) and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average():
    """1-minute load average (None where unknown): other work on the machine skews every figure."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def host_info(label=None) -> dict:
    return {
        "load_before": load_average(),
        "label": label or socket.gethostname(),
        "hostname": socket.gethostname(),
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def new_document(label=None, versions=None, runs=0, warmup=0) -> dict:
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": host_info(label),
        "versions": dict(versions or {}),
        "settings": {"runs": runs, "warmup": warmup, "memory": MEMORY_METHOD},
        "peaks": [],
        "results": [],
    }


def attach_peaks(doc: dict) -> None:
    """Fill peak_gflops / pct_of_peak of every result from the document's peaks (and close the run)."""
    doc["host"]["load_after"] = load_average()
    best = {(p["family"], p["threads"]): p["gflops"] for p in doc["peaks"] if p.get("gflops")}
    machine: dict = {}
    for (_, t), g in best.items():
        machine[t] = max(machine.get(t, 0.0), g)
    for r in doc["results"]:
        peak = best.get((r["family"], r["threads"]))
        top = machine.get(r["threads"])
        r["peak_gflops"] = peak
        r["pct_of_peak"] = 100.0 * r["gflops"] / peak if (peak and r.get("gflops")) else None
        r["pct_of_machine_peak"] = 100.0 * r["gflops"] / top if (top and r.get("gflops")) else None


# --------------------------------------------------------------------------- memory


def _proc_status_mb(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_now_mb():
    return _proc_status_mb("VmRSS")


def lifetime_peak_rss_mb():
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _trim_heap():
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _proc_status_mb("VmHWM"), rss_now_mb()
    return hwm is not None and rss is not None and hwm <= rss + 1.0


# --------------------------------------------------------------------------- timing


def measure(make_runner, x, runs: int, warmup: int) -> dict:
    """Load a runner, warm it up, time ``runs`` calls; memory as documented in the module docstring.

    Meant to run in a fresh process per cell (the memory figures assume it).
    """
    gc.collect()
    before = rss_now_mb()
    runner = make_runner()
    y = None
    for _ in range(warmup):
        y = runner.run(x)
    gc.collect()
    _trim_heap()
    load_peak = _proc_status_mb("VmHWM")  # imports + load + warm-up
    can_reset = reset_peak_rss()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        y = runner.run(x)
        samples.append(time.perf_counter() - t0)
    run_peak = _proc_status_mb("VmHWM") if can_reset else None
    if load_peak is not None:
        life_peak = max(load_peak, run_peak or 0.0)
    else:  # no /proc: ru_maxrss (on Linux it would also count the parent's size at fork, hence second choice)
        life_peak = lifetime_peak_rss_mb()
    top = run_peak if run_peak is not None else life_peak
    memory = {
        "method": MEMORY_METHOD,
        "rss_before_load_mb": before,
        "peak_rss_mb": life_peak,
        "run_peak_rss_mb": run_peak,
        "model_mb": (top - before) if (top is not None and before is not None) else None,
    }
    return {
        "samples_s": samples,
        "output_shape": list(np.shape(y)) if y is not None else None,
        "memory": memory,
        "runtime_version": getattr(runner, "version", None),
        "runner": getattr(runner, "name", type(runner).__name__),
    }


def run_child(argv, job: dict, timeout=None) -> dict:
    """Run one measurement job in a child process; its last stdout line is the JSON answer."""
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        proc = subprocess.run([*argv, json.dumps(job)], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = [l.strip() for l in (proc.stderr or "").splitlines() if l.strip()]
    reason = tail[-1] if tail else f"exit code {proc.returncode}"
    return {"error": f"worker failed (exit {proc.returncode}): {reason[:300]}"}


def output_hw_of(shape, layout):
    if not shape or len(shape) != 4:
        return None
    return [shape[2], shape[3]] if layout == "NCHW" else [shape[1], shape[2]]


# --------------------------------------------------------------------------- device runners
#
# On a device there is no edgesr: these two small runners follow the same contract as
# edgesr.runtime.runners (NCHW float32 [0,1] numpy in, NCHW out; TFLite artifacts are
# NHWC inside and are transposed here).


def _integer_input(x, dtype, scale, zero_point):
    """An ``--int8-io`` artifact takes the quantized image: real = scale * (q - zero_point)."""
    if dtype == np.float32:
        return np.ascontiguousarray(x, dtype=np.float32)
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(dtype)


class DeviceOnnxRunner:
    name = "onnxruntime"

    def __init__(self, path, threads, layout="NCHW"):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        # uint8 input: an `--int8-io` artifact; its scale / zero point are in edgesr's metadata
        # (onnxruntime's graph inputs do not carry them)
        self.uint8 = self.session.get_inputs()[0].type == "tensor(uint8)"
        meta = self.session.get_modelmeta().custom_metadata_map
        self.in_quant = (float(meta.get("input_scale", 1.0 / 255.0)), int(meta.get("input_zero_point", 0)))
        self.version, self.threads, self.layout = ort.__version__, int(threads), layout

    def run(self, x):
        if self.layout == "NHWC":
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        if self.uint8:
            x = _integer_input(x, np.uint8, *self.in_quant)
        y = self.session.run(None, {self.input_name: x})[0]
        return np.ascontiguousarray(y.transpose(0, 3, 1, 2)) if self.layout == "NHWC" else y


class DeviceLiteRTRunner:
    name = "litert"

    def __init__(self, path, threads, layout="NHWC"):
        try:
            from ai_edge_litert.interpreter import Interpreter

            try:
                from importlib.metadata import version

                self.version = version("ai-edge-litert")
            except Exception:
                self.version = "ai-edge-litert"
        except ImportError:  # older boards: tflite-runtime (slower, numpy<2 only)
            from tflite_runtime.interpreter import Interpreter

            import tflite_runtime

            self.version = "tflite-runtime " + getattr(tflite_runtime, "__version__", "?")
        self.interpreter = Interpreter(model_path=str(path), num_threads=int(threads))
        self.interpreter.allocate_tensors()
        self.inp = self.interpreter.get_input_details()[0]
        self.out = self.interpreter.get_output_details()[0]
        self.threads, self.layout = int(threads), layout
        self._shape = tuple(self.inp["shape"])

    def run(self, x):
        if self.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        scale, zero_point = self.inp["quantization"]
        x = _integer_input(x, np.dtype(self.inp["dtype"]).type, scale, zero_point)
        if tuple(x.shape) != self._shape:
            self.interpreter.resize_tensor_input(self.inp["index"], list(x.shape))
            self.interpreter.allocate_tensors()
            self.out = self.interpreter.get_output_details()[0]
            self._shape = tuple(x.shape)
        self.interpreter.set_tensor(self.inp["index"], x)
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.out["index"])
        return np.ascontiguousarray(y.transpose(0, 3, 1, 2)) if self.layout == "NHWC" else y.copy()


def _device_runner(runtime, path, threads, layout):
    if runtime == "onnxruntime":
        return DeviceOnnxRunner(path, threads, layout)
    if runtime == "litert":
        return DeviceLiteRTRunner(path, threads, layout)
    raise ValueError(f"unknown runtime {runtime!r}")


def _device_cell(job: dict) -> dict:
    """Child-process side on a device: one runner, one input shape."""
    x = np.random.default_rng(0).random(job["input_shape"], dtype=np.float32)
    return measure(lambda: _device_runner(job["runtime"], job["path"], job["threads"], job["layout"]),
                   x, job["runs"], job["warmup"])


# --------------------------------------------------------------------------- device main


def _parse_list(text, conv):
    return [conv(t) for t in str(text).replace(" ", "").split(",") if t]


def _parse_hw(text):
    t = text.lower()
    h, _, w = t.partition("x")
    return [int(h), int(w or h)]


def _here(name):
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)


def _versions(runtime):
    out = {"numpy": np.__version__}
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:
        return out
    for pkg in (["onnxruntime"] if runtime == "onnxruntime" else ["ai-edge-litert", "tflite-runtime"]):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def fmt_ms(v) -> str:
    """Milliseconds with 3 significant digits below 100 ms, whole numbers above."""
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _format_table(doc) -> str:
    head = ["runtime", "thr", "input", "median ms", "p90 ms", "min ms", "MP/s", "GFLOP/s", "% peak", "model MB"]
    # (% peak: of this runtime's own sgemm peak, the only family a device run measures)
    rows = []
    for r in doc["results"]:
        if r.get("error"):
            rows.append([r["runtime"], str(r["threads"]), "x".join(map(str, r["input_hw"])), "error: " + r["error"]])
            continue
        lat, mem = r["latency_ms"], r.get("memory") or {}
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        rows.append([r["runtime"], str(r["threads"]), "x".join(map(str, r["input_hw"])), fmt_ms(lat["median"]),
                     fmt_ms(lat["p90"]), fmt_ms(lat["min"]), fmt(r["throughput_mpix_s"], ".2f"),
                     fmt(r["gflops"], ".1f"), fmt(r["pct_of_peak"], ".0f"), fmt(mem.get("model_mb"), ".0f")])
    for p in doc["peaks"]:
        val = "error: " + p["error"] if p.get("error") else f"{p['gflops']:.1f} GFLOP/s"
        rows.append([f"peak {p['family']}", str(p["threads"]), "sgemm", val])
    widths = [max(len(str(row[i])) for row in [head] + rows if i < len(row)) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(widths[i]) for i, c in enumerate(row)) for row in [head] + rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- device upscale
#
# `python3 edgesr_bench.py upscale photo.jpg`: the same tiling, padding, blending and image
# IO as `edgesr upscale` (the embedded modules above; in the package, edgesr's own).

_PACKAGE_MODULES = {"tiling": "edgesr.runtime.tiling", "imageio": "edgesr.imageio"}


def embedded_module(name):
    """The module ``edgesr bundle`` embedded under ``name``, else edgesr's own."""
    import importlib
    import types

    src = EMBEDDED_MODULES.get(name)
    if src is None:
        return importlib.import_module(_PACKAGE_MODULES[name])
    key = f"edgesr_embedded_{name}"
    if key not in sys.modules:
        mod = types.ModuleType(key)
        sys.modules[key] = mod  # dataclasses look their module up while the class is built
        exec(compile(src, f"<edgesr {name}.py>", "exec"), mod.__dict__)
    return sys.modules[key]


def _int_or_none(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def upscale_main(argv) -> int:
    """Upscale images with the bundled artifact; bad inputs are listed, exit 2 if any failed."""
    art = BUNDLE.get("artifact", {})
    ap = argparse.ArgumentParser(prog="edgesr_bench.py upscale",
                                 description="Upscale images with the bundled artifact (tiled, any size).")
    ap.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    ap.add_argument("--artifact", default=_here(art["file"]) if art.get("file") else None)
    ap.add_argument("--output", "-o", default="upscaled", help="output folder (default: ./upscaled)")
    ap.add_argument("--overlap", type=int, default=None, help="tile overlap in input px")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--format", choices=("png", "jpg", "webp"), default="png")
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = ap.parse_args(argv)
    if not args.artifact or not os.path.isfile(args.artifact):
        ap.error(f"artifact not found: {args.artifact}")
    if art.get("file") and os.path.basename(args.artifact) != art["file"]:
        ap.error("--artifact: this script only knows the bundled artifact's scale and size rule")
    if not art.get("scale"):
        ap.error("the bundled artifact records no scale (not written by `edgesr export`)")
    tiling, imageio = embedded_module("tiling"), embedded_module("imageio")
    fmt = "tflite" if args.artifact.endswith((".tflite", ".lite")) else "onnx"
    runner = _device_runner(FAMILY_OF_FORMAT[fmt], args.artifact, args.threads,
                            art.get("layout") or ("NHWC" if fmt == "tflite" else "NCHW"))
    scale, rule = int(art["scale"]), {"min_size": art.get("min_size", 1), "multiple_of": art.get("multiple_of", 1)}
    fixed = None if art.get("dynamic") else art.get("input_hw")
    label = "-".join(str(art[k]) for k in ("model", "variant") if art.get(k)) or "model"
    failed = 0
    for src in imageio.find_images(args.inputs):
        out = os.path.join(args.output, imageio.output_name(src, label, scale, args.format))
        if os.path.exists(out) and not args.overwrite:
            print(f"skipped: {out} exists (use --overwrite)", file=sys.stderr)
            continue
        try:
            pic = imageio.read_picture(src)
            h, w = pic.size
            tile, overlap = tiling.plan_tiles(h, w, fixed_tile=fixed, overlap=args.overlap, size_rule=rule,
                                              receptive_field=_int_or_none(art.get("receptive_field")))
            t = time.perf_counter()
            blocks = tiling.iter_upscaled_blocks(runner.run, pic.rgb, scale, tile=tile, overlap=overlap, size_rule=rule)
            os.makedirs(args.output, exist_ok=True)
            tmp = out + ".part"
            try:
                imageio.write_upscaled(tmp, pic, blocks, scale, args.format)
                os.replace(tmp, out)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            seconds = time.perf_counter() - t
        except Exception as e:  # one line per bad input; the others still run
            failed += 1
            print(f"failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
            continue
        mpix = scale * scale * h * w / 1e6
        print(f"{out}: {w}x{h} -> {scale * w}x{scale * h}, {seconds:.2f} s, {mpix / seconds:.2f} output MP/s")
    return 2 if failed else 0


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["upscale"]:
        return upscale_main(argv[1:])
    if argv[:1] == ["--_cell"]:  # child process: one measurement, JSON on stdout
        print(json.dumps(_device_cell(json.loads(argv[1]))))
        return 0
    art = BUNDLE.get("artifact", {})
    ap = argparse.ArgumentParser(description="edgesr latency benchmark for one ONNX/TFLite artifact.")
    ap.add_argument("artifact", nargs="?", default=_here(art["file"]) if art.get("file") else None)
    ap.add_argument("--threads", default=None, help="comma list (default: 1 and all cores)")
    ap.add_argument("--sizes", default=None, help="HxW list; only for dynamic ONNX artifacts")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default=None, help="result file (default: bench_<label>.json here)")
    ap.add_argument("--label", default=None, help="name of this device in tables/plots (default: hostname)")
    ap.add_argument("--no-peak", action="store_true", help="skip the sgemm peak measurement")
    args = ap.parse_args(argv)
    if not args.artifact:
        ap.error("give the artifact path (no bundle information in this script)")
    path = args.artifact
    if not os.path.isfile(path):
        ap.error(f"artifact not found: {path}")
    fmt = "tflite" if path.endswith((".tflite", ".lite")) else "onnx"
    runtime = FAMILY_OF_FORMAT[fmt]
    if art.get("file") and os.path.basename(path) != art["file"]:
        art = {}  # another artifact than the bundled one: its recorded facts do not apply
    layout = art.get("layout") or ("NHWC" if fmt == "tflite" else "NCHW")
    ncpu = os.cpu_count() or 1
    threads = _parse_list(args.threads, int) if args.threads else sorted({1, ncpu})
    if args.sizes:
        if not art.get("dynamic") and art.get("input_hw"):
            if any(_parse_hw(s) != art["input_hw"] for s in _parse_list(args.sizes, str)):
                ap.error(f"this artifact has a static input of {art['input_hw']}; --sizes cannot change it")
        sizes = [_parse_hw(s) for s in _parse_list(args.sizes, str)]
    else:
        sizes = art.get("sizes") or ([art["input_hw"]] if art.get("input_hw") else None)
        if not sizes:
            ap.error("give --sizes HxW (the artifact's input size is not recorded)")
    macs = art.get("macs") or {}
    label = args.label or socket.gethostname()
    doc = new_document(label, _versions(runtime), args.runs, args.warmup)
    me = [sys.executable, os.path.abspath(__file__), "--_cell"]

    peak_info = BUNDLE.get("peak") or {}
    do_peak = (not args.no_peak and peak_info.get("file") and os.path.exists(_here(peak_info["file"]))
               and peak_info["file"].endswith("." + fmt))

    def probe_peaks(when):
        out = []
        for t in threads:
            print(f"peak sgemm ({when}), {runtime}, {t} thread(s) ...", file=sys.stderr, flush=True)
            g = peak_info["gemm"]
            job = {"runtime": runtime, "path": _here(peak_info["file"]), "threads": t,
                   "layout": "NHWC" if fmt == "tflite" else "NCHW",
                   "input_shape": [1, g.get("channels", 3), g["h"], g["w"]], "runs": PEAK_RUNS,
                   "warmup": PEAK_WARMUP}
            res = run_child(me, job)
            out.append(peak_record(family=runtime, threads=t, gemm=g, samples_s=res.get("samples_s"),
                                   runtime_version=res.get("runtime_version"), error=res.get("error")))
        return out

    first = probe_peaks("before") if do_peak else []
    for hw in sizes:
        for t in threads:
            print(f"{os.path.basename(path)}, {runtime}, {t} thread(s), {hw[0]}x{hw[1]} ...", file=sys.stderr,
                  flush=True)
            job = {"runtime": runtime, "path": path, "threads": t, "layout": layout,
                   "input_shape": [1, 3, hw[0], hw[1]], "runs": args.runs, "warmup": args.warmup}
            res = run_child(me, job)
            doc["results"].append(cell_record(
                runtime=runtime, family=runtime, threads=t, input_hw=hw, runs=args.runs, warmup=args.warmup,
                samples_s=res.get("samples_s"), output_hw=output_hw_of(res.get("output_shape"), "NCHW"),
                macs=macs.get(f"{hw[0]}x{hw[1]}"), memory=res.get("memory"),
                runtime_version=res.get("runtime_version"), label=art.get("label") or os.path.basename(path),
                model=art.get("model"), variant=art.get("variant"), scale=art.get("scale"),
                artifact=os.path.basename(path), form="artifact", error=res.get("error")))
    if do_peak:
        doc["peaks"] = [merge_peak(a, b) for a, b in zip(first, probe_peaks("after"))]
    attach_peaks(doc)
    out = args.json or f"bench_{label}.json"
    tmp = out + ".part"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, out)
    print(_format_table(doc))
    print(f"\nwrote {out}  (copy it back and run: edgesr bench --import {os.path.basename(out)})")
    return 0 if all(not r.get("error") for r in doc["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
