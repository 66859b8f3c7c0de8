"""This machine's fp32 peak, measured per runtime family with one large sgemm.

"% of peak" is only meaningful against what the *same* runtime achieves on a pure
matrix multiply at the *same* thread count, so the peak is measured through the very
runner the model cells use, on a tiny GEMM model built programmatically here:

- torch:        ``torch.mm`` chain in an ``nn.Module`` (run by ``TorchRunner``);
- onnxruntime:  an ONNX graph of ``MatMul`` nodes (built with ``onnx.helper``);
- litert:       a TFLite graph of ``FULLY_CONNECTED`` ops (built with the TFLite
                flatbuffer schema shipped in ``ai-edge-litert``; no converter involved).

All three compute the same thing and obey the artifact I/O contract (an RGB image, ONNX
and torch NCHW, TFLite NHWC; the runners convert), so they go through the runners
unchanged: the ``(1, 3, H, W)`` input, viewed as ``H*W`` rows of 3 values, is lifted to
``K`` channels, multiplied ``layers`` times by one constant ``K x K`` weight and projected
back to 3 channels.  Every product is the "Linear" form ``activations (H*W x K) @ W^T``
with the weight as the constant right-hand operand -- the form each runtime prepacks and
runs fastest (ONNX ``Gemm(transB=1)``, TFLite ``FULLY_CONNECTED``, ``F.linear``; with
the weight on the left onnxruntime measured ~15% slower here).  The projections cost
``6*K*H*W`` multiply-adds against ``layers*K*K*H*W`` (0.15% at the defaults), and the
3-channel I/O keeps the runners' layout copies negligible; all of it is in ``Gemm.macs``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Gemm:
    """(1,3,H,W) -> lift to K channels -> ``layers`` x (K x K) @ (K x H*W) -> project to 3 channels."""

    k: int = 1024
    h: int = 32
    w: int = 32
    layers: int = 4
    channels: int = 3

    @property
    def m(self) -> int:
        return self.h * self.w

    @property
    def macs(self) -> int:
        return self.m * (2 * self.channels * self.k + self.layers * self.k * self.k)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, self.channels, self.h, self.w)

    def as_dict(self) -> dict:
        return {**asdict(self), "m": self.m, "n": self.k, "macs": self.macs}

    def weights(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(K x C) lift, (K x K) chain weight, (C x K) projection; scaled to keep magnitudes near 1."""
        rng = np.random.default_rng(0)
        c, k = self.channels, self.k
        lift = rng.standard_normal((k, c)) / np.sqrt(c)
        chain = rng.standard_normal((k, k)) / np.sqrt(k)
        proj = rng.standard_normal((c, k)) / np.sqrt(k)
        return tuple(a.astype(np.float32) for a in (lift, chain, proj))  # type: ignore[return-value]

    def reference(self, x: np.ndarray) -> np.ndarray:
        """The probe's output in float64 numpy (for tests)."""
        lift, chain, proj = (a.astype(np.float64) for a in self.weights())
        y = x.reshape(self.channels, self.m).T.astype(np.float64) @ lift.T
        for _ in range(self.layers):
            y = y @ chain.T
        return (y @ proj.T).T.reshape(self.input_shape)

    def input(self) -> np.ndarray:
        return np.random.default_rng(1).random(self.input_shape, dtype=np.float32)


DEFAULT_GEMM = Gemm()

FAMILIES = ("torch", "onnxruntime", "litert")


def family_of(runtime: str) -> str:
    """``torch-train``/``torch-folded``/``torch-deploy`` -> ``torch``; others are their own family."""
    return "torch" if runtime.startswith("torch") else runtime


# --------------------------------------------------------------------------- torch


def torch_gemm_module(g: Gemm = DEFAULT_GEMM):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class GemmChain(nn.Module):
        def __init__(self):
            super().__init__()
            for name, a in zip(("lift", "chain", "proj"), g.weights()):
                self.register_buffer(name, torch.from_numpy(a))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.linear(x.reshape(g.channels, g.m).t(), self.lift)
            for _ in range(g.layers):
                y = F.linear(y, self.chain)
            return F.linear(y, self.proj).t().reshape(g.input_shape)

    return GemmChain().eval()


# --------------------------------------------------------------------------- onnx


def _peak_metadata(g: Gemm, fmt: str, layout: str) -> dict[str, str]:
    shape = [1, g.channels, g.h, g.w] if layout == "NCHW" else [1, g.h, g.w, g.channels]
    return {
        "format": fmt,
        "layout": layout,
        "io_range": "0,1",
        "input_shape": json.dumps(shape),
        "input_size": f"{g.h}x{g.w}",
        "dynamic": "false",
        "purpose": "edgesr peak-sgemm probe",
        "gemm": json.dumps(g.as_dict()),
    }


