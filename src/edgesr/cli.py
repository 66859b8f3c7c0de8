"""The `edgesr` command: parses flags, calls the pipeline, prints.  No model knowledge here."""

from __future__ import annotations

import errno
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# typer vendors click and raises these (it re-exports none of them); usage errors become one line.
from typer._click.exceptions import ClickException, NoArgsIsHelpError

from .errors import EdgeSRError, Interrupted

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Export efficient super-resolution networks to ONNX and TFLite with verified parity.",
)
# In logs and pipes rich would squeeze tables to 80 columns; give them room instead.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)


class Format(str, Enum):
    onnx = "onnx"
    tflite = "tflite"


def _stage_printer():
    def show(stage: str, seconds: float) -> None:
        err.print(f"[green]✓[/] {stage} [dim]({seconds:.1f} s)[/]")

    return show


@app.command("models")
def models_cmd(
    measure: bool = typer.Option(False, "--measure", help="Build every variant and count params/MACs now "
                                 "(about a minute) instead of reading the stored figures."),
) -> None:
    """List every model and variant: scales, parameters, MACs per input pixel, size rule."""
    from .catalog import figure_key, measure as measure_figures, stored_figures
    from .models.registry import all_specs

    stored = {} if measure else stored_figures()
    table = Table(title="edgesr models")
    for col in ("model", "variant", "scales", "params (train form)", "MACs / input px (deploy)", "input range",
                "size rule", "dynamic"):
        table.add_column(col)
    missing = 0
    for spec in all_specs():
        for v in spec.variants:
            fig = measure_figures(spec, v.name) if measure else stored.get(figure_key(spec.name, v.name))
            missing += fig is None
            params = f"{fig['params']:,}" if fig else "-"
            per_px = f"{fig['macs_per_px'] / 1e3:,.1f}K (x{fig['scale']})" if fig else "-"
            table.add_row(spec.name, v.name, ",".join(f"x{s}" for s in v.scales), params, per_px,
                          f"[0,{spec.input_range:g}]", spec.size_rule.describe(), "yes" if spec.dynamic_shapes else "no")
    out.print(table)
    if missing:
        err.print(f"[yellow]note:[/] {missing} variant(s) have no stored figures; `edgesr models --measure` counts them")


@app.command("export")
def export_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model name (see `edgesr models`)."),
    fmt: Format = typer.Option(..., "--format", "-f", help="Artifact format."),
    variant: Optional[str] = typer.Option(None, "--variant", help="Variant (default: the model's default)."),
    scale: Optional[int] = typer.Option(None, "--scale", help="Upscaling factor."),
    weights: Optional[Path] = typer.Option(None, "--weights", "-w", help="Checkpoint (.pth/.pt/.safetensors); architecture is detected."),
    state_key: Optional[str] = typer.Option(None, "--state-key", help="Checkpoint wrapper to read: params or params_ema (default: what the official inference script reads)."),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="HxW of the exported input (default 256x256)."),
    dynamic: bool = typer.Option(False, "--dynamic", help="ONNX only: symbolic H/W (multiples of the size rule)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Artifact path (default edgesr-out/...)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the parity check against PyTorch."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Runtime threads for verification."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16 or int8 (ONNX; fp32 I/O kept)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="int8: folder of real images (default: the shipped photos)."),
    max_psnr_drop: Optional[float] = typer.Option(None, "--max-psnr-drop", help="int8: allowed Y-PSNR loss in dB (default 0.15); layers stay float until met."),
    int8_io: bool = typer.Option(False, "--int8-io", help="int8 only: uint8 input/output tensors (the 8-bit image, "
                                 "scale 1/255, zero point 0; recorded in metadata) for NPUs and integer pipelines."),
) -> None:
    """Export a model to ONNX or TFLite and verify it against the train-form PyTorch model."""
    from .io import refuse_output_overlapping_inputs
    from .models.registry import get_spec
    from .pipeline import export_model, export_outputs, obtain_model, parse_size, plan_export
    from .runtime.runners import check_threads

    size = parse_size(input_size) if input_size else None
    check_threads(threads)
    sample = model is None and weights is None  # the Quickstart: a real, shipped checkpoint
    if sample:
        from .upscale import SAMPLE_WEIGHTS

        weights = SAMPLE_WEIGHTS
    if output is not None:
        for path in export_outputs(output):
            refuse_output_overlapping_inputs(path, weights)
    from .export.precision import check_request

    check_request(fmt.value, precision, calibration, max_psnr_drop)
    from .export.int8_io import check_int8_io

    check_int8_io(precision, int8_io)
    if model is not None:  # validate flags before loading anything (the checkpoint is checked on load)
        plan_export(get_spec(model), fmt.value, size, dynamic, output, variant, scale)
    t = time.perf_counter()
    loaded = obtain_model(model, variant, scale, weights, state_key=state_key)
    _stage_printer()("load", time.perf_counter() - t)
    if loaded.random_init:
        err.print(f"[yellow]warning:[/] no --weights given: exporting {loaded.spec.name} {loaded.variant} "
                  f"x{loaded.scale} with seeded random weights (fine for latency work, useless for images)")
    else:
        err.print(f"[dim]weights: {escape(str(loaded.source))}[/]")
    result = export_model(loaded, fmt.value, size=size, dynamic=dynamic, output=output,
                          verify=not no_verify, threads=threads, progress=_stage_printer(),
                          precision=precision, calibration=calibration, max_psnr_drop=max_psnr_drop,
                          int8_io=int8_io)
    _print_parity_summary(result.report)
    out.print(f"artifact: {escape(str(result.artifact))}")
    out.print(f"report:   {escape(str(result.report_json))}  ({escape(result.report_md.name)})")
    if sample and result.passed is not False:  # show a real result: upscale a shipped photograph
        from .upscale import upscale_sample

        out.print(f"upscaled: {escape(str(upscale_sample(result.artifact)))}")
    if result.passed is False:
        err.print("[red]error:[/] parity FAILED: the artifact does not match PyTorch within the "
                  f"{precision} threshold; "
                  "it is kept for inspection and marked failed in its report and metadata")
        raise typer.Exit(1)


