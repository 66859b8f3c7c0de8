"""The `edgesr` command: parses flags, calls the pipeline, prints.  No model knowledge here."""

from __future__ import annotations

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

from .errors import EdgeSRError

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
    macs: bool = typer.Option(True, "--macs/--no-macs", help="Measure MACs per input pixel (builds each variant)."),
) -> None:
    """List every model and variant: scales, parameters, MACs per input pixel, size rule."""
    from .models.registry import all_specs
    from .stats import count_macs, count_params

    import torch

    table = Table(title="edgesr models")
    for col in ("model", "variant", "scales", "params (train form)", "MACs / input px (deploy, 64px)", "input range",
                "size rule", "dynamic"):
        table.add_column(col)
    for spec in all_specs():
        for v in spec.variants:
            torch.manual_seed(0)
            model = spec.build(v.name, v.default_scale).eval()
            per_px = "-"
            if macs:
                m = spec.size_rule.multiple_of
                s = -(-max(64, spec.size_rule.min_size) // m) * m
                from .reparam import deploy

                x = torch.rand(1, 3, s, s) * spec.input_range
                per_px = f"{count_macs(deploy(model), x) / (s * s) / 1e3:,.1f}K (x{v.default_scale})"
            table.add_row(spec.name, v.name, ",".join(f"x{s}" for s in v.scales), f"{count_params(model):,}",
                          per_px, f"[0,{spec.input_range:g}]", spec.size_rule.describe(),
                          "yes" if spec.dynamic_shapes else "no")
    out.print(table)


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
) -> None:
    """Export a model to ONNX or TFLite and verify it against the train-form PyTorch model."""
    from .models.registry import get_spec
    from .pipeline import export_model, obtain_model, parse_size, plan_export

    size = parse_size(input_size) if input_size else None
    sample = model is None and weights is None  # the Quickstart: a real, shipped checkpoint
    if sample:
        from .upscale import SAMPLE_WEIGHTS

        weights = SAMPLE_WEIGHTS
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
                          verify=not no_verify, threads=threads, progress=_stage_printer())
    _print_parity_summary(result.report)
    out.print(f"artifact: {escape(str(result.artifact))}")
    out.print(f"report:   {escape(str(result.report_json))}  ({escape(result.report_md.name)})")
    if sample and result.passed is not False:  # show a real result: upscale a shipped photograph
        from .upscale import upscale_sample

        out.print(f"upscaled: {escape(str(upscale_sample(result.artifact)))}")
    if result.passed is False:
        err.print("[red]error:[/] parity FAILED: the artifact does not match PyTorch within the fp32 threshold; "
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
    from .models.checkpoint import save_state_dict
    from .pipeline import deploy_checkpoint, obtain_model

    if output.suffix not in (".safetensors", ".pth", ".pt"):
        raise EdgeSRError(f"output {output} should end in .safetensors, .pth or .pt")
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
    from .runtime.check import check_artifact

    report = check_artifact(artifact, weights=weights, images=images, sizes=sizes, arch=arch, threads=threads,
                            state_key=state_key)
    from .io import atomic_write_text

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
    """Entry point: user errors are one line and exit 2 (parity failures exit 1)."""
    try:
        rc = app(args=argv, standalone_mode=False)
    except typer.Exit as e:
        return e.exit_code
    except EdgeSRError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        return e.exit_code
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        return 130
    except Exception as e:  # usage errors and genuine bugs
        usage_error = getattr(e, "show", None)
        if isinstance(e, typer.TyperException) and callable(usage_error):  # typer's (vendored) click errors
            usage_error()
            return getattr(e, "exit_code", 2)
        if isinstance(e, typer.Abort):
            return 1
        if os.environ.get("EDGESR_DEBUG"):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        err.print(f"[red]internal error:[/] {type(e).__name__}: {escape(first)} (set EDGESR_DEBUG=1 for the traceback)",
                  highlight=False)
        return 3
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
