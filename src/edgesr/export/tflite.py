"""PyTorch -> TFLite with litert-torch: static shape, NHWC I/O, structural checks, metadata.

The file takes ``input`` float32 NHWC in [0, 1] and returns ``output`` NHWC in [0, 1]
(the permutes and the model's native range live inside the graph, see :mod:`.wrap`).

litert-torch 0.10 has a silent defect: its constant cache keys on the storage address of
a temporary ``x.contiguous()``, so *non-contiguous* parameters (e.g. SPAN's folded
``permute``-d convs) can be merged into one weight buffer -- no error, wrong outputs,
different on every run.  Every export therefore

1. converts a deep copy whose parameters and buffers are all contiguous
   (:func:`edgesr.reparam.make_contiguous_`, the verified fix) while keeping litert's
   temporaries alive (:func:`pin_constant_temporaries`, for constants the first fix
   cannot reach: tensors built in ``forward`` or held in module-level caches), and
2. checks the flatbuffer structurally (:func:`check_tflite`):

   - builtin ops only (no Flex / custom op codes -- ai-edge-litert has no Flex delegate);
   - weight constants: the distinct constant weights that the PyTorch graph feeds into
     convolutions / matmuls are compared with the constant weight buffers of the
     CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, BATCH_MATMUL and TRANSPOSE_CONV ops.
     Contents are compared layout-free (sorted values), so OIHW->OHWI and transposes
     need no bookkeeping.  Two rules, each of which the merge defect breaks:

     * ``distinct TFLite weight contents >= distinct PyTorch weight contents`` (the
       converter may dedupe identical constants and fuse affine scales into a weight,
       which keeps the count; a merge lowers it);
     * a TFLite weight content that equals a PyTorch weight is used by at most as many
       ops as in PyTorch (a merged buffer is "used" by the ops it stole).

     Note that "every buffer equals some PyTorch weight" is *not* a valid check: merged
     buffers still hold real weights.

Numerical parity against PyTorch stays mandatory after export (the pipeline runs it).
"""

from __future__ import annotations

import copy
import contextlib
import hashlib
import json
import os
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..errors import ExportError
from ..io import atomic_path, ensure_writable_dir
from .metadata import TFLITE_METADATA_NAME, merge_metadata
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

TFLITE_IDENTIFIER = b"TFL3"
# A flatbuffer must stay below 2 GiB; TFLite's offset buffers are not produced here.
MAX_FLATBUFFER_BYTES = 2**31 - 2**20

# op name -> input positions that hold weights (constant unless computed at run time)
WEIGHT_OPS: dict[str, tuple[int, ...]] = {
    "CONV_2D": (1,),
    "DEPTHWISE_CONV_2D": (1,),
    "FULLY_CONNECTED": (0, 1),
    "BATCH_MATMUL": (0, 1),
    "TRANSPOSE_CONV": (1,),
    "CONV_3D": (1,),
}


