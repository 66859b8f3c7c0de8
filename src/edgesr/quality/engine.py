"""Run one model form (train-form PyTorch, ONNX or TFLite artifact, x86 or aarch64) over a dataset.

Every form goes through :func:`edgesr.runtime.tiling.upscale_array`, so all forms see the
same padded input: the train form and dynamic ONNX run each image whole (padded to the
model's size rule, reflect, and cropped back, as BasicSR-style test code pads); a
fixed-size artifact (TFLite, static ONNX) is run in overlapping tiles of its input size.
A checkpoint evaluated *as* a format (:func:`exported_form`: ``eval --weights CKPT --runtime
onnxruntime|litert``) is exported once per input size it meets (once in all for a dynamic
ONNX) and runs every image whole: the exact score of the deployed model, which tiles only
approximate for models that are not shift-equivariant (``ModelSpec.tiling_inexact``).
The output is clamped to [0, 1] and rounded to 8 bit before scoring (the papers' protocol).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import EdgeSRError, ParityError
from ..runtime.tiling import upscale_array
from .dataset import Dataset, Sample, open_dataset
from .metrics import psnr_ssim_rgb, psnr_ssim_y, to_uint8

Run = Callable[[np.ndarray], np.ndarray]
RunMany = Callable[[list[np.ndarray]], list[np.ndarray]]
#: Tile overlap (input px) for fixed-size artifacts: half a 64-px tile (the cap), keeping the
#: used part of every tile >= 12 px from its cut edges.  Convolutional models (SPAN) then
#: score within 0.002 dB of the whole image on Set5; PlainUSR's pooled attention reaches
#: further (PlainUSR-L / x2: +0.015 dB), see docs/checkpoint_quality.md.
TILE_OVERLAP = 32


class EvalInputError(EdgeSRError):
    """An eval request that contradicts its model or artifact."""


@dataclass
class ModelForm:
    """One runnable form of a model, with what the report says about it."""

    model: str
    variant: str
    scale: int
    form: str  # torch | onnx | tflite
    runtime: str
    run: Run
    size_rule: object  # SizeRule or the artifact's {"min_size", "multiple_of"}
    tile: tuple[int, int] | None = None  # fixed artifact input size -> tiled
    run_many: RunMany | None = None  # one call for many inputs (aarch64: one emulator start)
    source: str = ""
    whole_mode: str = "whole image"  # how a whole-image form came about (e.g. per-size exports)
    tiling: str = ""  # for tiled forms: whether tiles can reproduce the whole image, and why
    exporter: _SizeExports | None = None  # exported_form: makes the artifacts this run needs

    @property
    def mode(self) -> str:
        return self.whole_mode if self.tile is None else f"tiled {self.tile[0]}x{self.tile[1]}, overlap {TILE_OVERLAP}"


def torch_form(weights: str | os.PathLike, threads: int | None = None, state_key: str | None = None) -> ModelForm:
    """The train-form model of a checkpoint (architecture detected), run whole-image in eval mode."""
    from ..pipeline import obtain_model
    from ..runtime.runners import TorchRunner

    loaded = obtain_model(None, weights=weights, state_key=state_key)
    runner = TorchRunner(loaded.model, input_range=loaded.spec.input_range, threads=threads)
    return ModelForm(loaded.spec.name, loaded.variant, loaded.scale, "torch", f"torch {runner.version}", runner.run,
                     loaded.spec.size_rule, source=str(weights))


def artifact_form(path: str | os.PathLike, arch: str | None = None, threads: int | None = None) -> ModelForm:
    """An exported artifact on its runtime (x86, or ``arch="aarch64"`` under qemu)."""
    from ..export.metadata import artifact_format, read_metadata
    from ..runtime.runners import open_runner

    p = Path(path)
    if not p.is_file():
        raise EvalInputError(f"artifact not found: {p}")
    fmt = artifact_format(p)
    meta = read_metadata(p)
    missing = [k for k in ("model", "variant", "scale") if not meta.get(k)]
    if missing:
        raise EvalInputError(f"{p.name} has no edgesr metadata ({', '.join(missing)} missing): "
                             "evaluate artifacts written by `edgesr export`")
    rule = {"min_size": int(meta.get("min_size", 1)), "multiple_of": int(meta.get("multiple_of", 1))}
    tile = _fixed_size(meta)
    arch = _check_arch(arch)
    if arch is None:
        runner = open_runner(p, threads=threads)
        runtime, run, run_many = f"{runner.name} {runner.version}", runner.run, None
    else:  # aarch64
        from ..runtime.arm import Aarch64Error, Aarch64Runner

        try:
            arm = Aarch64Runner(p, threads=threads or 1)
        except Aarch64Error as e:
            raise EdgeSRError(str(e)) from None
        runtime, run, run_many = f"{arm.name} {arm.version}", arm.run, arm.run_many
    form = ModelForm(meta["model"], meta["variant"], int(meta["scale"]), fmt, runtime, run, rule, tile, run_many,
                     source=str(p))
    if tile is not None:
        form.tiling = tiling_note(meta["model"], _config_of(meta) or _variant_config(meta))
    return form


def _variant_config(meta: dict[str, str]) -> dict | None:
    """The named variant's config (artifacts whose metadata has none; custom configs always have one)."""
    from ..models.registry import get_spec

    try:
        return dict(get_spec(meta["model"]).variant(meta["variant"]).config)
    except EdgeSRError:
        return None


