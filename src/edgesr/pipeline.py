"""The data path, top to bottom:

    checkpoint --load--> train form --fold--> folded --make_export_safe--> deploy form
        --export--> artifact --verify (runners)--> parity report

Every stage is a plain function; the CLI only parses flags and prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from . import __version__
from .data import image_names, random_input, read_image, fit_image, sample_input
from .errors import EdgeSRError, ExportError, SizeRuleError
from .io import check_writable_destination, make_output_dirs, output_error, remove_empty_dirs
from .models.checkpoint import LoadReport, load_model
from .models.registry import ModelSpec, get_spec, probe_size, spec_of
from .reparam import fold, make_export_safe

FORMATS = {"onnx": ".onnx", "tflite": ".tflite"}
DEFAULT_SIZE = (256, 256)

Progress = Callable[[str, float], None]


def _no_progress(stage: str, seconds: float) -> None:
    pass


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    model: nn.Module
    spec: ModelSpec
    variant: str
    scale: int
    source: str  # "random init (seed 0)" or the checkpoint summary
    random_init: bool
    seed: int | None = None


def obtain_model(
    name: str | None,
    variant: str | None = None,
    scale: int | None = None,
    weights: str | os.PathLike | None = None,
    seed: int = 0,
    state_key: str | None = None,
) -> LoadedModel:
    """A train-form model from a checkpoint (detected; flags must agree) or seeded random init.

    ``state_key`` (``params``/``params_ema``) overrides the checkpoint wrapper choice.
    """
    if weights is not None:
        model, report = load_model(weights, name=name, variant=variant, scale=scale, return_report=True,
                                   state_key=state_key)
        info = model.edgesr_info
        return LoadedModel(model, get_spec(info["model"]), info["variant"], info["scale"], report.summary(), False)
    if name is None:
        raise EdgeSRError("give --model NAME or --weights CHECKPOINT")
    spec = get_spec(name)
    torch.manual_seed(seed)
    model = spec.build(variant, scale).eval()
    randomize_constant_parameters(model, seed)
    info = model.edgesr_info
    return LoadedModel(model, spec, info["variant"], info["scale"], f"random init (seed {seed})", True, seed)


@torch.no_grad()
def randomize_constant_parameters(model: nn.Module, seed: int = 0, sigma: float = 0.1) -> int:
    """Perturb parameters that start as one repeated value (zero gammas, unit norms, 1e-6 scales).

    Official inits zero some branch scales (DarkIR's gamma/beta, SRConvNet's layer_scale
    ~1e-6), which makes whole blocks the identity: a parity check on such a model would
    never exercise their FFT or attention paths.  A seeded N(0, sigma) perturbation keeps
    the random model well-scaled while making every branch contribute.  Returns the
    number of tensors changed.
    """
    g = torch.Generator().manual_seed(seed + 1)
    changed = 0
    for p in model.parameters():
        if p.numel() > 0 and p.is_floating_point() and bool((p == p.reshape(-1)[0]).all()):
            p.add_(sigma * torch.randn(p.shape, generator=g, dtype=p.dtype))
            changed += 1
    return changed


# --------------------------------------------------------------------------- reparam


def deploy_checkpoint(loaded: LoadedModel):
    """Fold ``loaded`` into the weights ``edgesr reparam`` writes: ``(state_dict, FoldReport, reloadable)``.

    The state dict is in the spec's deploy checkpoint layout (``ModelSpec.deploy_checkpoint``)
    when it has one.  ``reloadable``: ``load_model`` detects it and rebuilds the folded model
    exactly; a layout that loads but computes something else is a bug, not a warning.
    """
    spec = loaded.spec
    folded, report = fold(loaded.model)
    sd = folded.state_dict()
    if spec.deploy_checkpoint is not None:
        sd = spec.deploy_checkpoint(sd)
    try:
        reloaded = load_model(dict(sd), name=spec.name)
    except EdgeSRError:
        return sd, report, False
    h, w = probe_size(folded)
    x = torch.from_numpy(sample_input(h, w)) * spec.input_range
    with torch.no_grad():
        dev = float((reloaded(x) - folded(x)).abs().max())
    if dev > 1e-5 * spec.input_range:
        raise EdgeSRError(f"internal: the deploy checkpoint reloads as {reloaded.edgesr_info} but deviates by {dev:.2e}")
    return sd, report, True


# --------------------------------------------------------------------------- sizes


# Largest input side any command accepts, and the memory a pixel may need: SR networks keep
# tens of fp32 feature maps per input pixel alive (64 channels x 4 bytes x a few live maps),
# so a size whose pixels x this exceeds the machine's RAM fails in the allocator after
# minutes; refuse it at once instead.
MAX_INPUT_SIDE = 8192
BYTES_PER_INPUT_PIXEL = 1024


def max_input_pixels() -> int:
    """The pixel budget of one input on this machine: physical RAM / BYTES_PER_INPUT_PIXEL."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 16 << 30
    return min(MAX_INPUT_SIDE * MAX_INPUT_SIDE, ram // BYTES_PER_INPUT_PIXEL)


def parse_size(text: str) -> tuple[int, int]:
    """'256' (= 256x256), '256x256' or '360x640' (HxW) -> (H, W), within the stated maximum."""
    t = text.lower().replace(" ", "")
    parts = t.split("x") if "x" in t else [t, t]
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise EdgeSRError(f"bad size {text!r}: expected HxW, e.g. 256x256") from None
    if h <= 0 or w <= 0:
        raise EdgeSRError(f"bad size {text!r}: height and width must be positive")
    check_size_bound((h, w), text)
    return h, w


def check_size_bound(size: tuple[int, int], text: str | None = None) -> None:
    """Refuse sizes beyond MAX_INPUT_SIDE or this machine's memory before any model is built."""
    h, w = size
    label = text or f"{h}x{w}"
    if max(h, w) > MAX_INPUT_SIDE:
        raise SizeRuleError(f"size {label} is too large: at most {MAX_INPUT_SIDE} pixels per side")
    budget = max_input_pixels()
    if h * w > budget:
        raise SizeRuleError(f"size {label} is too large for this machine's memory: at most {budget:,} input "
                            f"pixels (RAM / {BYTES_PER_INPUT_PIXEL} bytes per pixel)")


def check_size(spec: ModelSpec, size: tuple[int, int]) -> None:
    spec.size_rule.check(*size, what=f"{spec.name} (deploy form)")


# --------------------------------------------------------------------------- quiet exporters


@contextlib.contextmanager
def captured_output() -> Iterator[list[str]]:
    """Silence fd-level stdout/stderr (exporters print a lot); keep the tail for errors."""
    tail: list[str] = []
    if os.environ.get("EDGESR_VERBOSE"):
        yield tail
        return
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as buf:
        os.dup2(buf.fileno(), 1)
        os.dup2(buf.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield tail
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            buf.seek(0)
            tail.extend(buf.read().decode(errors="replace").splitlines()[-20:])


# --------------------------------------------------------------------------- parity


@dataclass
class VerifySettings:
    sizes: Sequence[tuple[int, int]]
    images: Sequence[np.ndarray] = ()  # (H, W, 3) float32 [0, 1]; cropped/resized to each size
    seed: int = 0
    threads: int | None = None


def parity_inputs(settings: VerifySettings) -> list[tuple[str, np.ndarray]]:
    """Seeded noise and real photographs at every requested size (NCHW float32 [0,1])."""
    cases = []
    for h, w in settings.sizes:
        cases.append((f"random(seed={settings.seed}) {h}x{w}", random_input(h, w, settings.seed)))
        if settings.images:
            for i, img in enumerate(settings.images):
                x = np.ascontiguousarray(fit_image(img, h, w).transpose(2, 0, 1)[None])
                cases.append((f"image[{i}] {h}x{w}", x))
        else:
            name = image_names()[0]
            cases.append((f"photo:{name} {h}x{w}", sample_input(h, w, name)))
    return cases


def verify_artifact(artifact: Path, reference: nn.Module, input_range: float, settings: VerifySettings, fmt: str,
                    precision: str = "fp32"):
    """Run the artifact on its real runtime against the train-form PyTorch model."""
    from .runtime.parity import ParityCase, ParityReport, compare, threshold_for
    from .runtime.runners import TorchRunner, open_runner

    ref_runner = TorchRunner(reference, input_range=input_range)
    with captured_output():  # runtimes log delegate creation on stderr
        art_runner = open_runner(artifact, threads=settings.threads)
    gate = threshold_for(precision)
    cases = []
    for label, x in parity_inputs(settings):
        ref = ref_runner.run(x)
        out = art_runner.run(x)
        m = compare(ref, out)
        cases.append(ParityCase(input=label, size=tuple(x.shape[2:]), reference=ref_runner.name,
                                candidate=art_runner.name, metrics=m, passed=gate.judge(label, m)))
    return ParityReport(artifact=str(artifact.name), format=fmt, precision=precision, cases=cases,
                        versions=runtime_versions())


def runtime_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"edgesr": __version__}
    for pkg in ("torch", "onnx", "onnxruntime", "ai-edge-litert", "litert-torch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------- export


@dataclass
class ExportOutcome:
    artifact: Path
    report_json: Path
    report_md: Path
    passed: bool | None  # None when verification was skipped
    report: dict = field(default_factory=dict)


def plan_export(
    spec: ModelSpec,
    fmt: str,
    size: tuple[int, int] | None,
    dynamic: bool,
    output: str | os.PathLike | None,
    variant: str | None = None,
    scale: int | None = None,
) -> tuple[tuple[int, int], Path]:
    """Validate an export request before any work: returns the input size and output path."""
    if fmt not in FORMATS:
        raise EdgeSRError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    if dynamic and fmt != "onnx":
        raise ExportError("--dynamic is only supported for ONNX (TFLite graphs are static-shape)")
    if dynamic and not spec.dynamic_shapes:
        raise ExportError(f"{spec.name}'s deploy form bakes its input size into the graph; export it without --dynamic")
    size = size or _default_size(spec)
    check_size(spec, size)
    if output:
        out = Path(output)
    else:
        shape = "dyn" if dynamic else f"{size[0]}x{size[1]}"
        if variant is not None and variant.startswith("custom-"):  # a config read from a checkpoint
            label, s = variant, scale
        else:
            v = spec.variant(variant)
            label, s = v.name, spec.resolve_scale(v, scale)
        out = Path("edgesr-out") / f"{spec.name}_{label}_x{s}_{shape}{FORMATS[fmt]}"
    if out.suffix != FORMATS[fmt]:
        raise EdgeSRError(f"output {out} should end in {FORMATS[fmt]} for --format {fmt}")
    for path in export_outputs(out):  # checked now, created only when the export has succeeded
        check_writable_destination(path)
    return size, out


def export_outputs(artifact: Path) -> tuple[Path, Path, Path]:
    """Every file an export writes: the artifact and its JSON and Markdown reports."""
    return artifact, artifact.with_suffix(artifact.suffix + ".json"), artifact.with_suffix(artifact.suffix + ".md")


def export_model(
    loaded: LoadedModel,
    fmt: str,
    size: tuple[int, int] | None = None,
    dynamic: bool = False,
    output: str | os.PathLike | None = None,
    verify: bool = True,
    threads: int | None = None,
    progress: Progress = _no_progress,
    precision: str = "fp32",
    calibration: str | os.PathLike | None = None,
    max_psnr_drop: float | None = None,
    int8_io: bool = False,
) -> ExportOutcome:
    """load -> fold -> make export-safe -> export -> [reduce precision] -> verify, writing
    artifact + reports atomically.  fp16/int8 rewrite the fp32 export (edgesr.export.precision);
    ``int8_io`` then gives the int8 graph uint8 input/output (edgesr.export.int8_io)."""
    from .export.metadata import write_metadata
    from .export.onnx import export_onnx
    from .export.tflite import export_tflite

    spec = loaded.spec
    size, out = plan_export(spec, fmt, size, dynamic, output, loaded.variant, loaded.scale)
    from .export.precision import check_request

    check_request(fmt, precision, calibration, max_psnr_drop)
    from .export.int8_io import check_int8_io

    check_int8_io(precision, int8_io)
    stage_seconds: dict[str, float] = {}  # also goes into the report

    def stage_done(stage: str, seconds: float) -> None:
        stage_seconds[stage] = round(seconds, 2)
        progress(stage, seconds)

    t = time.perf_counter()
    folded, fold_report = fold(loaded.model, probe=_fold_probe(spec))
    stage_done("fold", time.perf_counter() - t)

    t = time.perf_counter()
    safe = make_export_safe(folded, fmt)
    stage_done("make export-safe", time.perf_counter() - t)

    meta = {
        "model": spec.name,
        "variant": loaded.variant,
        "scale": str(loaded.scale),
        # the full config (custom configs read from a checkpoint are rebuilt from it)
        "config": json.dumps(getattr(loaded.model, "edgesr_info", {}).get("config"), sort_keys=True),
        "layout": "NCHW" if fmt == "onnx" else "NHWC",
        "input_range": "[0,1]",
        "native_range": f"[0,{spec.input_range:g}]",
        "size_rule": json.dumps(spec.size_rule.as_dict()),
        # Tiled upscaling of the artifact alone derives its default overlap from it.
        "receptive_field": "unbounded" if spec.receptive_field is None else str(spec.receptive_field),
        "input_size": "dynamic" if dynamic else f"{size[0]}x{size[1]}",
        "weights": loaded.source,
        "seed": "" if loaded.seed is None else str(loaded.seed),
        "edgesr_version": __version__,
        **{f"{k}_version": v for k, v in runtime_versions().items() if k != "edgesr"},
    }

    # The output folder appears with the first real write and goes again if the export fails
    # or is interrupted (Ctrl-C, SIGTERM); the temp folder beside the artifact always goes.
    made = make_output_dirs(out.parent)
    tmpdir = Path(tempfile.mkdtemp(prefix=".edgesr-", dir=out.parent))
    try:
        tmp_art = tmpdir / out.name
        t = time.perf_counter()
        with captured_output() as tail:
            try:
                if fmt == "onnx":
                    result = export_onnx(safe, tmp_art, input_range=spec.input_range, input_size=size,
                                         dynamic=dynamic, multiple_of=spec.size_rule.multiple_of,
                                         min_size=spec.size_rule.min_size,
                                         dynamic_min_size=spec.size_rule.dynamic_min_size, metadata=meta)
                else:
                    result = export_tflite(safe, tmp_art, input_range=spec.input_range, input_size=size,
                                           multiple_of=spec.size_rule.multiple_of,
                                           min_size=spec.size_rule.min_size, metadata=meta)
            except (EdgeSRError, OSError):  # OSError: disk full etc., classified below
                raise
            except Exception as e:  # converter failures become one clear line
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise ExportError(f"{fmt} export of {spec.name} failed: {type(e).__name__}: {first}") from e
        export_seconds = time.perf_counter() - t
        stage_done(f"export {fmt}", export_seconds)
        precision_report = _reduce_precision(tmp_art, precision, loaded, size, dynamic, calibration,
                                             max_psnr_drop, stage_done)
        int8_io_report = None
        if int8_io:
            from .export.int8_io import apply_int8_io

            t = time.perf_counter()
            int8_io_report = apply_int8_io(tmp_art)
            stage_done("uint8 I/O", time.perf_counter() - t)

        report: dict = {
            "model": spec.name, "variant": loaded.variant, "scale": loaded.scale, "format": fmt,
            "input_size": meta["input_size"], "weights": loaded.source, "random_init": loaded.random_init,
            "fold": fold_report.as_dict(), "export": _result_dict(result), "export_seconds": round(export_seconds, 2),
            "versions": runtime_versions(), "stage_seconds": stage_seconds,
            "precision": precision_report,
            "int8_io": int8_io_report,
        }
        passed: bool | None = None
        parity = None
        if verify:
            t = time.perf_counter()
            sizes = [size]
            if dynamic:
                sizes.append(_second_size(spec, size))
            parity = verify_artifact(tmp_art, loaded.model, spec.input_range,
                                     VerifySettings(sizes=sizes, threads=threads), fmt, precision)
            stage_done("verify", time.perf_counter() - t)
            passed = parity.passed
            report["parity"] = json.loads(parity.to_json())  # strict JSON: inf PSNR as "inf"
            report["passed"] = passed
            write_metadata(tmp_art, {"parity": parity.summary()})
        else:
            report["parity"] = None
            report["passed"] = None
            write_metadata(tmp_art, {"parity": "not verified (--no-verify)"})

        _, json_path, md_path = export_outputs(out)
        side_files = [Path(p).name for p in report["export"].get("checks", {}).get("external_data", [])]
        report = _final_paths(report, tmpdir, out.parent)  # the report names where files end up
        (tmpdir / json_path.name).write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        (tmpdir / md_path.name).write_text(_report_markdown(report, parity if verify else None))
        # Reports and side files first, artifact last: an artifact on disk always has its report beside it.
        for name in (json_path.name, md_path.name, *side_files, out.name):
            os.replace(tmpdir / name, out.parent / name)
    except OSError as e:  # disk full, read-only, permission: the user's environment (exit 2)
        raise output_error(out, e) from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        remove_empty_dirs(made)  # only a failed run's folders are empty
    return ExportOutcome(out, json_path, md_path, passed, report)


def _reduce_precision(artifact, precision, loaded, size, dynamic, calibration, max_psnr_drop, stage_done) -> dict:
    """fp16/int8: rewrite the fp32 export in place (no-op record for fp32)."""
    from .export.precision import reduce_precision

    t = time.perf_counter()
    with captured_output():  # the quantizers print progress and size tables
        report = reduce_precision(artifact, precision, scale=loaded.scale, size=size, dynamic=dynamic,
                                  multiple_of=loaded.spec.size_rule.multiple_of, calibration=calibration,
                                  max_psnr_drop=max_psnr_drop)
    if precision != "fp32":
        stage_done(f"{precision} conversion", time.perf_counter() - t)
    return report


def _final_paths(obj, tmpdir: Path, final_dir: Path):
    """``obj`` with every path string inside ``tmpdir`` pointing into ``final_dir`` instead."""
    if isinstance(obj, dict):
        return {k: _final_paths(v, tmpdir, final_dir) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_final_paths(v, tmpdir, final_dir) for v in obj)
    if isinstance(obj, (str, Path)) and str(obj).startswith(str(tmpdir) + os.sep):
        return str(final_dir / Path(obj).relative_to(tmpdir))
    return obj


def _default_size(spec: ModelSpec) -> tuple[int, int]:
    m = spec.size_rule.multiple_of
    h = max(DEFAULT_SIZE[0], spec.size_rule.min_size)
    h = -(-h // m) * m
    return h, h


def _fold_probe(spec: ModelSpec) -> tuple[int, int]:
    m = spec.size_rule.multiple_of
    h = -(-max(32, spec.size_rule.min_size) // m) * m
    return h, h + (m if m > 1 else 3)


def _second_size(spec: ModelSpec, size: tuple[int, int]) -> tuple[int, int]:
    """Another size the dynamic graph must handle: smaller, non-square, still legal."""
    m = spec.size_rule.multiple_of
    h = max(spec.size_rule.min_size, -(-(size[0] // 2 + 1) // m) * m)
    w = max(spec.size_rule.min_size, -(-(size[1] // 2 + 3) // m) * m + m)
    return h, w


def _result_dict(result) -> dict:
    from dataclasses import asdict, is_dataclass

    return asdict(result) if is_dataclass(result) else dict(result)


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


def _report_markdown(report: dict, parity=None) -> str:
    fold_r = report["fold"]
    lines = [
        f"# edgesr export: {report['model']} {report['variant']} x{report['scale']} -> {report['format']}",
        "",
        f"- input size: {report['input_size']}",
        f"- weights: {report['weights']}",
        f"- export time: {report['export_seconds']} s",
        f"- fold: {fold_r['params_before']:,} -> {fold_r['params_after']:,} params, "
        f"max-abs {fold_r['max_abs']:.2e} on the probe",
        "",
        *_io_contract_markdown(report),
    ]
    from .export.precision import precision_markdown

    lines += precision_markdown(report.get("precision") or {})
    if parity is None:
        lines.append("**Parity: not verified** (--no-verify).")
        return "\n".join(lines) + "\n"
    return "\n".join(lines) + "\n" + parity.to_markdown()


def _io_contract_markdown(report: dict) -> list[str]:
    """The artifact's I/O contract (what a caller must feed and gets back), as in the JSON."""
    export = report.get("export") or {}
    meta = export.get("metadata") or {}
    if not export:
        return []
    shape = lambda dims: "[" + ", ".join(str(d) for d in dims) + "]"  # noqa: E731
    layout = export.get("layout", "?")
    rng = meta.get("input_range", "[0,1]")
    rule = get_spec(report["model"]).size_rule.describe()
    io = report.get("int8_io")
    dtype = {s: "float32 RGB" if not io else f"{io[s]['dtype']} RGB (scale {io[s]['scale']:.6g}, "
             f"zero point {io[s]['zero_point']})" for s in ("input", "output")}
    return [
        "## I/O contract",
        "",
        "| tensor | name | dtype | layout | shape | range |",
        "|---|---|---|---|---|---|",
        f"| input | `{meta.get('input_name', '?')}` | {dtype['input']} | {layout} | "
        f"{shape(export.get('input_shape', ()))} "
        f"| {'0..255 = ' if io else ''}{rng} |",
        f"| output | `{meta.get('output_name', '?')}` | {dtype['output']} | {layout} | "
        f"{shape(export.get('output_shape', ()))} | "
        f"{'0..255 = ' + rng + ' (saturated)' if io else rng + ' (not clamped)'} |",
        "",
        f"- the graph converts to the model's native range {meta.get('native_range', '?')} inside; feed {rng}",
        *([f"- integer I/O (--int8-io): real = scale x (q - zero point); feed the 8-bit image, get the 8-bit "
           f"image; {io['graph']['input']}; {io['graph']['output']}"] if io else []),
        *([f"- size rule: {rule}"] if rule else []),
        f"- artifact: `{Path(str(export.get('path', '?'))).name}`, {export.get('file_size', 0) / 1e6:.2f} MB",
        "",
    ]


def load_images(directory: str | os.PathLike) -> list[np.ndarray]:
    d = Path(directory)
    if not d.is_dir():
        raise EdgeSRError(f"image directory not found: {d}")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    if not files:
        raise EdgeSRError(f"no images (.png/.jpg/.bmp/.webp) in {d}")
    try:
        return [read_image(p) for p in files]
    except OSError as e:
        raise EdgeSRError(f"cannot read image in {d}: {e}") from None
