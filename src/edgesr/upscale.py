"""``edgesr upscale``: apply an artifact (or a checkpoint) to photos of any size.

The algorithm lives in two self-contained modules the device bundle embeds as well:
:mod:`edgesr.runtime.tiling` (padding, tiles, blending) and :mod:`edgesr.imageio`
(modes, 16 bits, alpha, EXIF, ICC).  This module only decides *how* to run -- which
runner, which tile, which overlap -- and walks the inputs: bad files are listed, good
ones written, and the exit code is 2 when anything failed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, List, Optional

import numpy as np

from . import imageio
from .errors import EdgeSRError, SizeRuleError
from .runtime.runners import check_threads
from .runtime.tiling import iter_upscaled_blocks, plan_tiles, rule_values

RUNTIMES = ("onnxruntime", "litert", "torch")


@dataclass
class Upscaler:
    """A runner plus everything tiling needs to know about it."""

    run: Callable[[np.ndarray], np.ndarray]
    runtime: str
    scale: int
    min_size: int
    multiple_of: int
    receptive_field: int | None
    fixed_tile: tuple[int, int] | None  # the artifact's static input size
    label: str  # names outputs: <stem>_<label>_x<scale>
    tile: tuple[int, int] | None = None  # --tile (dynamic runners only)
    overlap: int | None = None  # --overlap

    def plan(self, height: int, width: int) -> tuple[tuple[int, int] | None, int]:
        """``(tile or None for whole-image, overlap)`` for an input of this size."""
        return plan_tiles(height, width, fixed_tile=self.fixed_tile, tile=self.tile, overlap=self.overlap,
                          receptive_field=self.receptive_field,
                          size_rule={"min_size": self.min_size, "multiple_of": self.multiple_of})


def parse_tile(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    from .pipeline import parse_size

    return parse_size(text)


def _check_tile(tile: tuple[int, int], min_size: int, multiple_of: int) -> None:
    for side in tile:
        if side < min_size or side % multiple_of:
            rule = f">= {min_size}" + (f" and multiples of {multiple_of}" if multiple_of > 1 else "")
            raise SizeRuleError(f"--tile {tile[0]}x{tile[1]} breaks the model's size rule (sides {rule})")


def _receptive_field(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None  # "unbounded" or absent (artifacts exported before the key existed)


def open_upscaler(artifact: Path | None = None, weights: Path | None = None, runtime: str | None = None,
                  threads: int | None = None, tile: tuple[int, int] | None = None,
                  overlap: int | None = None, state_key: str | None = None) -> Upscaler:
    """The runner for ``artifact`` (onnxruntime/LiteRT) or ``weights`` (PyTorch train form)."""
    if runtime is not None and runtime not in RUNTIMES:
        raise EdgeSRError(f"unknown --runtime {runtime!r} (known: {', '.join(RUNTIMES)})")
    if overlap is not None and overlap < 0:
        raise EdgeSRError(f"--overlap must be >= 0, got {overlap}")
    if weights is not None:
        up = _torch_upscaler(weights, runtime, threads, state_key)
    elif artifact is not None:
        up = _artifact_upscaler(artifact, runtime, threads)
    else:
        raise EdgeSRError("give an ARTIFACT or --weights CHECKPOINT")
    if tile is not None:
        if up.fixed_tile is not None and tuple(tile) != tuple(up.fixed_tile):
            raise SizeRuleError(f"the artifact has a fixed input size {up.fixed_tile[0]}x{up.fixed_tile[1]}: "
                                f"--tile must be that size or omitted (got {tile[0]}x{tile[1]})")
        _check_tile(tile, up.min_size, up.multiple_of)
        up.tile = tuple(tile)
    up.overlap = overlap
    return up


def _torch_upscaler(weights: Path, runtime: str | None, threads: int | None, state_key: str | None = None) -> Upscaler:
    if runtime not in (None, "torch"):
        raise EdgeSRError(f"--weights runs PyTorch; --runtime {runtime} needs an exported artifact "
                          "(`edgesr export --weights ...` first)")
    from .pipeline import obtain_model
    from .runtime.runners import TorchRunner

    loaded = obtain_model(None, weights=weights, state_key=state_key)
    spec = loaded.spec
    return Upscaler(TorchRunner(loaded.model, threads=threads).run, "torch", loaded.scale,
                    spec.size_rule.min_size, spec.size_rule.multiple_of, spec.receptive_field, None,
                    f"{spec.name}-{loaded.variant}")


def _artifact_upscaler(artifact: Path, runtime: str | None, threads: int | None) -> Upscaler:
    from .export.metadata import artifact_format
    from .runtime.runners import open_runner

    if not Path(artifact).is_file():
        raise EdgeSRError(f"artifact not found: {artifact}")
    fmt = artifact_format(artifact)
    native = {"onnx": "onnxruntime", "tflite": "litert"}[fmt]
    if runtime not in (None, native):
        hint = " (torch: pass --weights CHECKPOINT instead of the artifact)" if runtime == "torch" else ""
        raise EdgeSRError(f"{Path(artifact).name} is {fmt}: it runs on {native}, not {runtime}{hint}")
    # ORT's memory pattern only grows the arena over hundreds of same-shape tile runs
    runner = open_runner(artifact, threads=threads, **({"memory_pattern": False} if fmt == "onnx" else {}))
    meta = runner.meta
    try:
        scale = int(meta["scale"])
    except (KeyError, ValueError):
        raise EdgeSRError(f"{Path(artifact).name} has no scale in its metadata (not written by `edgesr export`?)") from None
    min_size, multiple_of = rule_values({k: meta.get(k) for k in ("min_size", "multiple_of")})
    fixed = tuple(int(v) for v in runner.fixed_size) if runner.fixed_size is not None else None
    label = "-".join(meta[k] for k in ("model", "variant") if meta.get(k)) or Path(artifact).stem
    return Upscaler(runner.run, native, scale, min_size, multiple_of, _receptive_field(meta.get("receptive_field")),
                    fixed, label)


# --------------------------------------------------------------------------- one image


def upscale_to_file(up: Upscaler, pic: imageio.Picture, path: Path, fmt: str,
                    on_tile: Callable[[int, int], None] | None = None) -> float:
    """Upscale ``pic`` into the image file ``path`` (PNG: streamed as tile rows finish).

    Returns the seconds spent in the tiler (model runs and blending), without the
    quantisation and encoding that share the loop: the figure to hold against `edgesr bench`.
    """
    h, w = pic.size
    tile, overlap = up.plan(h, w)
    rule = {"min_size": up.min_size, "multiple_of": up.multiple_of}
    blocks = _Timed(iter_upscaled_blocks(up.run, pic.rgb, up.scale, tile=tile, overlap=overlap, size_rule=rule,
                                         progress=on_tile))
    imageio.write_upscaled(path, pic, blocks, up.scale, fmt)
    return blocks.seconds


class _Timed:
    """An iterator that adds up the time its source takes to produce each item."""

    def __init__(self, source):
        self.source, self.seconds = source, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        try:
            return next(self.source)
        finally:
            self.seconds += time.perf_counter() - t


# --------------------------------------------------------------------------- many files


@dataclass
class Job:
    source: Path
    output: Path


@dataclass
class Summary:
    # job, (h, w), tiles, seconds (upscale + encode), seconds in the tiler (model runs + blending)
    written: list[tuple[Job, tuple[int, int], int, float, float]] = field(default_factory=list)
    skipped: list[Job] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def plan_jobs(inputs: Iterable[Path], output_dir: Path, label: str, scale: int, fmt: str) -> tuple[list[Job], list[tuple[Path, str]]]:
    """One job per input image; folders keep their sub-folder layout under ``output_dir``.

    Files inside ``output_dir`` are not inputs (a second run must not upscale the first
    run's results); inputs that would write the same output are failures.
    """
    jobs: list[Job] = []
    failed: list[tuple[Path, str]] = []
    taken: dict[Path, Path] = {}
    out_resolved = output_dir.resolve()
    for given in map(Path, inputs):
        if given.is_dir():
            files = [(f, f.relative_to(given).parent) for f in imageio.find_images([given])
                     if not f.resolve().is_relative_to(out_resolved)]
        elif given.exists():
            files = [(given, Path("."))]
        else:
            failed.append((given, f"cannot read {given}: no such file or directory"))
            continue
        for src, sub in files:
            out = output_dir / sub / imageio.output_name(src, label, scale, fmt)
            key = out.resolve()
            if key in taken:
                failed.append((src, f"{src}: its output {out} is also {taken[key]}'s output; rename one"))
                continue
            taken[key] = src
            jobs.append(Job(src, out))
    return jobs, failed


def upscale_files(up: Upscaler, jobs: list[Job], fmt: str, overwrite: bool, summary: Summary,
                  on_image: Callable[[Job], None] | None = None,
                  on_tile: Callable[[int, int], None] | None = None) -> None:
    """Upscale every job into ``summary``; user errors of one image do not stop the others."""
    from .io import atomic_path, refuse_output_overlapping_inputs

    sources = [j.source for j in jobs]
    for job in jobs:
        if on_image:
            on_image(job)
        if job.output.exists() and not overwrite:
            summary.skipped.append(job)
            continue
        try:
            if job.output.exists():  # only an existing file can be one of the inputs
                refuse_output_overlapping_inputs(job.output, *sources)
            pic = imageio.read_picture(job.source)
            t = time.perf_counter()
            tiles = [0]

            def count(done: int, total: int) -> None:
                tiles[0] = total
                if on_tile:
                    on_tile(done, total)

            with atomic_path(job.output) as tmp:  # a failure or Ctrl-C mid-image removes the temp file
                tiling_seconds = upscale_to_file(up, pic, tmp, fmt, count)
            seconds = time.perf_counter() - t
            summary.written.append((job, pic.size, tiles[0], seconds, tiling_seconds))
        except EdgeSRError as e:
            message = str(e)
            summary.failed.append((job.source, message if str(job.source) in message else f"{job.source}: {message}"))


# --------------------------------------------------------------------------- command


def register(app) -> None:
    import typer
    from rich.console import Console
    from rich.markup import escape

    import sys

    # In logs and pipes rich would squeeze the table to 80 columns.
    out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    err = Console(stderr=True, soft_wrap=True)

    @app.command("upscale")
    def upscale_cmd(
        paths: List[Path] = typer.Argument(..., metavar="[ARTIFACT] INPUT", help="ARTIFACT INPUT... (or only INPUT... with --weights): "
                                                      "image files or folders (searched recursively)."),
        output: Path = typer.Option(..., "--output", "-o", help="Folder for the upscaled images."),
        weights: Optional[Path] = typer.Option(None, "--weights", "-w",
                                               help="Run a checkpoint in PyTorch instead of an artifact."),
        tile: Optional[str] = typer.Option(None, "--tile", help="HxW tiles (dynamic ONNX/torch; default: "
                                           "whole image up to 1 MP, else tiles of at most 512 px fitted to the image; fixed artifacts: their size)."),
        overlap: Optional[int] = typer.Option(None, "--overlap", help="Tile overlap in input px (default: twice "
                                              "the model's receptive-field radius, or 16; at most half a tile)."),
        threads: Optional[int] = typer.Option(None, "--threads"),
        state_key: Optional[str] = typer.Option(None, "--state-key", help="With --weights: checkpoint wrapper "
                                                "to read (params or params_ema)."),
        runtime: Optional[str] = typer.Option(None, "--runtime", help="onnxruntime | litert | torch "
                                              "(default: the artifact's own; torch with --weights)."),
        fmt: str = typer.Option("png", "--format", help="png | jpg | webp (16-bit inputs stay 16-bit in png)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs (default: skip them)."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write per-image results (sizes, tiles, "
                                                "seconds, output MP/s) and the failures as JSON."),
    ) -> None:
        """Upscale photos of any size with tiling; bad inputs are listed, good ones written (exit 2 if any failed)."""
        from .io import check_output_path

        if fmt not in imageio.FORMATS:
            raise EdgeSRError(f"unknown --format {fmt!r} (known: {', '.join(imageio.FORMATS)})")
        check_threads(threads)
        artifact, inputs = (None, paths) if weights is not None else (paths[0], paths[1:])
        if not inputs:
            raise EdgeSRError("give at least one INPUT image or folder after the artifact")
        check_output_path(output, *([artifact, weights] + list(inputs)), directory=True)
        if json_out is not None:
            check_output_path(json_out, *([artifact, weights] + list(inputs)))
        up = open_upscaler(artifact, weights, runtime, threads, parse_tile(tile), overlap, state_key)
        summary = run_with_progress(up, inputs, output, fmt, overwrite, err)
        print_summary(summary, up, out, err, escape)
        if json_out is not None:
            from .io import atomic_write_text

            atomic_write_text(json_out, json.dumps(summary_dict(summary, up), indent=2) + "\n")
        if summary.failed:
            raise EdgeSRError(f"{len(summary.failed)} of {len(summary.failed) + len(summary.written) + len(summary.skipped)} "
                              "input(s) failed (listed above)")


def run_with_progress(up: Upscaler, inputs, output: Path, fmt: str, overwrite: bool, console) -> Summary:
    """Plan the jobs and run them under a rich progress bar over images and tiles."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    jobs, failed = plan_jobs(inputs, output, up.label, up.scale, fmt)
    if not jobs and not failed:
        names = ", ".join(str(p) for p in inputs)
        raise EdgeSRError(f"no images found in {names} (looked for {' '.join(imageio.IMAGE_SUFFIXES)})")
    summary = Summary(failed=list(failed))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        images = progress.add_task("images", total=len(jobs))
        tiles = progress.add_task("tiles", total=1)
        state = {"started": False}

        def on_image(job: Job) -> None:
            if state["started"]:
                progress.advance(images)
            state["started"] = True
            progress.update(images, description=f"images [dim]{escape(job.source.name)}[/]")
            progress.reset(tiles, total=1)

        def on_tile(done: int, total: int) -> None:
            progress.update(tiles, completed=done, total=total)

        upscale_files(up, jobs, fmt, overwrite, summary, on_image, on_tile)
        if jobs:
            progress.advance(images)
    return summary


def summary_dict(summary: Summary, up: Upscaler) -> dict:
    images = []
    for job, (h, w), tiles, seconds, tiling_seconds in summary.written:
        mpix = up.scale * up.scale * h * w / 1e6
        images.append({"input": str(job.source), "output": str(job.output), "input_hw": [h, w],
                       "output_hw": [up.scale * h, up.scale * w], "tiles": tiles, "seconds": seconds,
                       "output_mpix_s": mpix / seconds if seconds > 0 else None,
                       "tiling_seconds": tiling_seconds,
                       "tiling_mpix_s": mpix / tiling_seconds if tiling_seconds > 0 else None})
    return {"runtime": up.runtime, "model": up.label, "scale": up.scale, "images": images,
            "skipped": [str(j.output) for j in summary.skipped],
            "failed": [{"input": str(src), "error": message} for src, message in summary.failed]}


def print_summary(summary: Summary, up: Upscaler, out, err, escape) -> None:
    from rich.table import Table

    if summary.written:
        table = Table(title=f"edgesr upscale x{up.scale} ({up.runtime}, {up.label})")
        for col in ("input", "size", "output", "tiles", "seconds", "out MP/s"):
            table.add_column(col, justify="left" if col in ("input", "output") else "right")
        for job, (h, w), tiles, seconds, _ in summary.written:
            mpix = up.scale * up.scale * h * w / 1e6
            table.add_row(escape(str(job.source)), f"{w}x{h}", escape(str(job.output)), str(tiles),
                          f"{seconds:.2f}", f"{mpix / seconds:.2f}" if seconds > 0 else "-")
        out.print(table)
    for job in summary.skipped:
        err.print(f"[yellow]skipped:[/] {escape(str(job.output))} exists (use --overwrite)", highlight=False)
    for src, message in summary.failed:
        err.print(f"[red]failed:[/] {escape(message)}", highlight=False)


# --------------------------------------------------------------------------- Quickstart sample

_DATA = Path(__file__).parent / "data"
#: PlainUSR-S x4 (Rep form, MIT; data/weights/ATTRIBUTION.md): what `edgesr export` uses
#: without --model/--weights, so the first command a user runs gives a useful artifact.
SAMPLE_WEIGHTS = _DATA / "weights" / "PlainUSRS_Rep_x4.pth"
SAMPLE_PHOTO = _DATA / "images" / "chelsea.png"


def upscale_sample(artifact: Path, photo: Path = SAMPLE_PHOTO) -> Path:
    """Upscale a shipped photograph with ``artifact`` into the artifact's folder; its path."""
    up = open_upscaler(Path(artifact))
    jobs, _ = plan_jobs([photo], Path(artifact).parent, up.label, up.scale, "png")
    summary = Summary()
    upscale_files(up, jobs, "png", overwrite=True, summary=summary)
    if summary.failed:
        raise EdgeSRError(summary.failed[0][1])
    return jobs[0].output
