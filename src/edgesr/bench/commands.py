"""CLI commands of the bench subsystem: ``edgesr bench`` and ``edgesr bundle``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import EdgeSRError

out = Console()
err = Console(stderr=True)
PLOT_SUFFIX = ".png"  # report.plot writes PNG whatever the name says


def _table_console() -> Console:
    # Wide tables stay readable when piped to a file (rich assumes 80 columns there).
    return out if out.is_terminal else Console(width=220)


def _csv(text: Optional[str]) -> list[str]:
    return [t for t in (text or "").replace(" ", "").split(",") if t]


def _threads(text: Optional[str]) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise EdgeSRError(f"bad --threads {text!r}: expected a comma list of integers, e.g. 1,2") from None


def _sizes(text: Optional[str]):
    from ..pipeline import parse_size

    return [parse_size(s) for s in _csv(text)] or None


class _RichProgress:
    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=err, transient=False)
        self.task = None
        self.started = False

    def start(self, total: int) -> None:
        # Called once the plan is valid (bad input has failed by now, with its one-line error).
        from .device_bench import load_average

        load, ncpu = load_average(), os.cpu_count() or 1
        if load is not None and load > 0.5 * ncpu:
            err.print(f"[yellow]warning:[/] this machine is busy (load average {load:g} on {ncpu} cores); "
                      "latency figures will be contended", soft_wrap=True)
        self.p.start()
        self.task = self.p.add_task("bench", total=total)

    def step(self, description: str) -> None:
        if self.started:
            self.p.advance(self.task)
        self.started = True
        self.p.update(self.task, description=escape(description))

    def done(self) -> None:
        if self.task is not None:
            self.p.update(self.task, completed=self.p.tasks[0].total, description="done")
        self.p.stop()


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench_cmd(
        artifacts: Optional[List[Path]] = typer.Argument(None, help="ONNX / TFLite artifacts to time."),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="Time a registered model (exports per size)."),
        variant: Optional[str] = typer.Option(None, "--variant"),
        scale: Optional[int] = typer.Option(None, "--scale"),
        weights: Optional[Path] = typer.Option(None, "--weights", "-w", help="Checkpoint (default: seeded random)."),
        state_key: Optional[str] = typer.Option(None, "--state-key", help="Checkpoint wrapper: params or params_ema."),
        runtimes: Optional[str] = typer.Option(
            None, "--runtimes",
            help="Comma list of torch-train, torch-trainmode, torch-folded, torch-deploy, onnxruntime, litert "
                 "(--model default: torch-train,torch-deploy,onnxruntime,litert)."),
        threads: Optional[str] = typer.Option(None, "--threads", help="Comma list (default: 1 and all cores)."),
        sizes: Optional[str] = typer.Option(None, "--sizes", help="Comma list of HxW input sizes (default 256x256)."),
        runs: int = typer.Option(10, "--runs", help="Timed runs per cell."),
        warmup: int = typer.Option(2, "--warmup", help="Untimed runs first."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results (schema edgesr.bench/1)."),
        md_out: Optional[Path] = typer.Option(None, "--markdown", help="Write the tables as Markdown."),
        plot_out: Optional[Path] = typer.Option(None, "--plot", help="PNG: latency vs output megapixels."),
        imports: Optional[List[Path]] = typer.Option(None, "--import", help="Results from `edgesr bundle` devices."),
        label: Optional[str] = typer.Option(None, "--label", help="Name of this machine in tables (default hostname)."),
        verify: bool = typer.Option(False, "--verify/--no-verify", help="--model: parity-check each export first."),
        peak: bool = typer.Option(True, "--peak/--no-peak", help="Measure each runtime's sgemm peak."),
    ) -> None:
        """Latency, throughput, GFLOP/s vs measured peak, and memory per runtime x threads x size."""
        from ..io import atomic_write_text, check_outputs
        from .core import BenchSettings, bench_artifacts, bench_model
        from .report import load_result, markdown, plot, rich_tables

        if artifacts and model:
            raise EdgeSRError("give artifacts or --model, not both")
        if plot_out is not None and plot_out.suffix.lower() != PLOT_SUFFIX:
            raise EdgeSRError(f"--plot {plot_out} should end in {PLOT_SUFFIX} (the plot is a PNG image)")
        # Every output is checked before a single run: a benchmark is minutes of work.
        check_outputs([json_out, md_out, plot_out], *(artifacts or []), *(imports or []), weights)
        imported = [load_result(p) for p in imports or []]
        local: list[dict] = []
        if artifacts or model or weights:
            settings = BenchSettings(threads=_threads(threads), runs=runs, warmup=warmup, sizes=_sizes(sizes),
                                     runtimes=_csv(runtimes) or None, label=label, verify=verify, peak=peak)
            progress = _RichProgress()
            if artifacts:
                doc = bench_artifacts(artifacts, settings, progress)
            else:
                doc = bench_model(model, variant, scale, weights, settings, progress, state_key=state_key)
            local.append(doc)
            if json_out:
                atomic_write_text(json_out, json.dumps(doc, indent=2) + "\n")
        elif not imported:
            raise EdgeSRError("give ARTIFACT..., --model NAME, or --import RESULT.json")
        elif json_out:
            raise EdgeSRError("--json writes local results; nothing was run (only --import given)")
        docs = local + imported
        table, peaks = rich_tables(docs)
        con = _table_console()
        con.print(table)
        con.print(peaks)
        if md_out:
            atomic_write_text(md_out, markdown(docs))
        if plot_out:
            plot(docs, plot_out, local_count=len(local))
        for what, path in (("json", json_out), ("markdown", md_out), ("plot", plot_out)):
            if path:
                err.print(f"[dim]{what}: {escape(str(path))}[/]")
        failed = [r for d in local for r in d["results"] if r.get("error")]
        if failed:
            err.print(f"[yellow]warning:[/] {len(failed)} cell(s) failed; first: {escape(str(failed[0]['error']))}")
            raise typer.Exit(1)

    @app.command("bundle")
    def bundle_cmd(
        artifact: Path = typer.Argument(..., help="An .onnx or .tflite artifact."),
        output: Path = typer.Option(..., "--output", "-o", help="Folder to write (created atomically)."),
        force: bool = typer.Option(False, "--force", help="Replace a non-empty --output folder."),
        sizes: Optional[str] = typer.Option(None, "--sizes", help="Dynamic ONNX: sizes to benchmark on the device."),
    ) -> None:
        """Write a self-contained folder to benchmark ARTIFACT on an ARM board or Android phone."""
        from ..io import check_output_path, created_dirs, writing
        from .bundle import write_bundle

        check_output_path(output, artifact, directory=True)
        # A failed bundle leaves no new parent folder; disk full, read-only...: one line naming the folder.
        with created_dirs(output.parent), writing(output):
            path = write_bundle(artifact, output, force=force, sizes=_sizes(sizes))
        out.print(f"bundle: {escape(str(path))}")
        for f in sorted(path.iterdir()):
            out.print(f"  {escape(f.name)}  ({f.stat().st_size / 1e6:.2f} MB)")
        out.print("on the device: pip install -r requirements.txt && python3 edgesr_bench.py --label NAME", soft_wrap=True)
