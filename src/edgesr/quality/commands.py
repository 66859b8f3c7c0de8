"""CLI command of the quality subsystem: ``edgesr eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import EdgeSRError

out = Console()
err = Console(stderr=True)


def _progress_bar(total: int, description: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=err, transient=False)
    task = bar.add_task(escape(description), total=total)
    return bar, lambda: bar.advance(task)


def _check_outputs(inputs: list[Path], json_out: Optional[Path], md_out: Optional[Path],
                   images_out: Optional[Path]) -> None:
    from ..io import check_output_path

    # Before any work: an output must not overwrite an input and must be writable.
    for path, is_dir in ((json_out, False), (md_out, False), (images_out, True)):
        if path is not None:
            check_output_path(path, *inputs, directory=is_dir)


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        artifact: Optional[Path] = typer.Argument(None, help="An .onnx or .tflite artifact written by edgesr export."),
        weights: Optional[Path] = typer.Option(None, "--weights", "-w", help="A trained checkpoint (train form)."),
        dataset: Path = typer.Option(..., "--dataset", "-d",
                                     help="HR/ [+ LR_bicubic/X{s}/] (SR), or low/ + high/ (restoration, x1)."),
        scale: Optional[int] = typer.Option(None, "--scale", help="Must agree with the model (checked)."),
        runtime: Optional[str] = typer.Option(
            None, "--runtime", help="Artifact: its runtime (onnxruntime or litert). --weights: torch (default), or "
            "onnxruntime / litert = export the checkpoint to that format and score each image whole "
            "(one dynamic ONNX; one TFLite per input size)."),
        arch: Optional[str] = typer.Option(None, "--arch", help="aarch64: run the artifact/export under qemu."),
        threads: Optional[int] = typer.Option(None, "--threads", help="Runtime threads (>= 1)."),
        state_key: Optional[str] = typer.Option(None, "--state-key", help="Checkpoint wrapper to read: params or params_ema."),
        images: Optional[str] = typer.Option(None, "--images", help="Comma list of image names (a subset)."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the per-image scores as JSON."),
        md_out: Optional[Path] = typer.Option(None, "--markdown", help="Write them as a Markdown table."),
        images_out: Optional[Path] = typer.Option(None, "--save-images", help="Folder for the 8-bit outputs."),
    ) -> None:
        """Score a model on an SR benchmark folder: Y-PSNR/SSIM as in the papers' tables."""
        from contextlib import ExitStack

        from ..io import atomic_write_text
        from ..runtime.runners import check_threads
        from .engine import artifact_form, exported_form, load_samples, prepare, score, torch_form

        check_threads(threads)
        if (artifact is None) == (weights is None):
            raise EdgeSRError("give an ARTIFACT or --weights CHECKPOINT (one of them)")
        inputs = [p for p in (artifact, weights, dataset) if p is not None]
        _check_outputs(inputs, json_out, md_out, images_out)
        with ExitStack() as stack:  # exports made for this run go with it, whatever happens
            if weights is not None and runtime in (None, "torch"):
                if arch not in (None, "x86_64"):
                    raise EdgeSRError(f"--arch {arch} runs exported models: add --runtime onnxruntime or litert "
                                      "to export the checkpoint for it")
                form = torch_form(weights, threads=threads, state_key=state_key)
            elif weights is not None:
                form = stack.enter_context(exported_form(weights, runtime, arch=arch, threads=threads,
                                                         state_key=state_key, on_export=_say))
            else:
                form = artifact_form(artifact, arch=arch, threads=threads)
                _check_runtime(runtime, form.form)
            subset = [s.strip() for s in images.split(",") if s.strip()] if images else None
            ds, samples = load_samples(dataset, form, scale, subset)  # every bad input fails here, before any run
            prepare(form, samples)  # exports (and their parity checks) before the first score
            bar, step = _progress_bar(len(samples), f"{form.model} {form.variant} x{form.scale} ({form.form})")
            outputs: dict = {}
            with bar:
                report = score(form, ds, samples, progress=step, outputs=outputs)
        _print_table(report)
        if report.tiling:
            err.print(f"[dim]{escape(report.tiling)}[/]")
        if json_out:
            atomic_write_text(json_out, report.to_json())
        if md_out:
            atomic_write_text(md_out, report.to_markdown())
        if images_out:
            _save_images(images_out, outputs, report)
        for what, path in (("json", json_out), ("markdown", md_out), ("images", images_out)):
            if path:
                err.print(f"[dim]{what}: {escape(str(path))}[/]")


def _say(message: str) -> None:
    err.print(f"[dim]{escape(message)}[/]")


def _check_runtime(runtime: Optional[str], fmt: str) -> None:
    expected = {"onnx": "onnxruntime", "tflite": "litert"}[fmt]
    if runtime not in (None, expected):
        raise EdgeSRError(f"a {fmt} artifact runs on --runtime {expected}, not {runtime}")


def _print_table(report) -> None:
    from rich.table import Table

    p, s = report.keys
    table = Table(title=escape(f"{report.model} {report.variant} x{report.scale} on {report.dataset} "
                               f"— {report.form}, {report.runtime}, {report.mode}"))
    table.add_column("image")
    table.add_column(f"{p} (dB)", justify="right")
    table.add_column(s, justify="right")
    for im in report.images:
        table.add_row(escape(im["name"]), f"{im[p]:.4f}", f"{im[s]:.4f}")
    table.add_row("mean", f"{report.mean[p]:.4f}", f"{report.mean[s]:.4f}", style="bold")
    out.print(table)


def _save_images(folder: Path, outputs: dict, report) -> None:
    from PIL import Image

    from ..io import atomic_path

    for name, image in outputs.items():
        with atomic_path(folder / f"{name}_{report.model}_{report.variant}_x{report.scale}.png") as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
