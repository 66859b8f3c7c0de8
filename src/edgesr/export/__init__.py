"""Export back-ends: deploy-form ``nn.Module`` -> ONNX / TFLite artifact (see DESIGN.md).

Both exporters wrap the model in the artifact I/O contract (float32 RGB in [0, 1]; ONNX
NCHW, TFLite NHWC; tensors named ``input``/``output``), write atomically, embed metadata
and run structural checks; numerical parity is the caller's next step (``edgesr.runtime``).

The heavy back-ends (torch.onnx, litert-torch) are imported only when an exporter runs.
"""

from __future__ import annotations

from .metadata import artifact_format, read_metadata, write_metadata

__all__ = [
    "ExportResult",
    "IOWrapper",
    "artifact_format",
    "export_onnx",
    "export_tflite",
    "read_metadata",
    "write_metadata",
]


def __getattr__(name: str):
    # Lazy, like the exporters: reading an artifact's metadata (every runner does) must not
    # import PyTorch (~300 MB resident), which .wrap needs.
    if name in ("ExportResult", "IOWrapper"):
        from . import wrap

        return getattr(wrap, name)
    if name == "export_onnx":
        from .onnx import export_onnx

        return export_onnx
    if name == "export_tflite":
        from .tflite import export_tflite

        return export_tflite
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
