"""One runner protocol over PyTorch, onnxruntime and LiteRT.

Every runner takes and returns NCHW float32 arrays in [0, 1]:

    runner.run(x: np.ndarray (N, 3, H, W) float32 in [0, 1]) -> np.ndarray (N, 3, sH, sW)

and exposes ``name`` (runtime), ``version`` and ``threads``.  Runners are the only code
that knows a runtime's API or an artifact's layout: they read the layout from the
artifact's metadata (written by :mod:`edgesr.export`), so callers never special-case a
format.  Artifacts with a fixed batch of 1 are run image by image.  Artifacts with integer
I/O (``export --int8-io``: uint8 tensors, scale/zero point in the graph and the metadata) are
run transparently: the runner quantizes the float input (round half to even, saturate) and
dequantizes the output, so callers still see float32 [0, 1] (``io_dtype`` tells them).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import EdgeSRError, SizeRuleError

OPTIMIZATION_LEVELS = ("all", "extended", "basic", "none")


@runtime_checkable
class Runner(Protocol):
    name: str
    version: str
    threads: int | None

    def run(self, x: np.ndarray) -> np.ndarray: ...


def _pkg_version(*names: str) -> str:
    for n in names:
        try:
            return md.version(n)
        except md.PackageNotFoundError:
            continue
    return "unknown"


def default_threads() -> int:
    """Threads used when a runner is not told: every CPU this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_threads(threads: int | None) -> None:
    """A user's thread count: ``None`` (every CPU) or >= 1; one rule for every command."""
    if threads is not None and threads < 1:
        raise EdgeSRError(f"--threads must be >= 1, got {threads}")


