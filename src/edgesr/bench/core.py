"""`edgesr bench`: latency per (runtime x threads x input size), GFLOP/s against measured peak.

Every cell (and every peak probe) runs in a fresh worker process
(:mod:`edgesr.bench.worker`), which loads one runner, warms it up and times it; the
parent only plans, exports and collects.  Records are built by
:mod:`edgesr.bench.device_bench`, the same file a device bundle runs, so local and
device results share one schema.

Runtimes:
  ``torch-train``   the train-time form in eager PyTorch, in eval mode (what running the
                    official model for inference costs; SPAN's eval forward already folds
                    its Conv3XC on the fly, so it is close to ``torch-folded``);
  ``torch-trainmode`` the train-time form with ``training=True`` under no_grad: the
                    multi-branch graph that training runs (SPAN: 1x1-3x3-1x1 + skip);
  ``torch-folded``  after the exact structural folds (``edgesr.fold``);
  ``torch-deploy``  the deploy form (``edgesr.deploy(model, "onnx")``) in eager PyTorch;
  ``onnxruntime``   an ONNX artifact;   ``litert``  a TFLite artifact (XNNPACK).

``macs`` is always the deploy-form graph's count at the cell's input size, so for the
torch-train/-folded cells GFLOP/s is *effective* throughput (useful work per second).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..errors import EdgeSRError
from . import device_bench as db
from .peak import DEFAULT_GEMM, Gemm, family_of, write_gemm_model

RUNTIMES = ("torch-train", "torch-trainmode", "torch-folded", "torch-deploy", "onnxruntime", "litert")
DEFAULT_MODEL_RUNTIMES = ("torch-train", "torch-deploy", "onnxruntime", "litert")
FORMAT_RUNTIME = {"onnx": "onnxruntime", "tflite": "litert"}
RUNTIME_FORMAT = {v: k for k, v in FORMAT_RUNTIME.items()}
TORCH_FORMS = {"torch-train": "train", "torch-trainmode": "trainmode", "torch-folded": "folded",
               "torch-deploy": "deploy"}
DEFAULT_SIZE = (256, 256)
# Run by path, not with -m: see worker.py (artifact cells then never import torch).
WORKER = [sys.executable, str(Path(__file__).with_name("worker.py"))]


@dataclass
class BenchSettings:
    threads: Sequence[int] = ()
    runs: int = 10
    warmup: int = 2
    sizes: Sequence[tuple[int, int]] | None = None
    runtimes: Sequence[str] | None = None
    label: str | None = None  # host label in the document (default: hostname)
    verify: bool = False  # --model: run export parity before benchmarking
    peak: bool = True
    gemm: Gemm = DEFAULT_GEMM
    timeout: float | None = None  # per worker process, seconds

    def __post_init__(self):
        if self.runs < 1:
            raise EdgeSRError(f"--runs must be at least 1, got {self.runs}")
        if self.warmup < 0:
            raise EdgeSRError(f"--warmup must be >= 0, got {self.warmup}")
        self.threads = list(self.threads) or default_threads()
        if any(t < 1 for t in self.threads):
            raise EdgeSRError(f"thread counts must be >= 1, got {self.threads}")
        if self.runtimes is not None:
            bad = [r for r in self.runtimes if r not in RUNTIMES]
            if bad:
                raise EdgeSRError(f"unknown runtime {bad[0]!r} (known: {', '.join(RUNTIMES)})")


def default_threads() -> list[int]:
    return sorted({1, os.cpu_count() or 1})


class Progress:
    """What the bench tells its caller while it runs (the CLI draws a rich progress bar)."""

    def start(self, total: int) -> None:
        pass

    def step(self, description: str) -> None:
        """Called before each step (export, peak probe, cell)."""

    def done(self) -> None:
        pass


@dataclass
class _Cell:
    job: dict
    fields: dict  # static cell_record fields
    macs_key: tuple | None
    desc: str


@dataclass
class _Plan:
    cells: list[_Cell] = field(default_factory=list)
    exports: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    macs: dict = field(default_factory=dict)  # macs_key -> callable returning int | None
    deployed: dict = field(default_factory=dict)  # (name, variant, scale) -> folded module


# --------------------------------------------------------------------------- public entry points


def bench_artifacts(paths: Sequence[str | os.PathLike], settings: BenchSettings,
                    progress: Progress | None = None) -> dict:
    """Benchmark existing ONNX / TFLite artifacts on their runtime."""
    from ..export.metadata import artifact_format, read_metadata

    plan = _Plan()
    for p in map(Path, paths):
        if not p.is_file():
            raise EdgeSRError(f"artifact not found: {p}")
        fmt = artifact_format(p)
        runtime = FORMAT_RUNTIME[fmt]
        if settings.runtimes and runtime not in settings.runtimes:
            continue
        meta = read_metadata(p)
        sizes = artifact_sizes(meta, settings.sizes, p)
        label = _label(meta) or p.name
        info = _model_info(meta)
        for hw in sizes:
            key = None
            if info:
                key = (info["name"], info["variant"], info["scale"], fmt, hw)
                plan.macs[key] = _deploy_macs_fn(info, fmt, hw, plan.deployed)
            for t in settings.threads:
                job = {"kind": "artifact", "runtime": runtime, "path": str(p.resolve()), "threads": t,
                       "input_shape": [1, 3, *hw], "runs": settings.runs, "warmup": settings.warmup}
                fields = dict(label=label, model=meta.get("model"), variant=meta.get("variant"),
                              scale=_int_or_none(meta.get("scale")), artifact=p.name, form="artifact")
                plan.cells.append(_Cell(job, fields, key, f"{p.name} · {runtime} · {t} thr · {hw[0]}x{hw[1]}"))
    if not plan.cells:
        raise EdgeSRError("nothing to benchmark: no artifact matches --runtimes")
    return _execute(plan, settings, progress or Progress())


def bench_model(name: str | None, variant: str | None = None, scale: int | None = None,
                weights: str | os.PathLike | None = None, settings: BenchSettings | None = None,
                progress: Progress | None = None, state_key: str | None = None) -> dict:
    """Benchmark a registered model: torch forms in eager mode, exported artifacts per size."""
    from ..pipeline import check_size, obtain_model

    settings = settings or BenchSettings()
    loaded = obtain_model(name, variant, scale, weights, state_key=state_key)
    spec = loaded.spec
    runtimes = list(settings.runtimes or DEFAULT_MODEL_RUNTIMES)
    sizes = list(settings.sizes or [_round_size(DEFAULT_SIZE, spec.size_rule.multiple_of, spec.size_rule.min_size)])
    for hw in sizes:
        check_size(spec, hw)
    model_spec = {"name": spec.name, "variant": loaded.variant, "scale": loaded.scale,
                  "weights": str(Path(weights).resolve()) if weights else None, "seed": 0, "state_key": state_key}
    label = f"{spec.name} {loaded.variant} x{loaded.scale}"
    tmp = tempfile.TemporaryDirectory(prefix="edgesr-bench-")
    plan = _Plan()
    artifacts: dict[tuple, Path | str] = {}  # (fmt, hw) -> path, or the export error

    for hw in sizes:
        for runtime in runtimes:
            fmt = RUNTIME_FORMAT.get(runtime)
            target = fmt or "onnx"
            key = (spec.name, loaded.variant, loaded.scale, target, hw)
            if key not in plan.macs:
                plan.macs[key] = _deploy_macs_fn(model_spec, target, hw, plan.deployed, loaded=loaded)
            if fmt and (fmt, hw) not in artifacts:
                out = Path(tmp.name) / f"{spec.name}_{loaded.variant}_x{loaded.scale}_{hw[0]}x{hw[1]}.{fmt}"
                artifacts[(fmt, hw)] = out
                plan.exports.append((f"export {fmt} {hw[0]}x{hw[1]}",
                                     _export_fn(loaded, fmt, hw, out, settings, artifacts)))
            for t in settings.threads:
                if fmt:
                    job = {"kind": "artifact", "runtime": runtime, "path": None, "artifact_key": [fmt, *hw]}
                    form, art_name = "artifact", None
                else:
                    job = {"kind": "torch", "runtime": runtime, "model": model_spec}
                    form, art_name = TORCH_FORMS[runtime], None
                job.update(threads=t, input_shape=[1, 3, *hw], runs=settings.runs, warmup=settings.warmup)
                fields = dict(label=label, model=spec.name, variant=loaded.variant, scale=loaded.scale,
                              artifact=art_name, form=form)
                plan.cells.append(_Cell(job, fields, key, f"{label} · {runtime} · {t} thr · {hw[0]}x{hw[1]}"))
    try:
        # Artifact paths are resolved at run time (after the export steps).
        def resolve(cell: _Cell) -> str | None:
            k = cell.job.get("artifact_key")
            if not k:
                return None
            got = artifacts[(k[0], (k[1], k[2]))]
            if isinstance(got, str):
                return got  # the export error
            cell.job["path"] = str(got)
            cell.fields["artifact"] = got.name
            return None

        return _execute(plan, settings, progress or Progress(), resolve=resolve)
    finally:
        tmp.cleanup()


# --------------------------------------------------------------------------- execution


def _execute(plan: _Plan, settings: BenchSettings, progress: Progress, resolve=None) -> dict:
    from ..pipeline import runtime_versions

    families = sorted({(family_of(c.job["runtime"]), c.job["threads"]) for c in plan.cells})
    total = len(plan.exports) + len(plan.macs) + (2 * len(families) if settings.peak else 0) + len(plan.cells)
    progress.start(total)
    doc = db.new_document(settings.label, runtime_versions(), settings.runs, settings.warmup)
    doc["settings"]["gemm"] = settings.gemm.as_dict()
    try:
        for desc, fn in plan.exports:
            progress.step(desc)
            fn()
        macs: dict = {}
        for key, fn in plan.macs.items():
            progress.step(f"count MACs {key[0]} {key[3]} {key[4][0]}x{key[4][1]}")
            macs[key] = fn()
        peak_dir = Path(tempfile.mkdtemp(prefix="edgesr-peak-"))
        first = []
        if settings.peak:  # probed before and after the cells: a busy moment must not lower the peak
            for family, t in families:
                progress.step(f"peak sgemm (before) · {family} · {t} thr")
                first.append(_measure_peak(family, t, settings, peak_dir))
        for cell in plan.cells:
            progress.step(cell.desc)
            error = resolve(cell) if resolve else None
            res = {"error": error} if error else db.run_child(WORKER, cell.job, timeout=settings.timeout)
            if res.get("memory") is not None:
                res["memory"]["torch_imported"] = res.get("torch_imported")
            doc["results"].append(db.cell_record(
                runtime=cell.job["runtime"], family=family_of(cell.job["runtime"]), threads=cell.job["threads"],
                input_hw=cell.job["input_shape"][2:], runs=settings.runs, warmup=settings.warmup,
                samples_s=res.get("samples_s"), output_hw=db.output_hw_of(res.get("output_shape"), "NCHW"),
                macs=macs.get(cell.macs_key), memory=res.get("memory"),
                runtime_version=res.get("runtime_version"), error=res.get("error"), **cell.fields))
        if settings.peak:
            for (family, t), before in zip(families, first):
                progress.step(f"peak sgemm (after) · {family} · {t} thr")
                doc["peaks"].append(db.merge_peak(before, _measure_peak(family, t, settings, peak_dir)))
    finally:
        shutil.rmtree(peak_dir, ignore_errors=True)
        progress.done()
    db.attach_peaks(doc)
    return doc


def _measure_peak(family: str, threads: int, settings: BenchSettings, directory: Path) -> dict:
    g = settings.gemm
    try:
        path = write_gemm_model(family, directory, g)
    except Exception as e:  # a runtime's schema/converter package missing or broken
        return db.peak_record(family=family, threads=threads, gemm=g.as_dict(), error=f"{type(e).__name__}: {e}")
    job = {"kind": "peak", "runtime": family, "path": str(path) if path else None, "threads": threads,
           "gemm": {"k": g.k, "h": g.h, "w": g.w, "layers": g.layers, "channels": g.channels}, "input_shape": list(g.input_shape),
           "runs": db.PEAK_RUNS, "warmup": db.PEAK_WARMUP}
    res = db.run_child(WORKER, job, timeout=settings.timeout)
    return db.peak_record(family=family, threads=threads, gemm=g.as_dict(), samples_s=res.get("samples_s"),
                          runtime_version=res.get("runtime_version"), error=res.get("error"))


# --------------------------------------------------------------------------- helpers


def artifact_sizes(meta: dict, requested, path: Path) -> list[tuple[int, int]]:
    """The input sizes to run an artifact at: its static size, or --sizes for dynamic ONNX."""
    static = meta.get("input_size")
    dynamic = meta.get("dynamic") == "true" or static == "dynamic"
    if static and not dynamic:
        from ..pipeline import parse_size

        size = parse_size(static)
        if requested and any(tuple(s) != size for s in requested):
            raise EdgeSRError(f"{path.name} has a static {size[0]}x{size[1]} input (use --model for other sizes)")
        return [size]
    if dynamic:
        m, lo = int(meta.get("multiple_of", 1) or 1), int(meta.get("min_size", 1) or 1)
        sizes = list(requested) if requested else [_round_size(DEFAULT_SIZE, m, lo)]
        for h, w in sizes:
            if h % m or w % m or h < lo or w < lo:
                raise EdgeSRError(f"{path.name} needs height and width >= {lo} and divisible by {m}, got {h}x{w}")
        return [tuple(s) for s in sizes]
    if requested:  # foreign artifact without edgesr metadata
        return [tuple(s) for s in requested]
    raise EdgeSRError(f"{path.name} has no edgesr metadata; give its input size with --sizes HxW")


def _round_size(size, multiple_of: int, min_size: int) -> tuple[int, int]:
    return tuple(-(-max(s, min_size) // multiple_of) * multiple_of for s in size)  # type: ignore[return-value]


def _int_or_none(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _model_info(meta: dict) -> dict | None:
    if not meta.get("model") or _int_or_none(meta.get("scale")) is None:
        return None
    return {"name": meta["model"], "variant": meta.get("variant"), "scale": int(meta["scale"]), "weights": None,
            "seed": 0}


def _label(meta: dict) -> str | None:
    info = _model_info(meta)
    return f"{info['name']} {info['variant']} x{info['scale']}" if info else None


_MACS: dict[tuple, int] = {}  # (name, variant, scale, target, hw) -> MACs; weights never change a count


def _deploy_macs_fn(info: dict, target: str, hw: tuple[int, int], cache: dict, loaded=None):
    """MACs of the deploy-form graph at ``hw`` (weights do not matter; random init is used).

    ``cache`` keeps one folded model per architecture, so several targets cost one fold.
    """

    def count() -> int | None:
        import torch

        from ..pipeline import obtain_model
        from ..reparam import fold, make_export_safe
        from ..stats import count_macs

        try:
            lm = loaded or obtain_model(info["name"], info.get("variant"), info.get("scale"), None)
        except EdgeSRError:
            return None  # artifact of a model this edgesr does not know
        key = (lm.spec.name, lm.variant, lm.scale, target, tuple(hw))
        if key in _MACS:
            return _MACS[key]
        arch = key[:3]
        if arch not in cache:
            cache[arch] = fold(lm.model)[0]
        x = torch.rand(1, 3, *hw) * lm.spec.input_range
        _MACS[key] = int(count_macs(make_export_safe(cache[arch], target), x))
        return _MACS[key]

    return count


def _export_fn(loaded, fmt: str, hw: tuple[int, int], out: Path, settings: BenchSettings, artifacts: dict):
    def run() -> None:
        from ..pipeline import export_model

        try:
            result = export_model(loaded, fmt, size=hw, output=out, verify=settings.verify,
                                  threads=max(settings.threads))
        except EdgeSRError as e:
            artifacts[(fmt, hw)] = f"export failed: {e}"
            return
        if result.passed is False:
            artifacts[(fmt, hw)] = "export parity failed; not benchmarked"
            return
        artifacts[(fmt, hw)] = result.artifact

    return run
