"""Integer I/O for int8 artifacts (``edgesr export --precision int8 --int8-io``, issue 16).

NPUs and integer-only pipelines want 8-bit tensors at the graph boundary.  This rewrites a
finished int8 artifact (float32 input/output, the default contract) so that

- its **input** is ``uint8`` with scale 1/255, zero point 0: exactly an 8-bit RGB image,
  which is the [0, 1] float contract on the 8-bit grid (``real = scale * (q - zp)``);
- its **output** is ``uint8`` with scale 1/255, zero point 0: the 8-bit image itself.  Values
  outside [0, 1] saturate to 0/255, which is the clamp edgesr applies to outputs anyway.

The float computation in between is unchanged, so on 8-bit images (every PNG/JPEG input) the
uint8-I/O artifact computes what the float-I/O one does, up to the output's rounding to the
8-bit grid (<= 0.5/255), which ``edgesr upscale`` does when it writes the image anyway.

Graph edits:

- ONNX (QDQ from onnxruntime): uint8 ``input`` -> ``DequantizeLinear(1/255, 0)`` -> the old
  float input; the old float output -> ``QuantizeLinear(1/255, 0)`` -> uint8 ``output``.
  Names and (dynamic) shapes of ``input``/``output`` are kept.
- TFLite (ai-edge-quantizer int8): where the float input feeds only QUANTIZE ops (float ->
  int8), the input tensor becomes uint8 and those ops requantize uint8 -> int8; where the
  output comes from a DEQUANTIZE (int8 -> float), that op becomes a QUANTIZE int8 -> uint8
  (the integer interface TFLite's own converter builds for ``inference_input_type=uint8``).
  Where a boundary op was kept float by the mixed-precision search, a DEQUANTIZE (uint8 ->
  float) / QUANTIZE (float -> uint8) is inserted instead.  ai-edge-quantizer has no option
  for this: quantizing its INPUT/OUTPUT gives int8 tensors with calibrated scales, not the
  image's uint8 grid.

The scale and zero point of both tensors are recorded in the artifact's metadata
(``input_dtype``, ``input_scale``, ``input_zero_point``, ``output_*``) and in the export
report; the runners (:mod:`edgesr.runtime.runners`) quantize/dequantize with them, so every
command consumes such an artifact unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ExportError

IO_DTYPE = "uint8"
IO_SCALE = float(np.float32(1.0 / 255.0))  # the value stored in the graph (float32)
IO_ZERO_POINT = 0
FLOAT_SUFFIX = "_float"


@dataclass(frozen=True)
class TensorQuant:
    """How a uint8/int8 graph tensor maps to the real [0, 1] contract: ``real = scale * (q - zero_point)``."""

    dtype: str
    scale: float
    zero_point: int

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Float (contract scale) -> integer tensor: round half to even (as QuantizeLinear), saturate."""
        info = np.iinfo(np.dtype(self.dtype))
        q = np.round(np.asarray(x, dtype=np.float32) / np.float32(self.scale)) + self.zero_point
        return np.clip(q, info.min, info.max).astype(self.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return ((np.asarray(q).astype(np.float32) - np.float32(self.zero_point)) * np.float32(self.scale))

    def as_dict(self) -> dict:
        return asdict(self)


IMAGE_QUANT = TensorQuant(IO_DTYPE, IO_SCALE, IO_ZERO_POINT)


def check_int8_io(precision: str, int8_io: bool) -> None:
    """Refuse ``--int8-io`` without ``--precision int8`` (one line, exit 2, before any work)."""
    if int8_io and precision != "int8":
        raise ExportError(f"--int8-io needs --precision int8 (got --precision {precision}): integer I/O "
                          "is the interface of int8 artifacts")


def metadata_entries(q_in: TensorQuant = IMAGE_QUANT, q_out: TensorQuant = IMAGE_QUANT) -> dict[str, str]:
    """The metadata keys that describe an integer interface (all strings)."""
    out = {"int8_io": "true"}
    for side, q in (("input", q_in), ("output", q_out)):
        out[f"{side}_dtype"] = q.dtype
        out[f"{side}_scale"] = repr(q.scale)
        out[f"{side}_zero_point"] = str(q.zero_point)
    return out


def quant_from_metadata(meta: dict[str, str], side: str) -> TensorQuant | None:
    """The recorded quantization of ``side`` ("input"/"output"), ``None`` for float tensors."""
    dtype = meta.get(f"{side}_dtype", "float32")
    if dtype == "float32":
        return None
    try:
        return TensorQuant(dtype, float(meta[f"{side}_scale"]), int(meta[f"{side}_zero_point"]))
    except (KeyError, ValueError):
        return None


# --------------------------------------------------------------------------- entry


def apply_int8_io(artifact: Path) -> dict:
    """Rewrite the int8 ``artifact`` in place (atomically) to uint8 input/output; returns the
    report entry (also recorded in the artifact's metadata)."""
    from ..io import atomic_path

    artifact = Path(artifact)
    with atomic_path(artifact) as tmp:
        if artifact.suffix == ".onnx":
            how = _onnx_uint8_io(artifact, Path(tmp))
        else:
            how = _tflite_uint8_io(artifact, Path(tmp))
    return {"input": IMAGE_QUANT.as_dict(), "output": IMAGE_QUANT.as_dict(), "graph": how,
            "mapping": "real = scale * (q - zero_point); 8-bit RGB in, 8-bit RGB out (saturating)"}


# --------------------------------------------------------------------------- ONNX


def _onnx_uint8_io(src: Path, dst: Path) -> dict[str, str]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from .metadata import set_onnx_metadata

    model = onnx.load(str(src))
    g = model.graph
    if len(g.input) != 1 or len(g.output) != 1:
        raise ExportError(f"--int8-io expects one graph input and output, found {len(g.input)}/{len(g.output)}")
    inp, out = g.input[0], g.output[0]
    for v in (inp, out):
        if v.type.tensor_type.elem_type != TensorProto.FLOAT:
            raise ExportError(f"--int8-io: graph tensor {v.name!r} is not float32; already rewritten?")
    taken = {n for node in g.node for n in (*node.input, *node.output)} | {i.name for i in g.initializer}

    def fresh(base: str) -> str:
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    f_in, f_out = fresh(inp.name + FLOAT_SUFFIX), fresh(out.name + FLOAT_SUFFIX)
    scale, zp = fresh("edgesr_io_scale"), fresh("edgesr_io_zero_point")
    for node in g.node:
        node.input[:] = [f_in if n == inp.name else f_out if n == out.name else n for n in node.input]
        node.output[:] = [f_out if n == out.name else n for n in node.output]
    for vi in g.value_info:
        if vi.name == out.name:
            vi.name = f_out
    g.initializer.extend([numpy_helper.from_array(np.array(IO_SCALE, dtype=np.float32), scale),
                          numpy_helper.from_array(np.array(IO_ZERO_POINT, dtype=np.uint8), zp)])
    dq = helper.make_node("DequantizeLinear", [inp.name, scale, zp], [f_in], name="edgesr_input_dequantize")
    q = helper.make_node("QuantizeLinear", [f_out, scale, zp], [out.name], name="edgesr_output_quantize")
    nodes = [dq, *g.node, q]
    del g.node[:]
    g.node.extend(nodes)
    inp.type.tensor_type.elem_type = TensorProto.UINT8
    out.type.tensor_type.elem_type = TensorProto.UINT8
    set_onnx_metadata(model, metadata_entries())
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"internal: the uint8-I/O ONNX graph is invalid: {str(e).splitlines()[0][:200]}") from e
    onnx.save(model, str(dst))
    return {"input": "uint8 input -> DequantizeLinear(1/255, 0) -> float graph",
            "output": "float graph -> QuantizeLinear(1/255, 0) -> uint8 output"}