def _print_parity_summary(report: dict) -> None:
    parity = report.get("parity")
    if not parity:
        err.print("[yellow]warning:[/] not verified (--no-verify)")
        return
    colour = "green" if report["passed"] else "red"
    err.print(f"parity [{colour}]{escape(parity['summary'])}[/]", highlight=False)


@app.command("reparam")
def reparam_cmd(
    weights: Path = typer.Option(..., "--weights", "-w", help="Train-form checkpoint."),
    state_key: Optional[str] = typer.Option(None, "--state-key", help="Checkpoint wrapper to read: params or params_ema (default: what the official inference script reads)."),
    output: Path = typer.Option(..., "--output", "-o", help="Deploy-form checkpoint (.safetensors or .pth)."),
    model: Optional[str] = typer.Option(None, "--model", "-m"),
    variant: Optional[str] = typer.Option(None, "--variant"),
    scale: Optional[int] = typer.Option(None, "--scale"),
) -> None:
    """Fold a train-form checkpoint into its deploy form and write the folded weights."""
    from .io import check_output_path
    from .models.checkpoint import save_state_dict
    from .pipeline import deploy_checkpoint, obtain_model

    if output.suffix not in (".safetensors", ".pth", ".pt"):
        raise EdgeSRError(f"output {output} should end in .safetensors, .pth or .pt")
    check_output_path(output, weights)
    loaded = obtain_model(model, variant, scale, weights, state_key=state_key)
    sd, report, reloadable = deploy_checkpoint(loaded)
    save_state_dict(sd, output)
    if not reloadable:
        err.print(f"[yellow]warning:[/] {loaded.spec.name} has no deploy checkpoint layout: the file holds the "
                  "folded module tree's weights; `edgesr export --weights` needs the train checkpoint")
    out.print(f"{loaded.spec.name} {loaded.variant} x{loaded.scale}: params {report.params_before:,} -> "
              f"{report.params_after:,}, MACs {report.macs_before / 1e9:.3f}G -> {report.macs_after / 1e9:.3f}G "
              f"on {report.probe_shape}, max-abs deviation {report.max_abs:.2e}")
    out.print(f"wrote {escape(str(output))}")


@app.command("parity")
def parity_cmd(
    artifact: Path = typer.Argument(..., help="An .onnx or .tflite file written by `edgesr export`."),
    weights: Optional[Path] = typer.Option(None, "--weights", "-w", help="The checkpoint it was exported from."),
    state_key: Optional[str] = typer.Option(None, "--state-key", help="Checkpoint wrapper to read: params or params_ema (default: what the official inference script reads)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Directory of real images (default: shipped photos)."),
    sizes: Optional[List[str]] = typer.Option(None, "--sizes", help="HxW sizes (dynamic ONNX only; default: the artifact's size)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the parity report as JSON."),
    md_out: Optional[Path] = typer.Option(None, "--markdown", help="Write the parity report as Markdown."),
    arch: str = typer.Option("x86_64", "--arch", help="x86_64 (this machine) or aarch64 (qemu-user emulation)."),
    threads: Optional[int] = typer.Option(None, "--threads"),
) -> None:
    """Compare an artifact against the train-form PyTorch model (rebuilt from its metadata)."""
    from .io import atomic_write_text, check_outputs
    from .runtime.check import check_artifact
    from .runtime.runners import check_threads

    check_threads(threads)
    check_outputs([json_out, md_out], artifact, weights, images)
    report = check_artifact(artifact, weights=weights, images=images, sizes=sizes, arch=arch, threads=threads,
                            state_key=state_key)

    if json_out:
        atomic_write_text(json_out, report.to_json() + "\n")
    if md_out:
        atomic_write_text(md_out, report.to_markdown())
    out.print(report.to_markdown())
    if not report.passed:
        err.print("[red]error:[/] parity FAILED")
        raise typer.Exit(1)