def export_tflite(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_range: float = 1.0,
    input_size: tuple[int, int] = (64, 64),
    multiple_of: int = 1,
    min_size: int = 1,
    metadata: Mapping[str, object] | None = None,
    verbose: bool = False,
) -> ExportResult:
    """Convert ``model`` (deploy form, NCHW, native range ``input_range``) to a static ``.tflite``.

    Raises :class:`ExportError` if the result contains non-builtin ops or fails the
    weight-buffer check.  The user's model is not modified (a contiguous deep copy is
    converted).  ``multiple_of``/``min_size`` only validate ``input_size`` and are recorded
    in the metadata.
    """
    import litert_torch

    from ..reparam import make_contiguous_

    sw = Stopwatch()
    final = Path(path)
    ensure_writable_dir(final.parent if str(final.parent) else Path("."))
    h, w = check_export_size(input_size, multiple_of, min_size)
    expected_shape = (1, h, w, 3)
    meta = merge_metadata(  # validated before the (slow) conversion
        contract_metadata("tflite", "NHWC", input_range, expected_shape, False, int(multiple_of), int(min_size)),
        metadata,
    )
    safe = make_contiguous_(copy.deepcopy(model).eval())
    wrapper = IOWrapper(safe, input_range, "NHWC").eval()
    x = wrapper.example_input(h, w)

    expected = torch_weight_signatures(wrapper, x)
    with _quiet_progress(not verbose), pin_constant_temporaries(), torch.no_grad():
        converted = litert_torch.convert(wrapper, (x,))
        data = converted.model_content()

    info = inspect_tflite(data)
    checks = check_tflite(info, expected)
    in_shape, out_shape = info.input_shape, info.output_shape
    if in_shape != expected_shape:
        raise ExportError(f"converted TFLite input has shape {in_shape}, expected {expected_shape}")
    packed = tflite_with_metadata(data, meta, rename_io=True)
    with atomic_path(final) as tmp:
        tmp.write_bytes(packed)
    return ExportResult(
        path=final,
        format="tflite",
        layout="NHWC",
        input_shape=in_shape,
        output_shape=out_shape,
        ops=info.ops,
        file_size=final.stat().st_size,
        seconds=sw.seconds,
        metadata=meta,
        checks=checks,
    )


@contextlib.contextmanager
def pin_constant_temporaries() -> Iterator[list]:
    """Second layer against the merge defect, for constants ``make_contiguous_`` cannot reach.

    litert-torch 0.10 lowers each constant as ``x = x.contiguous()`` and caches it under
    (shape, stride, ``x``'s storage address, offset).  For a non-contiguous constant --
    a parameter, but also a tensor built in ``forward`` or held in a module-level cache --
    ``x`` is a temporary; once freed, the next temporary of the same shape can get the
    same address and hit the cache.  Keeping every such temporary alive for the duration
    of the conversion makes addresses unique.  No-op if litert-torch's internals differ.
    """
    kept: list = []
    try:
        from litert_torch.backend import inline_consts
    except ImportError:
        yield kept
        return
    cls = getattr(inline_consts, "_ConstantFingerprint", None)
    original = getattr(cls, "__dict__", {}).get("from_tensor")
    if not isinstance(original, classmethod):
        yield kept
        return

    def from_tensor(klass, tensor):
        kept.append(tensor)
        return original.__func__(klass, tensor)

    cls.from_tensor = classmethod(from_tensor)
    try:
        yield kept
    finally:
        cls.from_tensor = original
        kept.clear()


@contextlib.contextmanager
def _quiet_progress(quiet: bool) -> Iterator[None]:
    key = "LITERT_TORCH_SHOW_PROGRESS"
    old = os.environ.get(key)
    if quiet:
        os.environ[key] = "n"
    try:
        yield
    finally:
        if quiet:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


# --- content signatures ----------------------------------------------------------------


def content_signature(values: np.ndarray) -> str:
    """Layout-free identity of a weight: hash of its sorted values (any transpose/permute agrees)."""
    flat = np.sort(np.asarray(values, dtype=np.float32).ravel())
    flat = flat + np.float32(0.0)  # -0.0 -> 0.0: both lay out the same constant
    return f"{flat.size}:{hashlib.sha1(flat.tobytes()).hexdigest()[:16]}"


# --- the PyTorch side ------------------------------------------------------------------

# aten ops (as seen below autograd) -> argument positions that are weights
_TORCH_WEIGHT_OPS = {
    "aten.convolution.default": (1,),
    "aten.mm.default": (0, 1),
    "aten.bmm.default": (0, 1),
    "aten.addmm.default": (1, 2),
    "aten.baddbmm.default": (1, 2),
}


