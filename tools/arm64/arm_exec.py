"""Run one exported artifact on many inputs; meant to run *inside* emulated aarch64 Python.

Needs only numpy and the runtime of the artifact (onnxruntime for .onnx, ai-edge-litert
for .tflite): no edgesr, no torch. Inputs and outputs are .npy files in NCHW float32;
``--layout`` says what the artifact itself takes (``nchw`` for the ONNX contract, ``nhwc``
for the TFLite contract), and the script transposes around the artifact when it is NHWC.

    python3 arm_exec.py MODEL --layout nhwc --threads 1 --out-dir OUT --report run.json in0.npy in1.npy

writes OUT/out_0000.npy, OUT/out_0001.npy, ... (one per input, in order) and a JSON report
with the machine, the runtime versions, the load time and the time of each run.
Exit status is non-zero, with a message on stderr, on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np


def _cpuinfo_core() -> str | None:
    """'0x41:0xd0c'-style implementer:part from /proc/cpuinfo, as the runtimes see it."""
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    if "CPU part" not in fields:
        return None
    return f"{fields.get('CPU implementer', '?')}:{fields['CPU part']}"


class OnnxModel:
    runtime = "onnxruntime"

    def __init__(self, path: str, threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        (inp,) = self.session.get_inputs()
        (out,) = self.session.get_outputs()
        self.input_name, self.output_name = inp.name, out.name
        self.version = ort.__version__
        self.detail = {"providers": self.session.get_providers()}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]


class TfliteModel:
    runtime = "ai-edge-litert"

    def __init__(self, path: str, threads: int) -> None:
        from importlib.metadata import version

        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=path, num_threads=threads)
        self.interpreter.allocate_tensors()
        (self.inp,) = self.interpreter.get_input_details()
        (self.out,) = self.interpreter.get_output_details()
        self.version = version("ai-edge-litert")
        self.detail = {"delegate": "XNNPACK (default)"}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if tuple(self.inp["shape"]) != x.shape:
            self.interpreter.resize_tensor_input(self.inp["index"], list(x.shape))
            self.interpreter.allocate_tensors()
            (self.inp,) = self.interpreter.get_input_details()
            (self.out,) = self.interpreter.get_output_details()
        self.interpreter.set_tensor(self.inp["index"], x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.out["index"]).copy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help=".onnx or .tflite artifact")
    ap.add_argument("inputs", nargs="+", help="input .npy files, NCHW float32 (uint8/int8 for integer-I/O models)")
    ap.add_argument("--layout", choices=("nchw", "nhwc"), required=True,
                    help="layout of the artifact's input and output tensors")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--report", required=True, help="JSON report path")
    ap.add_argument("--require-machine", default="aarch64",
                    help="refuse to run unless platform.machine() is this ('' to skip)")
    args = ap.parse_args(argv)

    machine = platform.machine()
    if args.require_machine and machine != args.require_machine:
        print(f"arm_exec: platform.machine() is {machine!r}, expected {args.require_machine!r}",
              file=sys.stderr)
        return 3

    ext = os.path.splitext(args.model)[1].lower()
    kinds = {".onnx": OnnxModel, ".tflite": TfliteModel}
    if ext not in kinds:
        print(f"arm_exec: unknown artifact type {ext!r} (expected .onnx or .tflite)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    model = kinds[ext](args.model, args.threads)
    load_s = time.perf_counter() - t0

    os.makedirs(args.out_dir, exist_ok=True)
    run_s, outputs = [], []
    for i, path in enumerate(args.inputs):
        x = np.load(path)
        # float32, or the uint8/int8 image of an `--int8-io` artifact (the host converts)
        if x.ndim != 4 or x.dtype not in (np.float32, np.uint8, np.int8):
            print(f"arm_exec: {path}: expected 4-D float32/uint8/int8 NCHW, got {x.dtype} {x.shape}",
                  file=sys.stderr)
            return 2
        if args.layout == "nhwc":
            x = x.transpose(0, 2, 3, 1)
        x = np.ascontiguousarray(x)
        t = time.perf_counter()
        y = model(x)
        run_s.append(time.perf_counter() - t)
        if args.layout == "nhwc":
            y = y.transpose(0, 3, 1, 2)
        out = os.path.join(args.out_dir, f"out_{i:04d}.npy")
        np.save(out, np.ascontiguousarray(y, dtype=np.float32))
        outputs.append(out)

    report = {
        "machine": machine,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "runtime": model.runtime,
        "runtime_version": model.version,
        **model.detail,
        "qemu_cpu": os.environ.get("QEMU_CPU"),
        "cpuinfo_core": _cpuinfo_core(),
        "layout": args.layout,
        "threads": args.threads,
        "load_s": load_s,
        "run_s": run_s,
        "outputs": outputs,
    }
    with open(args.report, "w") as f:
        json.dump(report, f, indent=1)
    return 0


def _main() -> int:
    try:
        return main()
    except Exception as e:  # traceback for the log, then one summary line the caller reports
        import traceback

        traceback.print_exc()
        msg = " | ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"arm_exec: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_main())