def _register_plugins() -> None:
    # Commands that live beside their subsystem register themselves here.
    from .bench.commands import register as register_bench
    from .upscale import register as register_upscale
    from .quality.commands import register as register_quality

    register_bench(app)
    register_upscale(app)
    register_quality(app)


_register_plugins()


def main(argv: list[str] | None = None) -> int:
    """Entry point.  The error contract (README "Exit codes"): every failure is one line.

    0 success; 1 parity failed; 2 bad input, usage error or the environment refused a
    write (disk full, read-only, permission); 3 internal error (a bug: set EDGESR_DEBUG=1);
    130/143 interrupted by SIGINT/SIGTERM, after removing temp files.
    """
    received: list[Interrupted] = []
    previous = _raise_on_termination_signals(received)
    try:
        rc = app(args=argv, standalone_mode=False, prog_name="edgesr")  # also under python -m / pytest
        if received:  # typer turns the KeyboardInterrupt into a plain return code 130
            return _interrupted(received[0])
    except KeyboardInterrupt as e:
        return _interrupted(received[0] if received else e)
    except Exception as e:
        if received:  # an error while unwinding from the signal (a cleanup step): still the interruption
            return _interrupted(received[0])
        return _report(e)
    finally:
        _restore_signals(previous)
    return rc if isinstance(rc, int) else 0


def _report(e: Exception) -> int:
    """Print ``e`` as the contract's one line and return its exit code."""
    if isinstance(e, typer.Exit):
        return e.exit_code
    if isinstance(e, EdgeSRError):
        return _fail(str(e), e.exit_code)
    if isinstance(e, OSError):  # the environment refused a file operation outside the io.py boundary
        if e.errno not in _ENVIRONMENT_ERRNOS or os.environ.get("EDGESR_DEBUG"):
            return _internal_error(e)
        return _fail(f"{e.filename or 'file operation'}: {e.strerror}", 2)
    if isinstance(e, NoArgsIsHelpError):
        e.show()  # bare `edgesr` (or a group without a command): the help text is the answer
        return getattr(e, "exit_code", 2)
    if isinstance(e, ClickException):  # unknown option/command/choice, missing value
        return _fail(_usage_line(e), getattr(e, "exit_code", 2))
    if isinstance(e, typer.Abort):
        return 1
    return _internal_error(e)  # a bug


# Errors of the machine, not of edgesr: exit 2 with the path and the reason.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR,
                       errno.ENOTDIR, errno.ENOENT, errno.EEXIST, errno.ENAMETOOLONG, errno.EMFILE, errno.EFBIG}


def _fail(message: str, code: int) -> int:
    err.print(f"[red]error:[/] {escape(message)}", highlight=False)
    return code


def _interrupted(e: KeyboardInterrupt) -> int:
    name = e.signal_name if isinstance(e, Interrupted) else "SIGINT"
    err.print(f"[red]interrupted[/] ({name}): stopped; temporary files removed", highlight=False)
    return e.exit_code if isinstance(e, Interrupted) else 130


def _usage_line(e: ClickException) -> str:
    """Click's usage box as one line, pointing at the command's --help."""
    ctx = getattr(e, "ctx", None)
    command = ctx.command_path if ctx is not None else "edgesr"
    message = " ".join(e.format_message().split())
    return f"{message} (see `{command} --help`)"


def _internal_error(e: BaseException) -> int:
    if os.environ.get("EDGESR_DEBUG"):
        raise e
    first = (str(e).strip().splitlines() or [""])[0][:300]
    err.print(f"[red]internal error:[/] {type(e).__name__}: {escape(first)} (set EDGESR_DEBUG=1 for the traceback)",
              highlight=False)
    return 3


def _raise_on_termination_signals(received: list) -> dict:
    """SIGTERM and SIGINT unwind the stack (finally blocks remove temp folders), as Ctrl-C does.

    Each signal is also appended to ``received``: typer swallows the exception into exit code 130.
    """
    import signal

    def interrupt(signum, frame):
        received.append(Interrupted(signum, signal.Signals(signum).name))
        raise received[-1]

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, interrupt)
        except ValueError:  # not the main thread (e.g. called from a worker): leave signals alone
            pass
    return previous


def _restore_signals(previous: dict) -> None:
    import signal

    for sig, handler in previous.items():
        signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