class _ConstantWeights(TorchDispatchMode):
    """Runs a forward pass and records the constant operands of conv/matmul ops.

    A tensor is constant unless it is computed from the input: parameters, buffers,
    module-level caches and anything built from them in ``forward`` (views, reshapes,
    DFT bases ...) -- exactly what a converter folds into constant buffers.
    """

    def __init__(self, x: torch.Tensor):
        super().__init__()
        # Weak: holding every intermediate would keep a whole forward pass of activations
        # alive (10 GB for SRConvNet at 256x256); entries vanish with their tensors, so a
        # recycled id() cannot be mistaken for a run-time tensor.
        self._runtime: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary({id(x): x})
        self.uses: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if any(id(t) in self._runtime for t in inputs):
            for o in tree_leaves(out):
                if isinstance(o, torch.Tensor):
                    self._runtime[id(o)] = o
            for i in _TORCH_WEIGHT_OPS.get(str(func), ()):
                a = args[i] if i < len(args) else None
                if isinstance(a, torch.Tensor) and id(a) not in self._runtime:
                    self.uses[content_signature(_unexpand(a))] += 1
        return out


def _unexpand(t: torch.Tensor) -> np.ndarray:
    """The weight a converter stores for ``t``: broadcast and batch tiling removed.

    ``w.expand(B, ...)`` is one weight, not B (stride-0 dimensions are dropped).  And
    ``matmul(x, w)`` with a 3-D ``w`` broadcast over x's leading dims reaches this level
    as ``bmm`` with ``w`` *materialized* B/p times (expand + reshape copies), while a
    converter keeps ``w`` and broadcasts (TFLite BATCH_MATMUL): a bmm operand whose
    batch is the periodic repetition of its first ``p`` entries counts as those ``p``.
    """
    index = tuple(0 if s == 0 and n > 1 else slice(None) for s, n in zip(t.stride(), t.shape))
    t = t[index].detach().to(torch.float32)
    if t.dim() == 3:
        t = t[: _batch_period(t)]
    return t.contiguous().numpy()


