"""edgesr: efficient super-resolution networks from PyTorch to ONNX and TFLite, with verified parity."""

__version__ = "0.1.0"

from .models import create_model, get_spec, load_model  # noqa: E402
from .reparam import deploy, fold, make_export_safe  # noqa: E402

__all__ = ["__version__", "create_model", "deploy", "fold", "get_spec", "load_model", "make_export_safe"]
