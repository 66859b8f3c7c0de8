"""`edgesr parity`: check an existing artifact against the train-form PyTorch model.

The reference is rebuilt from the artifact's own metadata (model, variant, scale) and
either the checkpoint the user passes or the seed recorded for a random-init export.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import EdgeSRError
from ..models.registry import get_spec

ARCHES = ("x86_64", "aarch64")
# aarch64 vs x86 build of the same runtime: different SIMD kernels, so rounding-level
# differences only.  Like the fp32 threshold it is on the [0, 1] scale and scales with the
# output peak when a (random-weight) model's output leaves [0, 1].
CROSS_ARCH_MAX_ABS = 1e-5


def cross_arch_passes(m) -> bool:
    return m.finite and m.max_abs <= CROSS_ARCH_MAX_ABS * max(1.0, m.ref_peak)


def _reference_model(meta: dict, weights: str | os.PathLike | None, state_key: str | None = None):
    from ..pipeline import obtain_model

    name, variant, scale = meta["model"], meta["variant"], int(meta["scale"])
    if weights is not None:
        loaded = obtain_model(name, variant, scale, weights, state_key=state_key)
        _check_config(meta, loaded.model)
        return loaded
    if meta.get("seed", "") == "":
        raise EdgeSRError(
            f"this artifact was exported from a checkpoint ({meta.get('weights', '?')}); pass it with --weights"
        )
    return obtain_model(name, variant, scale, None, seed=int(meta["seed"]))


def _check_config(meta: dict, model) -> None:
    """The checkpoint must rebuild the artifact's exact config (a custom label alone could hide a difference)."""
    recorded = json.loads(meta.get("config") or "null")
    built = model.edgesr_info.get("config")
    if recorded is not None and recorded != built:
        diff = next(k for k in sorted(set(recorded) | set(built)) if recorded.get(k) != built.get(k))
        raise EdgeSRError(f"the checkpoint's {meta['model']} config differs from the artifact's: "
                          f"{diff} = {built.get(diff)!r}, artifact has {recorded.get(diff)!r}")


def _sizes(meta: dict, requested: Sequence[str] | None, spec) -> list[tuple[int, int]]:
    from ..pipeline import _second_size, check_size, parse_size

    fixed = meta.get("input_size", "dynamic")
    if fixed != "dynamic":
        size = parse_size(fixed)
        if requested and any(parse_size(s) != size for s in requested):
            raise EdgeSRError(f"this artifact has a static input of {fixed}; it cannot run at other sizes")
        return [size]
    sizes = [parse_size(s) for s in requested] if requested else []
    if not sizes:
        base = (64, 64)
        sizes = [(-(-base[0] // spec.size_rule.multiple_of) * spec.size_rule.multiple_of,) * 2]
        sizes.append(_second_size(spec, sizes[0]))
    for s in sizes:
        check_size(spec, s)
    return sizes


def check_artifact(
    artifact: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    sizes: Sequence[str] | None = None,
    arch: str = "x86_64",
    threads: int | None = None,
    state_key: str | None = None,
):
    from ..export.metadata import read_metadata
    from ..pipeline import VerifySettings, captured_output, load_images, parity_inputs, runtime_versions
    from .parity import ParityCase, ParityReport, compare, threshold_for
    from .runners import TorchRunner, open_runner

    path = Path(artifact)
    if not path.is_file():
        raise EdgeSRError(f"artifact is not a file: {path}" if path.exists() else f"artifact not found: {path}")
    if arch not in ARCHES:
        raise EdgeSRError(f"unknown --arch {arch!r} (known: {', '.join(ARCHES)})")
    meta = read_metadata(path)
    if "model" not in meta:
        raise EdgeSRError(f"{path.name} has no edgesr metadata; was it written by `edgesr export`?")
    spec = get_spec(meta["model"])
    loaded = _reference_model(meta, weights, state_key)
    settings = VerifySettings(
        sizes=_sizes(meta, sizes, spec),
        images=load_images(images) if images else (),
        threads=threads,
    )
    fmt = "onnx" if path.suffix == ".onnx" else "tflite"
    reference = TorchRunner(loaded.model, input_range=spec.input_range)
    with captured_output():  # runtimes log delegate creation on stderr
        native = open_runner(path, threads=threads)
    inputs = parity_inputs(settings)
    precision = meta.get("precision", "fp32")  # fp16/int8 artifacts are judged by their own threshold
    gate = threshold_for(precision, arch)

    cases: list = []
    if arch == "x86_64":
        for label, x in inputs:
            m = compare(reference.run(x), native.run(x))
            cases.append(ParityCase(input=label, size=tuple(x.shape[2:]), reference=reference.name,
                                    candidate=native.name, metrics=m, passed=gate.judge(label, m)))
    else:
        from .arm import Aarch64Runner

        arm = Aarch64Runner(path, threads=threads or 1)
        outs = arm.run_many([x for _, x in inputs])
        for (label, x), y_arm in zip(inputs, outs):
            m_ref = compare(reference.run(x), y_arm)
            cases.append(ParityCase(input=label, size=tuple(x.shape[2:]), reference=reference.name,
                                    candidate=arm.name, metrics=m_ref,
                                    passed=gate.judge(label, m_ref)))
            m_x86 = compare(native.run(x), y_arm)
            cases.append(ParityCase(input=label, size=tuple(x.shape[2:]), reference=native.name,
                                    candidate=arm.name, metrics=m_x86,
                                    passed=cross_arch_passes(m_x86) if precision == "fp32"
                                    # other kernels (native fp16 arithmetic, int8 rounding) on ARM
                                    else gate.judge(label, m_x86)))
    return ParityReport(artifact=path.name, format=fmt, precision=precision, cases=cases, versions=runtime_versions(),
                        arch=arch)
