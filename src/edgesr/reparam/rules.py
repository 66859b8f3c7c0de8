"""Rule registries and the one walker that applies them.

Two kinds of rules, both keyed by module *type* and registered where that type lives
(the model file, or next to the safe building block):

- **fold** rules turn a train-time structure into its plain inference equivalent
  (``Conv3XC -> Conv2d``).  A module may instead offer ``fuse() -> nn.Module``
  (timm style); a registered rule wins over the method.
- **rewrite** rules swap an export-hostile module for an exactly equivalent
  export-safe one, possibly depending on the export target (``"onnx"``/``"tflite"``).
  A module may instead offer ``export_safe(target) -> nn.Module``.

The walker works on a deep copy (the input model is never touched) and goes
children-first, so a parent's rule sees its children already folded/rewritten --
e.g. PlainUSR's block-level PConv fold sees the RepMBConv already turned into a conv.
"""

from __future__ import annotations

import copy
from typing import Callable, TypeVar

import torch
from torch import nn

FoldRule = Callable[[nn.Module], nn.Module]
RewriteRule = Callable[[nn.Module, str], nn.Module]

TARGETS = ("onnx", "tflite")

_FOLDS: dict[type, FoldRule] = {}
_REWRITES: dict[type, RewriteRule] = {}

F = TypeVar("F")


def register_fold(*types: type) -> Callable[[F], F]:
    """Register ``fn(module) -> nn.Module`` as the fold of each given module type."""

    def deco(fn: F) -> F:
        for t in types:
            if t in _FOLDS:
                raise ValueError(f"fold for {t.__name__} registered twice")
            _FOLDS[t] = fn  # type: ignore[assignment]
        return fn

    return deco


def register_rewrite(*types: type) -> Callable[[F], F]:
    """Register ``fn(module, target) -> nn.Module`` as the export-safe form of each type."""

    def deco(fn: F) -> F:
        for t in types:
            if t in _REWRITES:
                raise ValueError(f"rewrite for {t.__name__} registered twice")
            _REWRITES[t] = fn  # type: ignore[assignment]
        return fn

    return deco


def conv_from_kernel(weight: torch.Tensor, bias: torch.Tensor, padding: int = 1) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` holding a folded kernel (the usual result of a fold rule)."""
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[-1], padding=padding)
    conv = conv.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight.detach())
        conv.bias.copy_(bias.detach())
    return conv


def _fold_for(module: nn.Module) -> FoldRule | None:
    rule = _FOLDS.get(type(module))
    if rule is None and callable(getattr(module, "fuse", None)):
        return lambda m: m.fuse()
    return rule


def _rewrite_for(target: str) -> Callable[[nn.Module], FoldRule | None]:
    def lookup(module: nn.Module) -> FoldRule | None:
        rule = _REWRITES.get(type(module))
        if rule is not None:
            return lambda m: rule(m, target)
        if callable(getattr(module, "export_safe", None)):
            return lambda m: m.export_safe(target)
        return None

    return lookup


def walk(module: nn.Module, rule_for: Callable[[nn.Module], FoldRule | None]) -> nn.Module:
    """Apply rules children-first, in place; returns the (possibly replaced) module."""
    for name, child in list(module.named_children()):
        new_child = walk(child, rule_for)
        if new_child is not child:
            setattr(module, name, new_child)
    rule = rule_for(module)
    if rule is None:
        return module
    replaced = rule(module)
    if not isinstance(replaced, nn.Module):
        raise TypeError(f"rule for {type(module).__name__} returned {type(replaced).__name__}")
    _carry_info(module, replaced)
    return replaced


def _carry_info(old: nn.Module, new: nn.Module) -> None:
    info = getattr(old, "edgesr_info", None)
    if info is not None and new is not old:
        new.edgesr_info = dict(info)


def apply_folds(model: nn.Module) -> nn.Module:
    """Deep-copy ``model`` and fold every train-time structure that has a rule."""
    return walk(copy.deepcopy(model), _fold_for)


def apply_rewrites(model: nn.Module, target: str) -> nn.Module:
    """Deep-copy ``model`` and swap every export-hostile module for its safe form."""
    if target not in TARGETS:
        raise ValueError(f"unknown export target {target!r} (known: {', '.join(TARGETS)})")
    return walk(copy.deepcopy(model), _rewrite_for(target))