def _config_of(meta: dict[str, str]) -> dict | None:
    try:
        config = json.loads(meta.get("config") or "null")
    except ValueError:
        return None
    return config if isinstance(config, dict) else None


def tiling_note(model: str, config: dict | None) -> str:
    """What a tiled score means for this model: approximate by construction, or up to cut context."""
    from ..models.registry import get_spec

    if config is None:
        return "tiled: whether tiles can reproduce the whole image is unknown (no model config in the metadata)"
    reason = get_spec(model).tiling_inexact(config)
    if reason:
        return (f"tiled: approximate by construction ({reason}); `eval --weights CKPT --runtime onnxruntime|litert` "
                "scores the deployed model exactly (whole image, per-size exports)")
    return ("tiled: the model is shift-equivariant on its size-rule grid, so tiles differ from the whole image "
            "only through context cut beyond the tile margin")


def _fixed_size(meta: dict[str, str]) -> tuple[int, int] | None:
    if meta.get("dynamic", "false") == "true" or meta.get("input_size") == "dynamic":
        return None
    shape = json.loads(meta.get("input_shape", "null") or "null")
    if not shape or len(shape) != 4 or not all(isinstance(d, int) for d in shape):
        size = meta.get("input_size", "")
        if "x" not in size:
            raise EvalInputError("artifact metadata gives no input size")
        h, w = (int(v) for v in size.split("x"))
        return h, w
    return (shape[1], shape[2]) if meta.get("layout", "NCHW").upper() == "NHWC" else (shape[2], shape[3])


# --------------------------------------------------------------------------- a checkpoint as a format

#: ``--runtime`` -> the format a checkpoint is exported to for it.
RUNTIME_FORMATS = {"onnxruntime": "onnx", "litert": "tflite"}


