"""The model zoo: one module per architecture, each registering its ModelSpec."""

from . import darkir, plainusr, safmn, span, srconvnet  # noqa: F401  (registration)
from .checkpoint import load_model
from .registry import ModelSpec, SizeRule, Variant, all_specs, create_model, get_spec, register

__all__ = [
    "ModelSpec",
    "SizeRule",
    "Variant",
    "all_specs",
    "create_model",
    "get_spec",
    "load_model",
    "register",
]
