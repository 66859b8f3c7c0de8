"""Artifact metadata: string key/value pairs stored inside the artifact itself.

- ONNX: ``ModelProto.metadata_props``.
- TFLite: one ``Model.metadata`` entry named ``edgesr`` whose buffer holds a JSON object.

Reading never imports a converter or a runtime: ONNX goes through ``onnx``, TFLite through
a ~40-line flatbuffer reader below (so a device that only has ``tflite_runtime`` can
still read it).  Writing TFLite metadata re-packs the flatbuffer and lives in
:mod:`edgesr.export.tflite`.

Keys written by the exporters (all values are strings):

``edgesr_version``, ``format`` (onnx|tflite), ``layout`` (NCHW|NHWC), ``input_range``
(always ``[0,1]``), ``native_range`` (the model's own range, e.g. ``[0,255]``, wrapped
inside the graph),
``input_name``/``output_name``, ``input_shape`` (JSON list; symbolic dims as names),
``dynamic`` (true|false), ``multiple_of``, ``min_size``; plus whatever the caller passes
(model, variant, scale, config -- the JSON of the full model config, which rebuilds custom
configs read from a checkpoint -- parity, ...).  ``receptive_field`` (from the export pipeline): the
model's receptive-field radius in input px, or ``unbounded``; tiled upscaling derives its
default overlap from it.

Integer I/O (``export --precision int8 --int8-io``, :mod:`edgesr.export.int8_io`):
``int8_io`` (true), ``input_dtype``/``output_dtype`` (``uint8``), ``input_scale``/
``output_scale`` and ``input_zero_point``/``output_zero_point`` (``real = scale * (q -
zero_point)``; 1/255 and 0: the 8-bit image).  Absent: float32 tensors.  ``input_range``
stays the real-valued contract ``[0,1]``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping

from ..errors import EdgeSRError

TFLITE_METADATA_NAME = "edgesr"
RESERVED_KEYS = (
    "edgesr_version",
    "format",
    "layout",
    "input_range",
    "native_range",
    "input_name",
    "output_name",
    "input_shape",
    "dynamic",
    "multiple_of",
    "min_size",
    # integer I/O (int8_io.py writes them with the graph edit; they describe the graph)
    "int8_io",
    "input_dtype",
    "input_scale",
    "input_zero_point",
    "output_dtype",
    "output_scale",
    "output_zero_point",
)


def artifact_format(path: str | os.PathLike) -> str:
    """``"onnx"`` or ``"tflite"``, by suffix, else by the file's magic bytes."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".tflite", ".lite"):
        return "tflite"
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise EdgeSRError(f"cannot read {p}: {e.strerror}") from None
    if head[4:8] == b"TFL3":
        return "tflite"
    if head[:1] == b"\x08":  # protobuf field 1 (ir_version, varint): every ONNX ModelProto starts so
        return "onnx"
    raise EdgeSRError(f"{p} is neither an ONNX nor a TFLite model")


def merge_metadata(system: Mapping[str, str], user: Mapping[str, object] | None) -> dict[str, str]:
    """The caller's metadata plus the exporter's own keys (which must not be contradicted)."""
    out: dict[str, str] = {}
    for k, v in (user or {}).items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"metadata keys must be non-empty strings, got {k!r}")
        out[k] = v if isinstance(v, str) else json.dumps(v)
    for k, v in system.items():
        if k in out and out[k] != v:
            raise ValueError(f"metadata key {k!r} is set by the exporter ({v!r}); got {out[k]!r}")
        out[k] = v
    return out


# --- reading -----------------------------------------------------------------------


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """All metadata of an ONNX or TFLite artifact as ``{key: value}`` strings."""
    fmt = artifact_format(path)
    if fmt == "onnx":
        return read_onnx_metadata(path)
    return read_tflite_metadata(Path(path).read_bytes())


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError & co.
        raise EdgeSRError(f"cannot read ONNX model {path}: {e}") from None
    return {p.key: p.value for p in model.metadata_props}


def read_tflite_metadata(data: bytes) -> dict[str, str]:
    """The ``edgesr`` JSON entry of a TFLite flatbuffer (``{}`` if absent)."""
    raw = tflite_metadata_entries(data).get(TFLITE_METADATA_NAME)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgeSRError(f"corrupt edgesr metadata in TFLite model: {e}") from None
    if not isinstance(meta, dict):
        raise EdgeSRError("corrupt edgesr metadata in TFLite model: not a JSON object")
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


