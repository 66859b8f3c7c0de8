"""PyTorch -> ONNX: ``torch.export`` capture, ``torch.onnx`` (dynamo, opset 18), checks, metadata.

- Opset 18 is pinned: opset 17 breaks FFT graphs, opset 20 + dynamic FFT crashes
  onnxruntime 1.31 (see docs/notes).
- The capture is our own ``torch.export.export`` so that a model that specialises a
  dynamic dimension fails loudly (``torch.onnx.export`` can fall back to capture modes
  that keep symbolic *input* dims while baking sizes inside the graph).  On top of that the
  exported input must carry ``dim_param``s and the graph must run at a second size.
- Weights are embedded in the single ``.onnx`` file unless they exceed the 2 GB protobuf
  limit; then they go to ``<name>.onnx.data`` beside it.
- onnxslim (opt-in, ``simplify=True``) is kept only when it removes nodes, keeps the
  dynamic dims and leaves onnxruntime's outputs unchanged.  Measured on the zoo: SAFMN
  364->340 nodes, DarkIR-m 876->820, SRConvNet 949->885, SPAN/SAFMN++/PlainUSR unchanged;
  outputs bit-identical, onnxruntime latency unchanged within noise.  (Run on the
  *unoptimised* exporter output it once produced an invalid graph -- a Resize with double
  scales -- hence the validation.)
- Writes are atomic: a failure leaves neither the file nor a temporary behind.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import ExportError, SizeRuleError
from ..io import atomic_path, ensure_writable_dir
from .metadata import merge_metadata, set_onnx_metadata
from .wrap import (
    INPUT_NAME,
    OUTPUT_NAME,
    ExportResult,
    IOWrapper,
    Stopwatch,
    check_export_size,
    contract_metadata,
    op_histogram,
)

OPSET = 18
# Protobuf cannot serialise a message of 2 GiB or more; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
# onnxslim's result must reproduce the unsimplified graph's outputs this closely ([0,1] scale).
SIMPLIFY_TOLERANCE = 1e-6



def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_range: float = 1.0,
    input_size: tuple[int, int] = (64, 64),
    dynamic: bool = False,
    multiple_of: int = 1,
    min_size: int = 1,
    max_size: int = 8192,
    metadata: Mapping[str, object] | None = None,
    simplify: bool = False,
    keep_debug_info: bool = False,
    dynamic_min_size: int = 0,
) -> ExportResult:
    """Export ``model`` (deploy form, NCHW, native range ``input_range``) to an ONNX file.

    The file takes ``input`` float32 NCHW in [0, 1] and returns ``output`` in [0, 1].
    ``input_size`` is the traced size (and the only accepted size unless ``dynamic``).
    With ``dynamic`` H and W are symbolic, constrained to multiples of ``multiple_of`` in
    ``[min_size, max_size]``; an exporter that specialises them raises :class:`ExportError`.
    ``dynamic_min_size`` (the spec's ``SizeRule.dynamic_min_size``) raises the symbolic
    dims' lower bound *for tracing* (``torch.export`` refuses ranges where an internal map
    could be 1 px); the traced size must reach it (:class:`SizeRuleError`).
    ``simplify`` tries onnxslim and keeps its result only if it has fewer nodes, the same
    dynamic dims and the same onnxruntime outputs (off by default: on the zoo it removes
    0-7% of the nodes of the dynamo exporter's already optimised graph, with identical
    outputs and no measurable onnxruntime latency change).  The exporter's per-node debug
    metadata (Python stack traces with local paths, FX node dumps; ~35% of a small model's
    file) is dropped unless ``keep_debug_info``.
    """
    sw = Stopwatch()
    final = Path(path)
    ensure_writable_dir(final.parent if str(final.parent) else Path("."))
    h, w = check_export_size(input_size, multiple_of, min_size)
    m = int(multiple_of)
    wrapper = IOWrapper(model.eval(), input_range, "NCHW").eval()
    x = wrapper.example_input(h, w)

    if dynamic:
        sym = ("H", "W") if m == 1 else (f"{m}*H", f"{m}*W")
        expected_shape: tuple[int | str, ...] = (1, 3, *sym)
    else:
        expected_shape = (1, 3, h, w)
    # Validate the caller's metadata before the (slow) export.
    meta = merge_metadata(
        contract_metadata("onnx", "NCHW", input_range, expected_shape, dynamic, m, min_size), metadata
    )

    dynamic_shapes = None
    names = {}
    trace_min = min_size
    if dynamic:
        trace_min = max(min_size, int(dynamic_min_size))
        if min(h, w) < trace_min:
            raise SizeRuleError(f"a dynamic export of this model traces at H, W >= {trace_min}, got {h}x{w}")
        lo, hi = max(1, math.ceil(trace_min / m)), max_size // m
        if hi < lo or max(h, w) > max_size:
            raise ExportError(f"max_size {max_size} is below the export size or the size rule's minimum")
        dim_h, dim_w = torch.export.Dim("H", min=lo, max=hi), torch.export.Dim("W", min=lo, max=hi)
        dynamic_shapes = {"x": {2: m * dim_h if m > 1 else dim_h, 3: m * dim_w if m > 1 else dim_w}}

    with torch.no_grad():
        try:
            ep = torch.export.export(wrapper, (x,), dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as e:  # torch raises UserError / ConstraintViolationError / GuardOnDataDependent...
            text = str(e)
            if dynamic and "specialized" in text:
                raise ExportError(
                    "dynamic ONNX export impossible: the model fixes the input size while tracing "
                    f"({_first_line(e)}); export a static size instead"
                ) from e
            if dynamic and "Constraints violated" in text:
                raise ExportError(
                    f"dynamic ONNX export impossible: the model restricts H/W beyond multiples of {m} "
                    f"({_first_line(e)}); raise multiple_of or export a static size"
                ) from e
            raise
        if dynamic:
            names = _symbol_names(ep, {2: "H", 3: "W"})
        program = torch.onnx.export(
            ep,
            (x,),
            None,
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            verbose=False,
            optimize=True,
        )
    proto = program.model_proto
    if not keep_debug_info:
        _strip_debug_info(proto)
    if names:
        _rename_dim_params(proto, names)

    in_shape = _value_shape(proto.graph.input[0])
    out_shape = _value_shape(proto.graph.output[0])
    checks: dict[str, Any] = {}
    if dynamic:
        _check_symbolic(in_shape, out_shape)
        checks["dynamic_dims"] = {"input": list(in_shape), "output": list(out_shape)}
    if in_shape[:2] != (1, 3) or (not dynamic and in_shape != expected_shape):
        raise ExportError(f"exported ONNX input has shape {in_shape}, expected {expected_shape}")
    meta["input_shape"] = json.dumps(list(in_shape))

    external = _initializer_bytes(proto) > EXTERNAL_DATA_THRESHOLD
    probes = [x]
    if dynamic:
        probes.append(wrapper.example_input(*_second_size(h, w, m, trace_min, max_size), seed=1))
    if not external:
        ref_outs = _check_runs(proto.SerializeToString(), probes, wrapper)
        if simplify:
            proto, checks["simplify"] = _maybe_simplify(proto, probes, ref_outs, dynamic)
    elif simplify:
        checks["simplify"] = {"tried": False, "kept": False, "reason": "model above 2 GB"}

    set_onnx_metadata(proto, meta)
    ops = op_histogram(_op_types(proto))
    files = _save(proto, final, external, probes, wrapper)
    checks["external_data"] = [str(p) for p in files[1:]]
    return ExportResult(
        path=final,
        format="onnx",
        layout="NCHW",
        input_shape=in_shape,
        output_shape=out_shape,
        ops=ops,
        file_size=sum(p.stat().st_size for p in files),
        seconds=sw.seconds,
        metadata=meta,
        checks=checks,
    )


# --- shapes --------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:240]


def _symbol_names(ep: torch.export.ExportedProgram, dims: dict[int, str]) -> dict[str, str]:
    """Map the exported program's shape symbols (``s12``) to our dim names (``H``)."""
    user_inputs = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            shape = node.meta["val"].shape
            out = {}
            for axis, name in dims.items():
                expr = getattr(shape[axis], "node", None)
                free = getattr(getattr(expr, "expr", None), "free_symbols", set())
                if len(free) == 1:
                    out[str(next(iter(free)))] = name
            return out
    return {}


