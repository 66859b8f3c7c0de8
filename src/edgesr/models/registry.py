"""Model registry: every architecture registers one :class:`ModelSpec` where it lives.

A spec is everything the rest of the toolchain may know about a model: how to build
it from a config, how to recognise its checkpoints, its I/O contract and the input
sizes its deploy form can process exactly.  Export, runtime and CLI code only ever
talk to specs -- never to model names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import SizeRuleError, UnknownModelError

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class SizeRule:
    """Input sizes (H, W) a model accepts: ``H, W >= min_size`` and divisible by ``multiple_of``.

    ``dynamic_min_size`` (0 = ``min_size``): the lower bound given to the symbolic H/W
    (``torch.export.Dim(min=...)``) when a dynamic ONNX export is traced, for models whose
    internal maps shrink to 1 px near ``min_size``: ``torch.export`` guards on a size that
    *could* be 1 (e.g. PlainUSR's pooled LIA maps, 1 px for H < 13) and refuses a range that
    includes it.  It only constrains tracing -- a dynamic export must trace at a size
    >= it, and the graph is checked at sizes >= it; ``min_size`` stays the accepted
    minimum (static exports and the deploy form are unaffected).
    """

    min_size: int = 1
    multiple_of: int = 1
    dynamic_min_size: int = 0

    def check(self, height: int, width: int, what: str = "model") -> None:
        for name, v in (("height", height), ("width", width)):
            if v < self.min_size:
                raise SizeRuleError(
                    f"{what} needs input {name} >= {self.min_size}, got {height}x{width}"
                )
            if v % self.multiple_of:
                raise SizeRuleError(
                    f"{what} needs input height and width divisible by {self.multiple_of}, "
                    f"got {height}x{width}"
                )

    def describe(self) -> str:
        parts = []
        if self.multiple_of > 1:
            parts.append(f"multiple of {self.multiple_of}")
        if self.min_size > 1:
            parts.append(f">= {self.min_size}px")
        return ", ".join(parts) or "any"

    def as_dict(self) -> dict[str, int]:
        d = {"min_size": self.min_size, "multiple_of": self.multiple_of}
        if self.dynamic_min_size > self.min_size:
            d["dynamic_min_size"] = self.dynamic_min_size
        return d


@dataclass(frozen=True)
class Variant:
    """A named configuration of an architecture (e.g. SPAN ``ch48``)."""

    name: str
    config: Mapping[str, Any]
    scales: tuple[int, ...]
    default_scale: int
    description: str = ""
    #: The BasicSR wrapper the official inference script reads when a file holds both
    #: ``params`` and ``params_ema`` (``None``: the EMA weights, the usual choice).
    checkpoint_key: str | None = None


class Misfit(Exception):
    """Raised by a config reader: the keys are this family's, but a shape cannot be expressed.

    The message names the first key (and shape) that does not fit; the loader turns it into
    a one-line ``CheckpointError``.
    """


def canonical_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON round-trippable copy of a config (tuples become lists), for comparisons and metadata."""
    return json.loads(json.dumps(dict(config), sort_keys=True))


@dataclass(frozen=True)
class Detected:
    """What a checkpoint's keys and shapes say: the config to build, the scale and a label.

    ``label`` is the known variant's name when the config equals one, else ``custom-...``.
    """

    config: Mapping[str, Any]
    scale: int
    label: str


@dataclass(frozen=True)
class ModelSpec:
    """What the toolchain knows about one architecture family.

    - ``build(variant, scale)`` returns the train-time form (official state-dict keys) of a
      known variant; ``build_config(config, scale)`` of any config the family can express.
    - ``read_config(state_dict)`` reads every constructor hyperparameter off keys and
      shapes: ``(config, scale)`` when the keys are this family's, ``None`` when they are
      not; it raises :class:`Misfit` (naming the first key/shape) when they are this
      family's but no config of it fits.  It must be cheap and must not crash on foreign
      dicts.  ``detect_config`` adds the label; ``detect`` is the ``(label, scale)`` view.
    - ``custom_label(config)``: a short description of a config that is no known variant
      (e.g. ``ch32``); the label becomes ``custom-ch32``.
    - ``input_range``: the model's native value range (1.0 or 255.0); exported graphs
      always take [0, 1] and wrap the scaling.
    - ``size_rule``: sizes the *deploy form* processes exactly (the train form may accept
      more, e.g. SAFMN's adaptive pooling takes any size >= 8).
    - ``dynamic_shapes``: whether the deploy form can be exported with symbolic H/W.
    - ``after_load(model)``: hook run after a strict ``load_state_dict`` (e.g. SPAN
      re-folds ``eval_conv`` from its training branches).
    - ``signature_keys``: keys whose presence makes a checkpoint "look like" this
      architecture, used for "this looks like X, not Y" messages.
    - ``deploy_checkpoint(folded_state_dict)``: renames a folded model's weights into a
      checkpoint layout that ``load_model`` detects (SPAN: folded convs -> its deploy-only
      ``eval_conv`` layout).  ``None`` when the folded state dict already is such a layout
      (PlainUSR's Rep form) or there is none (``edgesr reparam`` says so).
    """

    name: str
    description: str
    variants: tuple[Variant, ...]
    default_variant: str
    build_fn: Callable[[Mapping[str, Any], int], nn.Module]
    read_config: Callable[[StateDict], tuple[Mapping[str, Any], int] | None]
    custom_label: Callable[[Mapping[str, Any]], str] = lambda config: "config"
    input_range: float = 1.0
    size_rule: SizeRule = field(default_factory=SizeRule)
    dynamic_shapes: bool = True
    after_load: Callable[[nn.Module], None] | None = None
    signature_keys: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    deploy_checkpoint: Callable[[StateDict], StateDict] | None = None
    #: Radius (input px) of the deploy form's receptive field: an output pixel depends only on
    #: inputs within this distance.  ``None``: unbounded or not translation-exact (pooling,
    #: FFT, global statistics).  Tiled upscaling derives its default overlap from it.
    receptive_field: int | None = None
    #: Why tiles of a config cannot reproduce its whole-image output, ``None`` when they can.
    #: ``None`` = the deploy form is shift-equivariant on its size-rule grid (convolutions,
    #: grid-aligned pooling, integer-factor resampling): a tile differs from the whole image
    #: only through context cut beyond its margin, and more overlap converges to it.  A reason
    #: = the output depends on the input's size or on whole-image statistics (a resize back to
    #: the input's size, FFT mixing, global norms or pooling): every tiling is approximate by
    #: construction, and only a whole-image run is the model's own output.
    tiling_inexact: Callable[[Mapping[str, Any]], str | None] = lambda config: None

    def variant(self, name: str | None) -> Variant:
        name = name or self.default_variant
        for v in self.variants:
            if v.name == name:
                return v
        known = ", ".join(v.name for v in self.variants)
        raise UnknownModelError(f"unknown variant {name!r} of {self.name} (known: {known})")

    def resolve_scale(self, variant: Variant, scale: int | None) -> int:
        if scale is None:
            return variant.default_scale
        if scale not in variant.scales:
            raise UnknownModelError(
                f"{self.name} variant {variant.name} has no x{scale} model "
                f"(scales: {', '.join(f'x{s}' for s in variant.scales)})"
            )
        return scale

    def build(self, variant: str | None = None, scale: int | None = None) -> nn.Module:
        v = self.variant(variant)
        return self.build_config(v.config, self.resolve_scale(v, scale), v.name)

    def build_config(self, config: Mapping[str, Any], scale: int, label: str | None = None) -> nn.Module:
        """The train-time form of any config this family expresses (e.g. one read from a checkpoint)."""
        model = self.build_fn(config, scale)
        # Remember where the module came from so later stages (export metadata,
        # parity rebuilds) never have to guess -- the config makes custom models rebuildable.
        model.edgesr_info = {"model": self.name, "variant": label or self.label_for(config, scale),
                             "scale": scale, "config": canonical_config(config)}
        return model

    def label_for(self, config: Mapping[str, Any], scale: int) -> str:
        """The known variant's name when ``config`` is one (at a scale it has), else ``custom-...``."""
        want = canonical_config(config)
        for v in self.variants:
            if scale in v.scales and canonical_config(v.config) == want:
                return v.name
        return f"custom-{self.custom_label(config)}"

    def detect_config(self, sd: StateDict) -> Detected | None:
        """Config, scale and label read from ``sd``; ``None`` if not this family; raises :class:`Misfit`."""
        found = self.read_config(sd)
        if found is None:
            return None
        config, scale = found
        return Detected(config, scale, self.label_for(config, scale))

    def detect(self, sd: StateDict) -> tuple[str, int] | None:
        """``(label, scale)`` when this family can express ``sd``, else ``None`` (never raises)."""
        try:
            found = self.detect_config(sd)
        except Misfit:
            return None
        except Exception:  # a reader must never turn a foreign dict into a crash
            return None
        return None if found is None else (found.label, found.scale)


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    for key in (spec.name, *spec.aliases):
        if key in _REGISTRY and _REGISTRY[key] is not spec:
            raise ValueError(f"model name {key!r} registered twice")
        _REGISTRY[key] = spec
    return spec


def get_spec(name: str) -> ModelSpec:
    _ensure_loaded()
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        raise UnknownModelError(f"unknown model {name!r} (known: {', '.join(model_names())})")
    return _REGISTRY[key]


def all_specs() -> list[ModelSpec]:
    _ensure_loaded()
    seen: dict[int, ModelSpec] = {}
    for spec in _REGISTRY.values():
        seen.setdefault(id(spec), spec)
    return list(seen.values())


def model_names() -> list[str]:
    return [s.name for s in all_specs()]


def _ensure_loaded() -> None:
    # Importing the package registers every architecture (one module each).
    from .. import models  # noqa: F401


def create_model(name: str, scale: int | None = None, variant: str | None = None) -> nn.Module:
    """Build the train-time form of a registered model with fresh (random) weights."""
    return get_spec(name).build(variant, scale).eval()


def spec_of(model: nn.Module) -> ModelSpec | None:
    """The spec a model was built from (``None`` for foreign modules)."""
    info = getattr(model, "edgesr_info", None)
    return get_spec(info["model"]) if info else None


def probe_size(model: nn.Module, target: int = 32) -> tuple[int, int]:
    """A small (H, W) the model's size rule accepts, near ``target`` and deliberately odd when allowed."""
    spec = spec_of(model)
    rule = spec.size_rule if spec else SizeRule()
    m = rule.multiple_of
    h = max(rule.min_size, target)
    h = -(-h // m) * m
    w = h + m if m > 1 else h + 3  # non-square, and odd where the rule allows
    return h, w


def input_range_of(model: nn.Module) -> float:
    spec = spec_of(model)
    return spec.input_range if spec else 1.0