def _batch_period(t: torch.Tensor) -> int:
    """Smallest p dividing t.shape[0] such that t is its first p entries repeated."""
    batch = t.shape[0]
    for p in range(1, batch):
        if batch % p == 0 and torch.equal(t.reshape(batch // p, p, *t.shape[1:]), t[:p].expand(batch // p, *t[:p].shape)):
            return p
    return batch


def torch_weight_signatures(module: nn.Module, x: torch.Tensor) -> Counter[str]:
    """``{content signature: number of conv/matmul uses}`` of the module's constant weights."""
    x = x.clone()
    mode = _ConstantWeights(x)
    with torch.no_grad(), mode:
        module(x)
    return mode.uses


# --- the flatbuffer side -----------------------------------------------------------------


def _schema():
    from ai_edge_litert import schema_py_generated as schema

    return schema


@dataclass
class WeightUse:
    op: str
    op_index: int
    tensor: str
    buffer: int
    signature: str | None  # None: computed at run time


@dataclass
class TFLiteInfo:
    ops: dict[str, int]
    custom_ops: list[str]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    weights: list[WeightUse] = field(default_factory=list)
    metadata_names: list[str] = field(default_factory=list)


def _op_names() -> dict[int, str]:
    s = _schema()
    return {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_") and isinstance(v, int)}


def _buffer_bytes(model_t, index: int, raw: bytes) -> bytes:
    buf = model_t.buffers[index]
    if buf.data is not None and len(buf.data):
        return np.asarray(buf.data, dtype=np.uint8).tobytes()
    if buf.offset > 1 and buf.size:
        return raw[buf.offset : buf.offset + buf.size]
    return b""


def _load(data: bytes):
    if len(data) < 8 or data[4:8] != TFLITE_IDENTIFIER:
        raise ExportError("not a TFLite flatbuffer (missing TFL3 identifier)")
    return _schema().ModelT.InitFromPackedBuf(bytearray(data), 0)


def inspect_tflite(data: bytes) -> TFLiteInfo:
    """Op histogram, custom ops, I/O shapes and the weight operands of a TFLite flatbuffer."""
    s = _schema()
    model = _load(data)
    names = _op_names()
    float_types = {s.TensorType.FLOAT32: np.float32, s.TensorType.FLOAT16: np.float16}
    codes = []
    custom: list[str] = []
    for oc in model.operatorCodes or []:
        code = max(oc.builtinCode, oc.deprecatedBuiltinCode)
        if code == s.BuiltinOperator.CUSTOM:
            cname = (oc.customCode or b"?").decode("utf-8", "replace")
            codes.append(f"CUSTOM:{cname}")
        else:
            codes.append(names.get(code, f"BUILTIN_{code}"))
    ops: list[str] = []
    weights: list[WeightUse] = []
    sg = model.subgraphs[0]
    producer = {o: op for op in sg.operators or [] for o in op.outputs if o >= 0}
    for k, op in enumerate(sg.operators or []):
        name = codes[op.opcodeIndex]
        ops.append(name)
        if name.startswith("CUSTOM:"):
            custom.append(name.split(":", 1)[1])
        for pos in WEIGHT_OPS.get(name, ()):
            if op.inputs is None or pos >= len(op.inputs) or op.inputs[pos] < 0:
                continue
            t = sg.tensors[_constant_source(op.inputs[pos], sg, producer, codes)]
            raw = _buffer_bytes(model, t.buffer, data) if t.buffer > 0 else b""
            tname = (t.name or b"").decode("utf-8", "replace")
            if raw:
                dtype = float_types.get(t.type)
                sig = (
                    content_signature(np.frombuffer(raw, dtype=dtype))
                    if dtype is not None
                    else f"raw:{hashlib.sha1(raw).hexdigest()[:16]}"
                )
                weights.append(WeightUse(name, k, tname, t.buffer, sig))
            elif pos == 1 and name != "BATCH_MATMUL":  # a filter computed at run time
                weights.append(WeightUse(name, k, tname, t.buffer, None))
    inp = sg.tensors[sg.inputs[0]]
    out = sg.tensors[sg.outputs[0]]
    return TFLiteInfo(
        ops=op_histogram(ops),
        custom_ops=sorted(set(custom)),
        input_shape=tuple(int(d) for d in inp.shape),
        output_shape=tuple(int(d) for d in out.shape),
        weights=weights,
        metadata_names=[(m.name or b"").decode() for m in model.metadata or []],
    )


# ops that only rearrange or repeat their first input: a weight fed through them is still that weight
_LAYOUT_OPS = frozenset({"RESHAPE", "BROADCAST_TO", "TRANSPOSE", "EXPAND_DIMS", "SQUEEZE"})


def _constant_source(index: int, sg, producer: dict, codes: list[str]) -> int:
    """The tensor a weight operand comes from, through layout-only ops.

    The converter broadcasts a 3-D matmul basis at run time (``BROADCAST_TO`` -> ``RESHAPE``
    -> ``BATCH_MATMUL``) instead of storing B copies; the weight is the constant at the
    start of that chain.  Returns ``index`` itself when the chain starts at a computed tensor.
    """
    seen = index
    while index in producer and codes[producer[index].opcodeIndex] in _LAYOUT_OPS:
        index = producer[index].inputs[0]
    return index if index not in producer and sg.tensors[index].buffer > 0 else seen


def check_tflite(info: TFLiteInfo, expected: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Builtin-only and weight-buffer checks (see the module docstring); raises :class:`ExportError`."""
    if info.custom_ops:
        flex = [c for c in info.custom_ops if c.startswith("Flex")]
        kind = "Flex (select TF)" if flex else "custom"
        raise ExportError(
            f"the TFLite model uses {kind} ops {', '.join(info.custom_ops)}; "
            "only builtin ops run on ai-edge-litert"
        )
    const = [u for u in info.weights if u.signature is not None]
    tfl_uses = Counter(u.signature for u in const)
    figures: dict[str, Any] = {
        "builtin_only": True,
        "weight_ops": len(info.weights),
        "runtime_weights": len(info.weights) - len(const),
        "weight_buffers": len({u.buffer for u in const}),
        "distinct_weights_tflite": len(tfl_uses),
    }
    if expected is None:
        return figures
    figures["distinct_weights_torch"] = len(expected)
    matched = set(tfl_uses) & set(expected)
    figures["matched_torch_weights"] = len(matched)
    over = {sig: (tfl_uses[sig], expected[sig]) for sig in matched if tfl_uses[sig] > expected[sig]}
    if len(tfl_uses) < len(expected) or over:
        detail = []
        if len(tfl_uses) < len(expected):
            detail.append(
                f"{len(tfl_uses)} distinct constant weights for {len(expected)} distinct PyTorch weights"
            )
        if over:
            ops_on = [u for u in const if u.signature in over]
            detail.append(
                f"{len(over)} weight buffer(s) shared by more ops than in PyTorch "
                f"(e.g. ops {sorted({u.op_index for u in ops_on})[:6]})"
            )
        raise ExportError(
            "the TFLite model has merged weight constants (" + "; ".join(detail) + "): "
            "the converter mixed up distinct weights; were the parameters contiguous?"
        )
    return figures


# --- re-packing: metadata and I/O names ---------------------------------------------------


class _Prebuilt:
    """Stands in for a ``BufferT`` whose table was already written (16-byte aligned data)."""

    def __init__(self, offset: int):
        self.offset = offset

    def Pack(self, builder) -> int:  # noqa: N802 (flatbuffers object-API name)
        return self.offset


def _aligned_bytes_vector(builder, payload: bytes, alignment: int = 16) -> int:
    n = len(payload)
    builder.StartVector(1, n, alignment)
    builder.head = builder.head - n
    builder.Bytes[builder.head : builder.head + n] = payload
    builder.vectorNumElems = n
    return builder.EndVector()


def tflite_with_metadata(data: bytes, meta: Mapping[str, str], rename_io: bool = False) -> bytes:
    """Return ``data`` with the ``edgesr`` metadata entry set to ``meta`` (JSON).

    Other metadata entries are kept.  With ``rename_io`` the first subgraph's input and
    output tensors (and the signature's keys) are renamed to ``input``/``output``.
    Buffer data stay 16-byte aligned, as the TFLite schema asks.
    """
    import flatbuffers

    s = _schema()
    model = _load(data)
    payload = json.dumps(dict(meta), sort_keys=True).encode("utf-8")
    entries = model.metadata or []
    existing = [m for m in entries if (m.name or b"").decode() == TFLITE_METADATA_NAME]
    if existing:
        model.buffers[existing[0].buffer].data = np.frombuffer(payload, dtype=np.uint8)
    else:
        buf = s.BufferT()
        buf.data = np.frombuffer(payload, dtype=np.uint8)
        model.buffers.append(buf)
        entry = s.MetadataT()
        entry.name = TFLITE_METADATA_NAME
        entry.buffer = len(model.buffers) - 1
        entries.append(entry)
        model.metadata = entries
    if rename_io:
        _rename_io(model)

    blobs = [_buffer_bytes(model, i, data) for i in range(len(model.buffers))]
    total = sum(len(b) for b in blobs)
    if total > MAX_FLATBUFFER_BYTES:
        raise ExportError(f"TFLite model with {total / 2**30:.1f} GiB of constants exceeds the 2 GiB flatbuffer limit")
    builder = flatbuffers.Builder(total + (1 << 20))
    prebuilt = []
    for blob in blobs:
        vec = _aligned_bytes_vector(builder, blob) if blob else None
        s.BufferStart(builder)
        if vec is not None:
            s.BufferAddData(builder, vec)
        prebuilt.append(_Prebuilt(s.BufferEnd(builder)))
    model.buffers = prebuilt
    builder.Finish(model.Pack(builder), file_identifier=TFLITE_IDENTIFIER)
    return bytes(builder.Output())


def _rename_io(model) -> None:
    sg = model.subgraphs[0]
    for idx, new in ((sg.inputs, INPUT_NAME), (sg.outputs, OUTPUT_NAME)):
        if len(idx) == 1:
            sg.tensors[idx[0]].name = new
    for sig in model.signatureDefs or []:
        if len(sig.inputs or []) == 1:
            sig.inputs[0].name = INPUT_NAME
        if len(sig.outputs or []) == 1:
            sig.outputs[0].name = OUTPUT_NAME