class _SizeExports:
    """The checkpoint exported for each input size it is run at, made once per size in ``workdir``.

    Each export goes through :func:`edgesr.pipeline.export_model` (fold, export-safe rewrite,
    export, metadata) with its parity check against the train-form model (seeded noise and a
    photograph at that size); a failed check raises :class:`ParityError`.  A dynamic ONNX is
    one export for every size.
    """

    def __init__(self, loaded, fmt: str, workdir: Path, dynamic: bool, arch: str | None, threads: int | None,
                 on_export: Callable[[str], None] | None = None):
        self.loaded, self.fmt, self.workdir, self.dynamic = loaded, fmt, workdir, dynamic
        self.arch, self.threads = arch, threads
        self.on_export = on_export or (lambda message: None)
        self.artifacts: dict[tuple[int, int] | None, Path] = {}
        self.runners: dict[Path, object] = {}
        self.records: list[dict] = []

    def artifact(self, size: tuple[int, int]) -> Path:
        from ..pipeline import export_model

        key = None if self.dynamic else size
        if key not in self.artifacts:
            label = "dynamic" if self.dynamic else f"{size[0]}x{size[1]}"
            self.on_export(f"exporting {self.fmt} ({label})")
            t = time.perf_counter()
            outcome = export_model(self.loaded, self.fmt, size=None if self.dynamic else size, dynamic=self.dynamic,
                                   output=self.workdir / f"model_{label}{Path('x.' + self.fmt).suffix}",
                                   threads=self.threads)
            parity = (outcome.report.get("parity") or {}).get("cases", [])
            self.records.append({"input_size": label, "seconds": round(time.perf_counter() - t, 1),
                                 "parity": "pass" if outcome.passed else "FAIL",
                                 "parity_inputs": [c.get("input") for c in parity]})
            if not outcome.passed:
                raise ParityError(f"the {label} {self.fmt} export of {self.loaded.spec.name} failed its parity "
                                  "check against PyTorch; not scoring it")
            self.artifacts[key] = outcome.artifact
        return self.artifacts[key]

    def runner(self, size: tuple[int, int]):
        path = self.artifact(size)
        if path not in self.runners:
            if self.arch is None:
                from ..pipeline import captured_output
                from ..runtime.runners import open_runner

                with captured_output():  # runtimes log delegate creation on stderr
                    self.runners[path] = open_runner(path, threads=self.threads)
            else:
                from ..runtime.arm import Aarch64Error, Aarch64Runner

                try:
                    self.runners[path] = Aarch64Runner(path, threads=self.threads or 1)
                except Aarch64Error as e:
                    raise EdgeSRError(str(e)) from None
        return self.runners[path]

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.runner(tuple(x.shape[2:])).run(x)

    def run_many(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        """aarch64: one emulator start per artifact, all of its inputs in it."""
        from ..runtime.arm import Aarch64Error

        outs: list[np.ndarray | None] = [None] * len(xs)
        by_artifact: dict[Path, list[int]] = {}
        for i, x in enumerate(xs):
            by_artifact.setdefault(self.artifact(tuple(x.shape[2:])), []).append(i)
        for path, indices in by_artifact.items():
            try:
                ys = self.runner(tuple(xs[indices[0]].shape[2:])).run_many([xs[i] for i in indices])
            except Aarch64Error as e:
                raise EdgeSRError(str(e)) from None
            for i, y in zip(indices, ys):
                outs[i] = y
        return outs  # type: ignore[return-value]

    def runtime(self) -> str:
        any_runner = next(iter(self.runners.values()))
        return f"{any_runner.name} {any_runner.version}"


@contextlib.contextmanager
def exported_form(weights: str | os.PathLike, runtime: str, arch: str | None = None, threads: int | None = None,
                  state_key: str | None = None, on_export: Callable[[str], None] | None = None):
    """The checkpoint evaluated *as* the format ``runtime`` runs, every image whole.

    ``onnxruntime``: one dynamic ONNX export (per-size static exports for a model whose
    deploy form bakes its size in); ``litert``: one fixed-size TFLite export per distinct
    input size (each image padded to the size rule, as every whole-image form is).  The
    exports live in a temp folder that goes when the block exits, whatever happens; call
    :func:`prepare` before scoring so every export (and its parity check) is done, or has
    failed, before the first score.  This is the deployed model's exact score; a tiled
    fixed-size artifact approximates it (exactly only for shift-equivariant models).
    """
    from ..pipeline import obtain_model

    if runtime not in RUNTIME_FORMATS:
        raise EvalInputError(f"unknown --runtime {runtime!r} for --weights (known: torch, {', '.join(RUNTIME_FORMATS)})")
    arch = _check_arch(arch)
    if arch is not None:
        from ..runtime.arm import Aarch64Error, tools_dir

        try:
            tools_dir()  # fail before any export when the emulation cannot run at all
        except Aarch64Error as e:
            raise EdgeSRError(str(e)) from None
    fmt = RUNTIME_FORMATS[runtime]
    loaded = obtain_model(None, weights=weights, state_key=state_key)
    dynamic = fmt == "onnx" and loaded.spec.dynamic_shapes
    how = "one dynamic ONNX export" if dynamic else f"per-size {'ONNX' if fmt == 'onnx' else 'TFLite'} exports"
    with tempfile.TemporaryDirectory(prefix="edgesr-eval-") as tmp:
        exports = _SizeExports(loaded, fmt, Path(tmp), dynamic, arch, threads, on_export)
        form = ModelForm(loaded.spec.name, loaded.variant, loaded.scale, fmt, f"{runtime} (not started)",
                         exports.run, loaded.spec.size_rule, run_many=exports.run_many if arch else None,
                         source=str(weights), whole_mode=f"whole image, {how}", exporter=exports)
        yield form


def prepare(form: ModelForm, samples: list[Sample]) -> None:
    """Make every artifact an :func:`exported_form` needs for ``samples`` (no-op for other forms)."""
    exports = form.exporter
    if exports is None:
        return
    recorder = _Recorder(form.scale)
    for s in samples:
        upscale(form, s.lr, recorder)  # the padded input sizes, exactly as scoring will see them
    for x in recorder.inputs:
        exports.runner(tuple(x.shape[2:]))  # export (parity-checked) and load, before any score
    if exports.runners:
        form.runtime = exports.runtime()


def _check_arch(arch: str | None) -> str | None:
    if arch in (None, "x86_64"):
        return None
    if arch != "aarch64":
        raise EvalInputError(f"unknown --arch {arch!r} (known: x86_64, aarch64)")
    return arch


# --------------------------------------------------------------------------- running


def upscale(form: ModelForm, lr: np.ndarray, run: Run | None = None) -> np.ndarray:
    """The form's output for one uint8 image, as uint8 (clamped and rounded)."""
    x = lr.astype(np.float32) / 255.0
    out = upscale_array(run or form.run, x, form.scale, tile=form.tile,
                        overlap=TILE_OVERLAP if form.tile else None, size_rule=form.size_rule)
    return to_uint8(out)


class _Recorder:
    """First pass of a batched run: records every model input, answers with zeros of the right shape."""

    def __init__(self, scale: int):
        self.scale, self.inputs = scale, []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.inputs.append(np.array(x, dtype=np.float32))
        n, c, h, w = x.shape
        return np.zeros((n, c, self.scale * h, self.scale * w), dtype=np.float32)


def _replay(outputs: list[np.ndarray]) -> Run:
    it = iter(outputs)
    return lambda x: next(it)


def upscale_all(form: ModelForm, samples: list[Sample], progress: Callable[[], None] | None = None) -> list[np.ndarray]:
    """Outputs for every sample; a form with ``run_many`` gets all tiles of all images in one call.

    Tiling is deterministic, so recording the inputs of a dry pass and replaying the batched
    outputs in a second pass reproduces the per-call result exactly.
    """
    if form.run_many is None:
        outs = []
        for s in samples:
            outs.append(upscale(form, s.lr))
            if progress:
                progress()
        return outs
    recorder = _Recorder(form.scale)
    counts = []
    for s in samples:
        before = len(recorder.inputs)
        upscale(form, s.lr, recorder)
        counts.append(len(recorder.inputs) - before)
    ys = form.run_many(recorder.inputs)
    outs, start = [], 0
    for s, n in zip(samples, counts):
        outs.append(upscale(form, s.lr, _replay(ys[start:start + n])))
        start += n
        if progress:
            progress()
    return outs


# --------------------------------------------------------------------------- evaluation


@dataclass
class EvalReport:
    model: str
    variant: str
    scale: int
    form: str
    runtime: str
    dataset: str
    metric: str  # "y" (SR: BT.601 luma, shave = scale) or "rgb" (paired restoration)
    images: list[dict] = field(default_factory=list)
    mode: str = ""
    lr_source: str = ""
    source: str = ""
    tiling: str = ""  # tiled forms: exact up to cut context, or approximate by construction
    exports: list[dict] = field(default_factory=list)  # --weights as a format: the artifacts made

    @property
    def keys(self) -> tuple[str, str]:
        return f"psnr_{self.metric}", f"ssim_{self.metric}"

    @property
    def mean(self) -> dict[str, float]:
        return {k: float(np.mean([im[k] for im in self.images])) for k in self.keys}

    def as_dict(self) -> dict:
        return {"model": self.model, "variant": self.variant, "scale": self.scale, "form": self.form,
                "runtime": self.runtime, "dataset": self.dataset, "images": self.images, "mean": self.mean,
                "mode": self.mode, "tiling": self.tiling, "exports": self.exports, "lr": self.lr_source,
                "source": self.source, "protocol": PROTOCOLS[self.metric]}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2) + "\n"

    def to_markdown(self) -> str:
        p, s = self.keys
        lines = [f"# {self.model} {self.variant} x{self.scale} on {self.dataset}", "",
                 f"Form: {self.form} ({self.runtime}, {self.mode}). Protocol: {PROTOCOLS[self.metric]}.", "",
                 *([f"Tiling: {self.tiling}.", ""] if self.tiling else []),
                 *([_exports_line(self.exports), ""] if self.exports else []),
                 f"| image | {p} (dB) | {s} |", "|---|---|---|"]
        lines += [f"| {im['name']} | {im[p]:.4f} | {im[s]:.4f} |" for im in self.images]
        lines.append(f"| **mean** | **{self.mean[p]:.4f}** | **{self.mean[s]:.4f}** |")
        return "\n".join(lines) + "\n"


