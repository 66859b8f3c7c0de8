"""Safe checkpoint loading.

Checkpoints are untrusted input: they are read with ``torch.load(weights_only=True)``
or safetensors, never unpickled freely.  Wrappers used by the official code bases are
unwrapped here (BasicSR ``params``/``params_ema``, ``train.py``'s ``model_state_dict``,
``state_dict``, DataParallel ``module.`` prefixes), then the architecture and config
are detected from key names and shapes, and the weights are loaded *strictly* with a
readable report of what does not fit.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from .registry import Detected, Misfit, ModelSpec, StateDict, all_specs, get_spec

# Order matters: BasicSR saves both and the EMA weights are the ones to ship.
_WRAPPER_KEYS = ("params_ema", "params", "model_state_dict", "state_dict", "model", "net", "network")
#: Wrappers a user may pick with ``state_key`` / ``--state-key``.
STATE_KEYS = ("params", "params_ema")


@dataclass
class LoadReport:
    """How a checkpoint was read: where the weights came from and what was adjusted."""

    source: str
    wrapper: str | None = None
    stripped_prefix: str | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [self.source]
        if self.wrapper:
            parts.append(f"using '{self.wrapper}'")
        if self.stripped_prefix:
            parts.append(f"stripped '{self.stripped_prefix}' prefix")
        parts.extend(self.notes)
        return "; ".join(parts)


def read_checkpoint_file(path: str | os.PathLike) -> Any:
    """Read a checkpoint file without executing any code from it."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if not p.is_file():
        raise CheckpointError(f"checkpoint is not a file: {p}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty: {p}")
    with open(p, "rb") as f:
        head = f.read(16)
    if p.suffix == ".safetensors" or _looks_like_safetensors(head):
        return _read_safetensors(p)
    try:
        with warnings.catch_warnings():  # torch warns about legacy/raw pickles before refusing: one line only
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"refusing to load {p.name}: it contains pickled Python objects beyond plain "
                f"tensors (possibly code); re-save it as a plain state dict or safetensors"
            ) from None
        raise CheckpointError(f"cannot read {p.name}: corrupt checkpoint ({msg})") from None
    except (zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot read {p.name}: truncated or corrupt checkpoint ({first})") from None
    except Exception as e:  # random bytes, text, ...: torch's unpickler fails in arbitrary ways
        raise CheckpointError(f"cannot read {p.name}: not a PyTorch or safetensors checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None


def _looks_like_safetensors(head: bytes) -> bool:
    # safetensors: 8-byte little-endian header length followed by a JSON object.
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _read_safetensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {p.name}: corrupt safetensors file ({e})") from None


def unwrap_state_dict(
    obj: Any, source: str = "<state dict>", prefer: str | None = None, require: str | None = None
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Find the tensor dict inside the known checkpoint wrappers and strip ``module.``.

    ``prefer`` names the wrapper to take when present (a variant's official choice);
    ``require`` names the one the user asked for (an error when absent).
    """
    report = LoadReport(source=source)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    if require is not None:
        if require not in STATE_KEYS:
            raise CheckpointError(f"unknown state key {require!r} (choose from: {', '.join(STATE_KEYS)})")
        if not isinstance(obj.get(require), Mapping):
            keys = ", ".join(map(str, list(obj)[:8])) or "none"
            raise CheckpointError(f"{source} has no '{require}' entry (top-level keys: {keys})")
        report.wrapper = require
        others = [k for k in STATE_KEYS if k != require and isinstance(obj.get(k), Mapping)]
        report.notes.append(f"'{require}' chosen by --state-key" + (f" over '{others[0]}'" if others else ""))
        obj = obj[require]
    elif not _is_tensor_dict(obj):
        present = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if not present:
            keys = ", ".join(map(str, list(obj)[:6]))
            raise CheckpointError(f"{source}: no state dict found (top-level keys: {keys})")
        report.wrapper = prefer if prefer in present else present[0]
        if "params_ema" in present and "params" in present:
            why = " (what the official inference script reads)" if prefer == report.wrapper else ""
            report.notes.append(f"both 'params' and 'params_ema' present; chose '{report.wrapper}'{why}")
        obj = obj[report.wrapper]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{source}: the state dict holds no tensors")
    dropped = len(obj) - len(tensors)
    if dropped:
        report.notes.append(f"ignored {dropped} non-tensor entries")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
        report.stripped_prefix = "module."
    return tensors, report


def _is_tensor_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and sum(isinstance(v, torch.Tensor) for v in obj.values()) >= max(1, len(obj) // 2)


def check_finite(sd: StateDict, source: str) -> None:
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{source}: weight '{k}' contains NaN or inf values")


def detect_configs(sd: StateDict) -> tuple[list[tuple[ModelSpec, Detected]], list[tuple[ModelSpec, str]]]:
    """Every family that expresses ``sd`` (with the config it read), and the families whose
    keys ``sd`` has but whose shapes it breaks (with the first difference)."""
    hits, misfits = [], []
    for spec in all_specs():
        try:
            found = spec.detect_config(sd)
        except Misfit as e:
            misfits.append((spec, str(e)))
            continue
        except Exception:  # a reader must never turn a foreign dict into a crash
            continue
        if found is not None:
            hits.append((spec, found))
    return hits, misfits


def detect_architecture(sd: StateDict) -> list[tuple[ModelSpec, str, int]]:
    """All registered architectures whose reader accepts this state dict: ``(spec, label, scale)``."""
    return [(spec, d.label, d.scale) for spec, d in detect_configs(sd)[0]]


def _key_tokens(keys) -> set[str]:
    # Module names without indices or parameter names: "feats.0.ccm.ccm.0.weight" -> {feats, ccm}
    return {t for k in keys if isinstance(k, str) for t in k.split(".")
            if not t.isdigit() and t not in ("weight", "bias")}


def _reference_keys(spec: ModelSpec) -> list[str]:
    if spec.name not in _REFERENCE_KEYS:
        v = spec.variant(None)
        with torch.device("meta"):  # keys only: no memory, no init cost
            _REFERENCE_KEYS[spec.name] = list(spec.build_fn(v.config, v.default_scale).state_dict())
    return _REFERENCE_KEYS[spec.name]


_REFERENCE_KEYS: dict[str, list[str]] = {}


def closest_family(sd: StateDict) -> tuple[ModelSpec, str] | None:
    """The family whose default model's key names ``sd`` shares most, and its first differences
    (``None`` when no family shares a single module name)."""
    mine = _key_tokens(sd)

    def score(spec: ModelSpec) -> tuple[float, int]:
        ref = _key_tokens(_reference_keys(spec))
        exact = len(set(sd) & set(_reference_keys(spec)))
        return (len(mine & ref) / max(1, len(ref | mine)), exact)

    spec = max(all_specs(), key=score)
    if score(spec) == (0.0, 0):
        return None
    ref = _reference_keys(spec)
    missing = [k for k in ref if k not in sd][:3]
    unexpected = [str(k) for k in sd if k not in set(ref)][:3]
    parts = []
    if missing:
        parts.append("missing " + ", ".join(missing))
    if unexpected:
        parts.append("unexpected " + ", ".join(unexpected))
    return spec, "; ".join(parts) or "none in the key names"


def _no_fit_message(label: str, sd: StateDict, misfits: list[tuple[ModelSpec, str]]) -> str:
    if misfits:
        spec, why = misfits[0]
        return f"{label}: unrecognised architecture; looks closest to {spec.name}: first difference: {why}"
    closest = closest_family(sd)
    if closest is None:
        first = ", ".join(map(str, list(sd)[:4]))
        return f"{label}: unrecognised architecture; its key names match no family (first keys: {first})"
    spec, diff = closest
    return f"{label}: unrecognised architecture; looks closest to {spec.name}: first differences: {diff}"


def _describe_mismatch(model: nn.Module, sd: StateDict) -> list[str]:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            lines.append(f"{len(items)} {title}: {', '.join(items[:5])}{more}")
    return lines


def load_state_dict_strict(model: nn.Module, sd: StateDict, what: str) -> None:
    problems = _describe_mismatch(model, sd)
    if problems:
        raise CheckpointError(f"{what} does not fit: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)


def load_model(
    source: str | os.PathLike | Mapping[str, Any],
    name: str | None = None,
    variant: str | None = None,
    scale: int | None = None,
    return_report: bool = False,
    state_key: str | None = None,
):
    """Load a checkpoint into its train-time model; architecture and config come from its shapes.

    ``name``/``variant``/``scale`` may confirm the detection; a conflict is an error
    (``variant`` is compared with the detected label: a known variant's name or ``custom-...``).
    ``state_key`` (``params``/``params_ema``) picks the BasicSR wrapper instead of the
    default (the official inference script's choice).  Returns the model in eval mode (and
    the :class:`LoadReport` if asked).
    """
    if isinstance(source, Mapping):
        raw, label = source, "<state dict>"
    else:
        raw, label = read_checkpoint_file(source), Path(source).name
    sd, report = unwrap_state_dict(raw, label, require=state_key)
    check_finite(sd, label)

    spec, found = _choose(label, sd, name)
    _confirm(label, spec, found, variant, scale)

    official = _official_wrapper(spec, found)
    if state_key is None and official and report.wrapper not in (None, official) and isinstance(raw.get(official), Mapping):
        sd, report = unwrap_state_dict(raw, label, prefer=official)
        check_finite(sd, label)
        spec, found = _choose(label, sd, spec.name)
    model = spec.build_config(found.config, found.scale, found.label)
    load_state_dict_strict(model, sd, f"{label} ({spec.name} {found.label} x{found.scale})")
    if spec.after_load is not None:
        spec.after_load(model)
    model.eval()
    model.edgesr_info["checkpoint"] = report.summary()
    return (model, report) if return_report else model


def _choose(label: str, sd: StateDict, name: str | None) -> tuple[ModelSpec, Detected]:
    """The family (and config) ``sd`` is, confirmed against ``name`` when given."""
    hits, misfits = detect_configs(sd)
    if name is not None:
        spec = get_spec(name)
        mine = [h for h in hits if h[0] is spec]
        if mine:
            return mine[0]
        why = [m for m in misfits if m[0] is spec]
        if why:
            raise CheckpointError(f"{label} does not fit {spec.name}: {why[0][1]}")
        if hits:
            other, d = hits[0]
            raise CheckpointError(f"{label} looks like {other.name} ({d.label}, x{d.scale}), not {spec.name}")
        raise CheckpointError(f"{label} is not a {spec.name} checkpoint (keys do not match)")
    if not hits:
        raise CheckpointError(_no_fit_message(label, sd, misfits))
    return hits[0]


def _confirm(label: str, spec: ModelSpec, found: Detected, variant: str | None, scale: int | None) -> None:
    if variant is not None and variant != found.label:
        if not variant.startswith("custom-"):
            spec.variant(variant)  # an unknown name is an unknown-variant error, not a mismatch
        raise CheckpointError(f"{label} is {spec.name} variant {found.label}, not {variant}")
    if scale is not None and scale != found.scale:
        raise CheckpointError(f"{label} is a x{found.scale} {spec.name} model, not x{scale}")


def _official_wrapper(spec: ModelSpec, found: Detected) -> str | None:
    """The wrapper the official inference script reads for this config (its variant's, else the default's)."""
    known = {v.name: v for v in spec.variants}
    return (known.get(found.label) or spec.variant(None)).checkpoint_key


def save_state_dict(sd: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a weights-only checkpoint atomically (.safetensors or a plain .pth)."""
    from ..io import atomic_write_bytes

    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    p = Path(path)
    # Serialised in memory, written by Python: a full disk is an OSError (-> OutputError), not a
    # RuntimeError from torch's zip writer.
    if p.suffix == ".safetensors":
        from safetensors.torch import save

        data = save(tensors)
    else:
        buf = io.BytesIO()
        torch.save(tensors, buf)
        data = buf.getvalue()
    atomic_write_bytes(p, data)