def _check_input(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[1] != 3:
        raise SizeRuleError(f"expected an NCHW RGB batch (N, 3, H, W), got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _io_quant(meta: dict[str, str], side: str, graph_dtype: str, graph_quant=None, what: str = "artifact"):
    """The quantization of an integer graph input/output (``None`` for float32 tensors).

    ``graph_quant`` (scale, zero point) comes from the runtime where it has them (LiteRT);
    onnxruntime does not expose them, so ONNX artifacts take them from the metadata."""
    from ..export.int8_io import TensorQuant, quant_from_metadata

    if graph_dtype == "float32":
        return None
    if graph_dtype not in ("uint8", "int8"):
        raise EdgeSRError(f"{what} has a {graph_dtype} {side}; edgesr artifacts take float32 (or uint8/int8 "
                          "with --int8-io)")
    if graph_quant is not None and graph_quant[0]:
        return TensorQuant(graph_dtype, float(graph_quant[0]), int(graph_quant[1]))
    q = quant_from_metadata(meta, side)
    if q is None or q.dtype != graph_dtype:
        raise EdgeSRError(f"{what} has a {graph_dtype} {side} but its metadata gives no {side}_scale/"
                          f"{side}_zero_point for it; was it written by `edgesr export --int8-io`?")
    return q


def _check_size(x: np.ndarray, meta: dict[str, str], fixed: tuple[int, int] | None, what: str) -> None:
    h, w = x.shape[2:]
    if fixed is not None:
        if (h, w) != fixed:
            raise SizeRuleError(
                f"{what} has a fixed input size {fixed[0]}x{fixed[1]}; got {h}x{w} (re-export at this size, "
                "or export ONNX with dynamic shapes)"
            )
        return
    mult, lo = int(meta.get("multiple_of", 1)), int(meta.get("min_size", 1))
    if h < lo or w < lo or h % mult or w % mult:
        rule = f"multiples of {mult}" if mult > 1 else "any size"
        raise SizeRuleError(f"{what} needs input height/width >= {lo} and {rule}; got {h}x{w}")


# --- PyTorch ---------------------------------------------------------------------------


class TorchRunner:
    """Runs a PyTorch module (train or deploy form) under the artifact I/O contract.

    ``input_range`` is the model's native range; ``None`` takes it from the model's spec
    (1.0 for foreign modules).  ``threads`` sets ``torch.set_num_threads`` during ``run``.
    """

    name = "torch"

    def __init__(self, model, input_range: float | None = None, threads: int | None = None):
        import torch

        from ..models.registry import input_range_of

        self.model = model.eval()
        self.input_range = float(input_range if input_range is not None else input_range_of(model))
        self.threads = threads or torch.get_num_threads()
        self.version = torch.__version__

    def run(self, x: np.ndarray) -> np.ndarray:
        import torch

        x = _check_input(x)
        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.no_grad():
                t = torch.from_numpy(x)
                if self.input_range != 1.0:
                    t = t * self.input_range
                y = self.model(t)
                if self.input_range != 1.0:
                    y = y / self.input_range
        finally:
            torch.set_num_threads(old)
        return y.detach().to(torch.float32).numpy()


# --- onnxruntime ---------------------------------------------------------------------------


class OnnxRunner:
    """onnxruntime, CPU execution provider."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, threads: int | None = None, optimization: str = "all",
                 memory_pattern: bool = True):
        import onnxruntime as ort

        from ..export.metadata import read_onnx_metadata

        if optimization not in OPTIMIZATION_LEVELS:
            raise EdgeSRError(f"unknown optimization level {optimization!r} (known: {', '.join(OPTIMIZATION_LEVELS)})")
        self.path = Path(path)
        self.meta = read_onnx_metadata(self.path)
        self.threads = threads or default_threads()
        self.optimization = optimization
        self.version = ort.__version__
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[optimization]
        opts.log_severity_level = 3
        # memory_pattern=False for many same-shape runs (tiled upscaling): with ORT's
        # planned-pattern allocations on, the arena grew 0.9 -> 1.7 GB over two runs of
        # PlainUSR at 512x512; off it stays at 0.94 GB, same speed.
        opts.enable_mem_pattern = memory_pattern
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise EdgeSRError(f"onnxruntime cannot load {self.path.name}: {str(e).strip().splitlines()[0][:200]}") from e
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        dtypes = {"tensor(float)": "float32", "tensor(uint8)": "uint8", "tensor(int8)": "int8"}
        out = self.session.get_outputs()[0]
        self._q_in = _io_quant(self.meta, "input", dtypes.get(inp.type, inp.type), what=self.path.name)
        self._q_out = _io_quant(self.meta, "output", dtypes.get(out.type, out.type), what=self.path.name)
        self.io_dtype = self._q_in.dtype if self._q_in else "float32"
        self.layout = self.meta.get("layout", "NCHW").upper()
        dims = inp.shape
        self.fixed_batch = dims[0] if isinstance(dims[0], int) else None
        spatial = (dims[1], dims[2]) if self.layout == "NHWC" else (dims[2], dims[3])
        self.fixed_size = tuple(spatial) if all(isinstance(d, int) for d in spatial) else None

    def run(self, x: np.ndarray) -> np.ndarray:
        x = _check_input(x)
        _check_size(x, self.meta, self.fixed_size, f"{self.path.name}")
        if self.layout == "NHWC":
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        if self.fixed_batch == 1 and x.shape[0] != 1:
            y = np.concatenate([self._run1(x[i : i + 1]) for i in range(x.shape[0])])
        else:
            y = self._run1(x)
        if self.layout == "NHWC":
            y = y.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(y, dtype=np.float32)

    def _run1(self, x: np.ndarray) -> np.ndarray:
        if self._q_in is not None:
            x = self._q_in.quantize(x)
        y = self.session.run(None, {self.input_name: x})[0]
        return y if self._q_out is None else self._q_out.dequantize(y)


# --- LiteRT ------------------------------------------------------------------------------------


def _interpreter_module():
    """``(module, package name)``: ai-edge-litert, else the legacy tflite-runtime."""
    try:
        from ai_edge_litert import interpreter as mod

        return mod, "ai-edge-litert"
    except ImportError:
        try:
            from tflite_runtime import interpreter as mod  # type: ignore[import-not-found]

            return mod, "tflite-runtime"
        except ImportError:
            raise EdgeSRError("no TFLite runtime: install ai-edge-litert") from None


class LiteRTRunner:
    """LiteRT (ai-edge-litert) interpreter; XNNPACK delegate unless ``xnnpack=False``."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, xnnpack: bool = True):
        from ..export.metadata import read_tflite_metadata

        mod, package = _interpreter_module()
        self.path = Path(path)
        data = self.path.read_bytes()
        self.meta = read_tflite_metadata(data)
        self.threads = threads or default_threads()
        self.xnnpack = xnnpack
        self.name = package if xnnpack else f"{package}-noxnnpack"
        self.version = _pkg_version(package)
        kwargs = {"model_content": data, "num_threads": self.threads}
        if not xnnpack:
            kwargs["experimental_op_resolver_type"] = mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            self.interpreter = mod.Interpreter(**kwargs)
            self.interpreter.allocate_tensors()
        except Exception as e:
            raise EdgeSRError(f"LiteRT cannot load {self.path.name}: {str(e).strip().splitlines()[0][:200]}") from e
        self._in = self.interpreter.get_input_details()[0]
        self._out = self.interpreter.get_output_details()[0]
        self._q_in, self._q_out = (
            _io_quant(self.meta, side, np.dtype(d["dtype"]).name, d.get("quantization"), self.path.name)
            for side, d in (("input", self._in), ("output", self._out)))
        self.io_dtype = self._q_in.dtype if self._q_in else "float32"
        shape = tuple(int(d) for d in self._in["shape"])
        self.layout = self.meta.get("layout") or ("NHWC" if shape[-1] == 3 and shape[1] != 3 else "NCHW")
        self.layout = self.layout.upper()
        self.fixed_size = shape[1:3] if self.layout == "NHWC" else shape[2:4]

    def run(self, x: np.ndarray) -> np.ndarray:
        x = _check_input(x)
        _check_size(x, self.meta, self.fixed_size, f"{self.path.name}")
        outs = []
        for i in range(x.shape[0]):
            xi = x[i : i + 1]
            if self.layout == "NHWC":
                xi = np.ascontiguousarray(xi.transpose(0, 2, 3, 1))
            if self._q_in is not None:
                xi = self._q_in.quantize(xi)
            self.interpreter.set_tensor(self._in["index"], xi)
            self.interpreter.invoke()
            y = self.interpreter.get_tensor(self._out["index"])
            if self._q_out is not None:
                y = self._q_out.dequantize(y)
            outs.append(y.transpose(0, 3, 1, 2) if self.layout == "NHWC" else y)
        return np.ascontiguousarray(np.concatenate(outs), dtype=np.float32)


# --- dispatch -------------------------------------------------------------------------------


def open_runner(path: str | os.PathLike, **kwargs) -> OnnxRunner | LiteRTRunner:
    """The runner for an artifact file (by suffix, else by magic bytes).

    Keyword arguments go to the runner (``threads`` for both; ``optimization`` and
    ``memory_pattern`` for ONNX,
    ``xnnpack`` for TFLite); ``None`` values are dropped.
    """
    from ..export.metadata import artifact_format

    p = Path(path)
    if not p.is_file():
        raise EdgeSRError(f"artifact not found: {p}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    fmt = artifact_format(p)
    allowed = {"onnx": {"threads", "optimization", "memory_pattern"}, "tflite": {"threads", "xnnpack"}}[fmt]
    unknown = set(kwargs) - allowed
    if unknown:
        raise TypeError(f"{fmt} runner does not take {', '.join(sorted(unknown))}")
    return OnnxRunner(p, **kwargs) if fmt == "onnx" else LiteRTRunner(p, **kwargs)


def describe(runner: Runner) -> dict[str, object]:
    """A small JSON-able description of a runner (for reports)."""
    d: dict[str, object] = {"name": runner.name, "version": runner.version, "threads": runner.threads}
    for attr in ("layout", "optimization", "xnnpack", "io_dtype"):
        if hasattr(runner, attr):
            d[attr] = getattr(runner, attr)
    path = getattr(runner, "path", None)
    if path is not None:
        d["artifact"] = str(path)
    return json.loads(json.dumps(d, default=str))