def _exports_line(exports: list[dict]) -> str:
    sizes = ", ".join(f"{e['input_size']} ({e['parity']})" for e in exports)
    return (f"Exported from the checkpoint for this run, each parity-checked against PyTorch on noise and a "
            f"photograph: {sizes}.")


PROTOCOLS = {
    "y": "PSNR/SSIM on Y (BT.601, Matlab rgb2ycbcr), border shave = scale, HR modcropped, output clamped and "
         "rounded to 8 bit; SSIM 11x11 Gaussian sigma 1.5 (scikit-image)",
    "rgb": "PSNR/SSIM on RGB (SSIM averaged over channels), no shave, output clamped and rounded to 8 bit",
}


def load_samples(dataset_dir: str | os.PathLike, form: ModelForm, scale: int | None = None,
                 limit: list[str] | None = None) -> tuple[Dataset, list[Sample]]:
    """The dataset for ``form``, fully read and checked before any model run."""
    if scale is not None and scale != form.scale:
        raise EvalInputError(f"--scale {scale} contradicts the model: {form.model} {form.variant} is x{form.scale}")
    ds = open_dataset(dataset_dir, form.scale, restoration=form.scale == 1)
    samples = list(ds.samples())
    if limit:
        unknown = sorted(set(limit) - {s.name for s in samples})
        if unknown:
            raise EvalInputError(f"no image named {', '.join(unknown)} in {ds.root}")
        samples = [s for s in samples if s.name in limit]
    return ds, samples