def _rename_dim_params(proto, names: dict[str, str]) -> None:
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")

    def fix(value_infos) -> None:
        for vi in value_infos:
            if not vi.type.HasField("tensor_type"):
                continue
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param:
                    d.dim_param = pattern.sub(lambda mt: names[mt.group(1)], d.dim_param)

    g = proto.graph
    fix(g.input)
    fix(g.output)
    fix(g.value_info)


def _value_shape(vi) -> tuple[int | str, ...]:
    dims = vi.type.tensor_type.shape.dim
    return tuple(d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?") for d in dims)


def _check_symbolic(in_shape: tuple, out_shape: tuple) -> None:
    fixed_in = [a for a in (2, 3) if not isinstance(in_shape[a], str)]
    if fixed_in:
        raise ExportError(
            f"the ONNX exporter specialised the dynamic input to {in_shape} (no symbolic H/W); "
            "the model fixes its input size somewhere -- export a static size instead"
        )
    fixed_out = [a for a in (2, 3) if len(out_shape) > a and isinstance(out_shape[a], int) and out_shape[a] > 0]
    if fixed_out:
        raise ExportError(f"dynamic ONNX export has a fixed output size {out_shape}: the graph is specialised")


def _second_size(h: int, w: int, m: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Another legal size for the dynamic check: about half the traced one, non-square."""

    def up(v: int) -> int:
        return -(-max(v, min_size) // m) * m

    h2, w2 = up(h // 2 + 1), up(w // 2 + 3) + m
    if (h2, w2) == (h, w):
        w2 += m
    return min(h2, max_size), min(w2, max_size)


# --- running ---------------------------------------------------------------------------


def _session(model: bytes | str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _check_runs(model: bytes | str, probes: list[torch.Tensor], wrapper: nn.Module) -> list[np.ndarray]:
    """onnxruntime must load the graph and give PyTorch's output shape at every probe size."""
    try:
        sess = _session(model)
    except Exception as e:
        raise ExportError(f"onnxruntime cannot load the exported graph: {_first_line(e)}") from e
    outs = []
    for x in probes:
        size = "x".join(map(str, x.shape[2:]))
        try:
            y = sess.run(None, {INPUT_NAME: x.numpy()})[0]
        except Exception as e:
            raise ExportError(f"the exported ONNX graph fails at input {size}: {_first_line(e)}") from e
        if len(probes) > 1:  # dynamic: the second size is not covered by the trace
            with torch.no_grad():
                want = tuple(wrapper(x).shape)
            if tuple(y.shape) != want:
                raise ExportError(
                    f"the dynamic ONNX graph returns {tuple(y.shape)} at input {size}, PyTorch {want}: "
                    "sizes are baked into the graph"
                )
        outs.append(y)
    return outs


def _maybe_simplify(proto, probes, ref_outs, dynamic: bool):
    """Run onnxslim; keep its result only if it has fewer nodes and the same outputs/dims."""
    info: dict[str, Any] = {"tried": True, "kept": False, "nodes_before": _node_count(proto)}
    try:
        import onnxslim

        slim = onnxslim.slim(proto)
    except Exception as e:  # an optional optimisation must not break the export
        info["reason"] = f"onnxslim failed: {_first_line(e)}"
        return proto, info
    info["nodes_after"] = _node_count(slim)
    if info["nodes_after"] >= info["nodes_before"]:
        info["reason"] = "no nodes removed"
        return proto, info
    if dynamic and _value_shape(slim.graph.input[0])[2:] != _value_shape(proto.graph.input[0])[2:]:
        info["reason"] = "onnxslim changed the dynamic input dims"
        return proto, info
    try:
        sess = _session(slim.SerializeToString())
        diffs = [
            float(np.abs(sess.run(None, {INPUT_NAME: x.numpy()})[0] - ref).max())
            for x, ref in zip(probes, ref_outs)
        ]
    except Exception as e:
        info["reason"] = f"simplified graph does not run: {_first_line(e)}"
        return proto, info
    info["max_abs_change"] = max(diffs)
    if not max(diffs) <= SIMPLIFY_TOLERANCE:
        info["reason"] = f"simplified graph changes outputs by {max(diffs):.2e}"
        return proto, info
    info["kept"] = True
    info["reason"] = "fewer nodes, same outputs"
    return slim, info


# --- graph facts & saving -------------------------------------------------------------


def _strip_debug_info(proto) -> None:
    """Drop per-node ``metadata_props``/``doc_string`` (stack traces, FX dumps, local paths)."""

    def walk(graph):
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(proto.graph)
    for fn in proto.functions:
        for node in fn.node:
            del node.metadata_props[:]
            node.doc_string = ""


def _node_count(proto) -> int:
    return sum(1 for _ in _op_types(proto))


def _op_types(proto):
    def walk(graph):
        for node in graph.node:
            yield node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            for attr in node.attribute:
                if attr.HasField("g"):
                    yield from walk(attr.g)
                for sub in attr.graphs:
                    yield from walk(sub)

    yield from walk(proto.graph)
    for fn in proto.functions:
        for node in fn.node:
            yield node.op_type


def _initializer_bytes(proto) -> int:
    return sum(len(t.raw_data) or 4 * len(t.float_data) for t in proto.graph.initializer)


def _save(proto, final: Path, external: bool, probes, wrapper) -> list[Path]:
    """Write atomically; returns the written files (model first)."""
    import onnx

    if not external:
        with atomic_path(final) as tmp:
            onnx.save(proto, str(tmp))
        return [final]
    # Large model: model + side file, written in a private temp dir, checked, then moved.
    data_name = final.name + ".data"
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        onnx.save(
            proto,
            str(tmpdir / final.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        _check_runs(str(tmpdir / final.name), probes, wrapper)
        os.replace(tmpdir / data_name, final.parent / data_name)
        os.replace(tmpdir / final.name, final)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return [final, final.parent / data_name]
