"""Safe checkpoint loading.

Checkpoints are untrusted input: they are read with ``torch.load(weights_only=True)``
or safetensors, never unpickled freely.  Wrappers used by the official code bases are
unwrapped here (BasicSR ``params``/``params_ema``, ``train.py``'s ``model_state_dict``,
``state_dict``, DataParallel ``module.`` prefixes), then the architecture and config
are detected from key names and shapes, and the weights are loaded *strictly* with a
readable report of what does not fit.
"""

from __future__ import annotations

import math
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from .registry import ModelSpec, StateDict, all_specs, get_spec

# Order matters: BasicSR saves both and the EMA weights are the ones to ship.
_WRAPPER_KEYS = ("params_ema", "params", "model_state_dict", "state_dict", "model", "net", "network")


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
    obj: Any, source: str = "<state dict>", prefer: str | None = None
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Find the tensor dict inside the known checkpoint wrappers and strip ``module.``.

    ``prefer`` names the wrapper to take when present (a variant's official choice).
    """
    report = LoadReport(source=source)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    if not _is_tensor_dict(obj):
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


def detect_architecture(sd: StateDict) -> list[tuple[ModelSpec, str, int]]:
    """All registered architectures whose detector accepts this state dict."""
    found = []
    for spec in all_specs():
        try:
            hit = spec.detect(sd)
        except Exception:  # a detector must never turn a foreign dict into a crash
            hit = None
        if hit is not None:
            found.append((spec, hit[0], hit[1]))
    return found


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
):
    """Load a checkpoint into its train-time model, detecting architecture and config.

    ``name``/``variant``/``scale`` may confirm the detection; a conflict is an error.
    Returns the model in eval mode (and the :class:`LoadReport` if asked).
    """
    if isinstance(source, Mapping):
        raw, label = source, "<state dict>"
    else:
        raw, label = read_checkpoint_file(source), Path(source).name
    sd, report = unwrap_state_dict(raw, label)
    check_finite(sd, label)

    candidates = detect_architecture(sd)
    if name is not None:
        spec = get_spec(name)
        mine = [c for c in candidates if c[0] is spec]
        if not mine:
            if candidates:
                other = candidates[0]
                raise CheckpointError(
                    f"{label} looks like {other[0].name} ({other[1]}, x{other[2]}), not {spec.name}"
                )
            raise CheckpointError(f"{label} is not a {spec.name} checkpoint (keys do not match)")
        candidates = mine
    if not candidates:
        sample = ", ".join(list(sd)[:4])
        raise CheckpointError(f"{label}: unrecognised architecture (first keys: {sample})")
    spec, found_variant, found_scale = candidates[0]
    if variant is not None and spec.variant(variant).name != found_variant:
        raise CheckpointError(
            f"{label} is {spec.name} variant {found_variant}, not {variant}"
        )
    if scale is not None and scale != found_scale:
        raise CheckpointError(f"{label} is a x{found_scale} {spec.name} model, not x{scale}")

    official = spec.variant(found_variant).checkpoint_key
    if official and report.wrapper not in (None, official) and isinstance(raw.get(official), Mapping):
        sd, report = unwrap_state_dict(raw, label, prefer=official)
        check_finite(sd, label)
    model = spec.build(found_variant, found_scale)
    load_state_dict_strict(model, sd, f"{label} ({spec.name} {found_variant} x{found_scale})")
    if spec.after_load is not None:
        spec.after_load(model)
    model.eval()
    model.edgesr_info["checkpoint"] = report.summary()
    return (model, report) if return_report else model


def save_state_dict(sd: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a weights-only checkpoint atomically (.safetensors or a plain .pth)."""
    from ..io import atomic_path

    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    p = Path(path)
    with atomic_path(p) as tmp:
        if p.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp))
        else:
            torch.save(tensors, tmp)