def evaluate(form: ModelForm, dataset_dir: str | os.PathLike, scale: int | None = None,
             images: list[str] | None = None, progress: Callable[[], None] | None = None,
             outputs: dict[str, np.ndarray] | None = None) -> EvalReport:
    """Score ``form`` on a dataset folder (see :func:`score`)."""
    ds, samples = load_samples(dataset_dir, form, scale, images)
    return score(form, ds, samples, progress, outputs)


def score(form: ModelForm, ds: Dataset, samples: list[Sample], progress: Callable[[], None] | None = None,
          outputs: dict[str, np.ndarray] | None = None) -> EvalReport:
    """Score ``form`` on loaded samples; ``outputs`` (if given) receives each 8-bit output by image name."""
    metric = "rgb" if ds.kind == "paired" else "y"
    prepare(form, samples)
    report = EvalReport(form.model, form.variant, form.scale, form.form, form.runtime, ds.name, metric,
                        mode=form.mode, lr_source=ds.lr_source, source=form.source, tiling=form.tiling,
                        exports=list(form.exporter.records) if form.exporter else [])
    p_key, s_key = report.keys
    for sample, sr in zip(samples, upscale_all(form, samples, progress)):
        if metric == "y":
            p, s = psnr_ssim_y(sr, sample.hr, shave=form.scale)
        else:
            p, s = psnr_ssim_rgb(sr, sample.hr)
        report.images.append({"name": sample.name, p_key: p, s_key: s})
        if outputs is not None:
            outputs[sample.name] = sr
    return report
