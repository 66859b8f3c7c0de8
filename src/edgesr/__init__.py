"""edgesr: efficient super-resolution networks from PyTorch to ONNX and TFLite, with verified parity."""

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "deploy", "fold", "get_spec", "load_model", "make_export_safe"]

# Loaded on first use (PEP 562): commands that only run artifacts (upscale, bench of an
# .onnx/.tflite) then never import PyTorch, which alone is ~300 MB of resident memory.
_LAZY = {"create_model": "models", "get_spec": "models", "load_model": "models",
         "deploy": "reparam", "fold": "reparam", "make_export_safe": "reparam"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