def write_onnx_gemm(path: str | os.PathLike, g: Gemm = DEFAULT_GEMM) -> Path:
    """NCHW ``(1,C,H,W)`` -> (HW, C) rows -> Gemm lift, ``layers`` x Gemm(., W, transB=1), Gemm proj -> NCHW."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    lift, chain, proj = g.weights()
    nodes = [helper.make_node("Reshape", ["x", "shape_2d"], ["x2"]),
             helper.make_node("Transpose", ["x2"], ["rows"], perm=[1, 0]),
             helper.make_node("Gemm", ["rows", "lift"], ["y0"], transB=1)]
    for i in range(g.layers):
        nodes.append(helper.make_node("Gemm", [f"y{i}", "w"], [f"y{i + 1}"], transB=1))
    nodes.append(helper.make_node("Gemm", [f"y{g.layers}", "proj"], ["out_rows"], transB=1))
    nodes.append(helper.make_node("Transpose", ["out_rows"], ["out2"], perm=[1, 0]))
    nodes.append(helper.make_node("Reshape", ["out2", "shape_4d"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "peak_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(g.input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(g.input_shape))],
        initializer=[
            numpy_helper.from_array(lift, "lift"),
            numpy_helper.from_array(chain, "w"),
            numpy_helper.from_array(proj, "proj"),
            numpy_helper.from_array(np.array([g.channels, g.m], np.int64), "shape_2d"),
            numpy_helper.from_array(np.array(g.input_shape, np.int64), "shape_4d"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="edgesr-bench")
    model.ir_version = 9
    for k, v in _peak_metadata(g, "onnx", "NCHW").items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(model)
    out = Path(path)
    tmp = out.with_name(out.name + ".part")
    onnx.save(model, str(tmp))
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------- tflite


def write_tflite_gemm(path: str | os.PathLike, g: Gemm = DEFAULT_GEMM) -> Path:
    """NHWC ``(1,H,W,C)`` -> FULLY_CONNECTED lift, ``layers`` x FULLY_CONNECTED (one shared weight), projection."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as S

    def tensor(name: str, shape, buffer: int) -> "S.TensorT":
        t = S.TensorT()
        t.name, t.shape, t.type, t.buffer = name.encode(), list(shape), S.TensorType.FLOAT32, buffer
        return t

    def buffer(data: bytes) -> "S.BufferT":
        b = S.BufferT()
        b.data = np.frombuffer(data, np.uint8)
        return b

    lift, chain, proj = g.weights()  # (out, in) row-major: TFLite's FULLY_CONNECTED weight layout
    meta = json.dumps(_peak_metadata(g, "tflite", "NHWC")).encode()
    buffers = [S.BufferT(), buffer(lift.tobytes()), buffer(chain.tobytes()), buffer(proj.tobytes()), buffer(meta)]
    tensors = [tensor("x", [1, g.h, g.w, g.channels], 0), tensor("lift", [g.k, g.channels], 1),
               tensor("w", [g.k, g.k], 2), tensor("proj", [g.channels, g.k], 3)]
    ops = []
    prev = 0
    for i, weight in enumerate([1] + [2] * g.layers + [3]):
        last = i == g.layers + 1
        tensors.append(tensor("y" if last else f"y{i}", [1, g.h, g.w, g.channels if last else g.k], 0))
        op = S.OperatorT()
        op.opcodeIndex = 0
        op.inputs, op.outputs = [prev, weight, -1], [len(tensors) - 1]
        op.builtinOptionsType = S.BuiltinOptions.FullyConnectedOptions
        op.builtinOptions = S.FullyConnectedOptionsT(keepNumDims=True)
        ops.append(op)
        prev = len(tensors) - 1

    sub = S.SubGraphT()
    sub.tensors, sub.inputs, sub.outputs, sub.operators, sub.name = tensors, [0], [prev], ops, b"main"
    code = S.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = S.BuiltinOperator.FULLY_CONNECTED
    code.version = 1
    meta = S.MetadataT()
    meta.name, meta.buffer = b"edgesr", 4
    model = S.ModelT()
    model.version, model.description = 3, b"edgesr peak-sgemm probe"
    model.operatorCodes, model.subgraphs, model.buffers, model.metadata = [code], [sub], buffers, [meta]

    b = flatbuffers.Builder(g.k * g.k * 4 + 4096)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    out = Path(path)
    tmp = out.with_name(out.name + ".part")
    tmp.write_bytes(bytes(b.Output()))
    os.replace(tmp, out)
    return out


def write_gemm_model(family: str, directory: str | os.PathLike, g: Gemm = DEFAULT_GEMM) -> Path | None:
    """The peak probe for ``family`` in ``directory`` (``None`` for torch, which needs no file)."""
    d = Path(directory)
    tag = f"peak_gemm_k{g.k}_{g.h}x{g.w}_l{g.layers}"
    if family == "onnxruntime":
        p = d / f"{tag}.onnx"
        return p if p.exists() else write_onnx_gemm(p, g)
    if family == "litert":
        p = d / f"{tag}.tflite"
        return p if p.exists() else write_tflite_gemm(p, g)
    if family == "torch":
        return None
    raise ValueError(f"no peak probe for runtime family {family!r}")