class _FlatTable:
    """Just enough of the flatbuffer wire format to read tables, vectors and scalars."""

    def __init__(self, buf: bytes | memoryview, pos: int):
        self.buf, self.pos = buf, pos
        vt = pos - struct.unpack_from("<i", buf, pos)[0]
        self._vt = vt
        self._vt_size = struct.unpack_from("<H", buf, vt)[0]

    def _field(self, idx: int) -> int | None:
        slot = 4 + 2 * idx
        if slot >= self._vt_size:
            return None
        off = struct.unpack_from("<H", self.buf, self._vt + slot)[0]
        return self.pos + off if off else None

    def scalar(self, idx: int, fmt: str, default: int = 0) -> int:
        p = self._field(idx)
        return default if p is None else struct.unpack_from("<" + fmt, self.buf, p)[0]

    def _vector(self, idx: int) -> tuple[int, int] | None:
        p = self._field(idx)
        if p is None:
            return None
        start = p + struct.unpack_from("<I", self.buf, p)[0]
        return start + 4, struct.unpack_from("<I", self.buf, start)[0]

    def bytes(self, idx: int) -> bytes | None:
        v = self._vector(idx)
        return None if v is None else bytes(self.buf[v[0] : v[0] + v[1]])

    def tables(self, idx: int) -> list["_FlatTable"]:
        v = self._vector(idx)
        if v is None:
            return []
        out = []
        for i in range(v[1]):
            e = v[0] + 4 * i
            out.append(_FlatTable(self.buf, e + struct.unpack_from("<I", self.buf, e)[0]))
        return out


# tflite schema field indices
_MODEL_BUFFERS, _MODEL_METADATA = 4, 6
_META_NAME, _META_BUFFER = 0, 1
_BUF_DATA, _BUF_OFFSET, _BUF_SIZE = 0, 1, 2


def tflite_metadata_entries(data: bytes) -> dict[str, bytes]:
    """Every ``Model.metadata`` entry of a TFLite flatbuffer as ``{name: raw bytes}``."""
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise EdgeSRError("not a TFLite flatbuffer (missing TFL3 identifier)")
    try:
        model = _FlatTable(data, struct.unpack_from("<I", data, 0)[0])
        buffers = model.tables(_MODEL_BUFFERS)
        out: dict[str, bytes] = {}
        for entry in model.tables(_MODEL_METADATA):
            name = (entry.bytes(_META_NAME) or b"").decode("utf-8", "replace")
            buf = buffers[entry.scalar(_META_BUFFER, "I")]
            raw = buf.bytes(_BUF_DATA)
            offset, size = buf.scalar(_BUF_OFFSET, "Q"), buf.scalar(_BUF_SIZE, "Q")
            if not raw and offset > 1:
                raw = bytes(data[offset : offset + size])
            out[name] = raw or b""
        return out
    except (struct.error, IndexError) as e:
        raise EdgeSRError(f"corrupt TFLite flatbuffer: {e}") from None


# --- writing -----------------------------------------------------------------------


def set_onnx_metadata(model, meta: Mapping[str, str], replace: bool = False) -> None:
    """Set ``metadata_props`` of an ``onnx.ModelProto`` in place (other keys kept unless ``replace``)."""
    current = {} if replace else {p.key: p.value for p in model.metadata_props}
    current.update(meta)
    del model.metadata_props[:]
    for k in sorted(current):
        entry = model.metadata_props.add()
        entry.key, entry.value = k, str(current[k])


def write_metadata(path: str | os.PathLike, updates: Mapping[str, object]) -> dict[str, str]:
    """Add or change metadata keys of an artifact in place (atomically); returns the new metadata.

    Meant for facts known only after export, e.g. the parity result.  Reserved keys
    (layout, shape, ...) describe the graph and cannot be changed here.
    """
    from ..io import atomic_path

    bad = sorted(set(updates) & set(RESERVED_KEYS))
    if bad:
        raise ValueError(f"metadata keys {bad} describe the graph and cannot be updated")
    new = {k: v if isinstance(v, str) else json.dumps(v) for k, v in updates.items()}
    fmt = artifact_format(path)
    if fmt == "onnx":
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        set_onnx_metadata(model, new)
        with atomic_path(path) as tmp:
            onnx.save(model, str(tmp))
    else:
        from .tflite import tflite_with_metadata

        data = Path(path).read_bytes()
        meta = read_tflite_metadata(data)
        meta.update(new)
        packed = tflite_with_metadata(data, meta)
        with atomic_path(path) as tmp:
            tmp.write_bytes(packed)
    return read_metadata(path)


update_metadata = write_metadata
