"""Figures `edgesr models` lists without building anything.

Counting parameters and deploy-form MACs means building and folding every variant
(about a minute on a quiet machine, several when it is loaded), so the listing reads
them from ``data/model_figures.json``.  ``python -m edgesr.catalog`` re-measures every
variant and rewrites the file; ``edgesr models --measure`` measures live instead.  A test
re-measures a few cheap variants against the file, so it cannot drift silently.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

FIGURES_FILE = Path(__file__).parent / "data" / "model_figures.json"
PROBE_MIN = 64  # MACs are counted on a square input of at least this side (a legal size)


def figure_key(model: str, variant: str) -> str:
    return f"{model}/{variant}"


def measure(spec, variant: str) -> dict:
    """Train-form parameters and deploy-form MACs per input pixel at the default scale."""
    import torch

    from .reparam import deploy
    from .stats import count_macs, count_params

    v = spec.variant(variant)
    torch.manual_seed(0)
    model = spec.build(v.name, v.default_scale).eval()
    m = spec.size_rule.multiple_of
    side = -(-max(PROBE_MIN, spec.size_rule.min_size) // m) * m
    x = torch.rand(1, 3, side, side) * spec.input_range
    macs = count_macs(deploy(model), x)
    return {"params": count_params(model), "macs_per_px": round(macs / (side * side), 1),
            "scale": v.default_scale, "probe": side}


@lru_cache(maxsize=1)
def stored_figures() -> dict[str, dict]:
    """The precomputed table (empty when the file is missing: the listing then shows '-')."""
    try:
        return json.loads(FIGURES_FILE.read_text())["figures"]
    except (OSError, ValueError, KeyError):
        return {}


def write_figures() -> Path:
    from .io import atomic_write_text
    from .models.registry import all_specs

    figures = {figure_key(spec.name, v.name): measure(spec, v.name) for spec in all_specs() for v in spec.variants}
    doc = {"about": "edgesr models: train-form params, deploy-form MACs per input pixel at the default scale; "
                    "regenerate with `python -m edgesr.catalog`", "figures": figures}
    atomic_write_text(FIGURES_FILE, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return FIGURES_FILE


if __name__ == "__main__":
    print(f"wrote {write_figures()}")