# --------------------------------------------------------------------------- TFLite


def _tflite_uint8_io(src: Path, dst: Path) -> dict[str, str]:
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.tools import flatbuffer_utils as fu

    from .metadata import read_tflite_metadata
    from .tflite import tflite_with_metadata

    data = src.read_bytes()
    model = fu.read_model_from_bytearray(data)
    sg = model.subgraphs[0]
    if len(sg.inputs) != 1 or len(sg.outputs) != 1:
        raise ExportError(f"--int8-io expects one graph input and output, found {len(sg.inputs)}/{len(sg.outputs)}")
    i_in, i_out = int(sg.inputs[0]), int(sg.outputs[0])
    for i in (i_in, i_out):
        if sg.tensors[i].type != s.TensorType.FLOAT32:
            raise ExportError(f"--int8-io: graph tensor {sg.tensors[i].name!r} is not float32; already rewritten?")

    def opcode(builtin: int) -> int:
        for k, c in enumerate(model.operatorCodes):
            if max(c.builtinCode, c.deprecatedBuiltinCode) == builtin:
                return k
        c = s.OperatorCodeT()
        c.builtinCode, c.deprecatedBuiltinCode, c.version = builtin, min(builtin, 127), 1
        model.operatorCodes.append(c)
        return len(model.operatorCodes) - 1

    def code_of(op) -> int:
        c = model.operatorCodes[op.opcodeIndex]
        return max(c.builtinCode, c.deprecatedBuiltinCode)

    def quant() -> object:
        p = s.QuantizationParametersT()
        p.scale, p.zeroPoint, p.quantizedDimension = [IO_SCALE], [IO_ZERO_POINT], 0
        return p

    def uint8_twin(i: int) -> int:
        """A new uint8 tensor shaped like tensor ``i``, taking its name (``i`` gets ``_float``)."""
        old = sg.tensors[i]
        t = s.TensorT()
        t.shape, t.shapeSignature, t.buffer, t.hasRank = old.shape, old.shapeSignature, 0, old.hasRank
        t.name, t.type, t.quantization = old.name, s.TensorType.UINT8, quant()
        old.name = (old.name.decode() if isinstance(old.name, bytes) else old.name) + FLOAT_SUFFIX
        sg.tensors.append(t)
        return len(sg.tensors) - 1

    def op(builtin: int, inputs: list[int], outputs: list[int]):
        o = s.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = opcode(builtin), inputs, outputs
        if builtin == s.BuiltinOperator.QUANTIZE:
            o.builtinOptionsType, o.builtinOptions = s.BuiltinOptions.QuantizeOptions, s.QuantizeOptionsT()
        else:
            o.builtinOptionsType, o.builtinOptions = s.BuiltinOptions.DequantizeOptions, s.DequantizeOptionsT()
        return o

    how = {}
    Q, DQ = s.BuiltinOperator.QUANTIZE, s.BuiltinOperator.DEQUANTIZE
    consumers = [o for o in sg.operators if i_in in list(o.inputs)]
    if consumers and all(code_of(o) == Q and sg.tensors[o.outputs[0]].type == s.TensorType.INT8 for o in consumers):
        sg.tensors[i_in].type, sg.tensors[i_in].quantization = s.TensorType.UINT8, quant()
        new_in = i_in
        how["input"] = f"uint8 input feeds {len(consumers)} QUANTIZE op(s), now uint8 -> int8 requantize"
    else:  # the first op computes in float (kept float by the mixed-precision search)
        new_in = uint8_twin(i_in)
        sg.operators.insert(0, op(DQ, [new_in], [i_in]))
        how["input"] = "uint8 input -> DEQUANTIZE (1/255, 0) -> float graph"
    producer = [o for o in sg.operators if i_out in list(o.outputs)]
    used_inside = any(i_out in list(o.inputs) for o in sg.operators)
    if (len(producer) == 1 and code_of(producer[0]) == DQ and not used_inside
            and sg.tensors[producer[0].inputs[0]].type == s.TensorType.INT8):
        p = producer[0]
        p.opcodeIndex = opcode(Q)
        p.builtinOptionsType, p.builtinOptions = s.BuiltinOptions.QuantizeOptions, s.QuantizeOptionsT()
        sg.tensors[i_out].type, sg.tensors[i_out].quantization = s.TensorType.UINT8, quant()
        new_out = i_out
        how["output"] = "the final DEQUANTIZE (int8 -> float) is now a QUANTIZE int8 -> uint8 requantize"
    else:
        new_out = uint8_twin(i_out)
        sg.operators.append(op(Q, [i_out], [new_out]))
        how["output"] = "float graph -> QUANTIZE (1/255, 0) -> uint8 output"
    sg.inputs, sg.outputs = [new_in], [new_out]
    for sig in model.signatureDefs or []:
        for t in sig.inputs or []:
            if t.tensorIndex == i_in:
                t.tensorIndex = new_in
        for t in sig.outputs or []:
            if t.tensorIndex == i_out:
                t.tensorIndex = new_out
    packed = bytes(fu.convert_object_to_bytearray(model))
    meta = {**read_tflite_metadata(data), **metadata_entries()}
    packed = tflite_with_metadata(packed, meta)  # also re-aligns the constant buffers
    _check_tflite_io(packed)
    dst.write_bytes(packed)
    return how


def _check_tflite_io(data: bytes) -> None:
    """The rewritten model loads on LiteRT with uint8 input/output of scale 1/255, zp 0."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        it = Interpreter(model_content=data)
        it.allocate_tensors()
    except Exception as e:
        raise ExportError(f"internal: the uint8-I/O TFLite model does not load: {str(e).splitlines()[0][:200]}") from e
    for d in (it.get_input_details()[0], it.get_output_details()[0]):
        scale, zp = d["quantization"]
        if d["dtype"] != np.uint8 or not np.isclose(scale, IO_SCALE) or zp != IO_ZERO_POINT:
            raise ExportError(f"internal: TFLite tensor {d['name']} is {d['dtype']} ({scale}, {zp}) after --int8-io")
