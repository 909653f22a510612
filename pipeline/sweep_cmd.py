"""The `repa sweep` and `repa report` commands; their work lives in pipeline.sweep and stages.train.report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer


def sweep_command(
    config: Annotated[Path, typer.Argument(help="Sweep file: a train table of shared settings and a sweep table with out, name and grid (see configs/sweep-demo.toml).", metavar="CONFIG.toml")],
    parallel: Annotated[Optional[int], typer.Option(help="Runs trained at once (default: one per GPU, else 1).")] = None,
    gpus: Annotated[str, typer.Option(help="GPU ids to spread runs over, one run per GPU (0,1,...), auto (every visible GPU) or none.")] = "auto",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the planned runs and what each would do; train nothing.")] = False,
):
    """Train every point of a grid of training settings over one cache (resumable: finished runs are skipped)."""
    from pipeline.sweep import launch_sweep, load_sweep, plan_sweep, resolve_gpus

    spec = load_sweep(config)
    runs = plan_sweep(spec)
    if dry_run:
        typer.echo(f"{config}: {len(runs)} runs in {spec.out}")
        for run in runs:
            typer.echo(f"  {run.state:<8} {run.name}  ({run.detail})")
        return
    gpu_ids = resolve_gpus(gpus)
    outcome = launch_sweep(runs, parallel or max(len(gpu_ids), 1), gpu_ids, log=lambda msg: typer.echo(msg, err=True))
    typer.echo(f"sweep {spec.out}: {len(outcome.finished)} trained, {len(outcome.skipped)} already finished, "
               f"{len(outcome.failed)} failed" + (f" ({', '.join(outcome.failed)})" if outcome.failed else "")
               + f"; compare with: repa report {spec.out}")
    if outcome.failed:
        raise typer.Exit(1)


def report_command(
    runs: Annotated[list[Path], typer.Argument(help="Run directories, or a sweep's output directory (stands for the runs in it).", metavar="RUN_DIR...")],
    plot: Annotated[Optional[Path], typer.Option(help="PNG of validation curves and per-t losses (default: report.png in the sweep directory, else here).", metavar="FILE")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON.")] = False,
):
    """Compare runs: final and best validation loss, loss by t, REPA cosine, throughput, FID/IS when evaluated."""
    from stages.train.report import compare_runs, expand_runs, format_table, plot_report

    run_dirs = expand_runs(runs)
    reports, differ = compare_runs(run_dirs)
    if plot is None:
        sweep_dir = len(runs) == 1 and runs[0] not in run_dirs
        plot = runs[0] / "report.png" if sweep_dir else Path("report.png")
    plot_report(reports, plot)
    if as_json:
        typer.echo(json.dumps([r.to_json(differ) for r in reports], indent=1))
    else:
        typer.echo(format_table(reports, differ))
    typer.echo(f"wrote {plot}", err=True)


def register(app: typer.Typer) -> None:
    """Add `sweep` and `report` to the `repa` application."""
    from pipeline.cli import user_errors  # here, not at import: pipeline.cli imports this module

    app.command("sweep")(user_errors(sweep_command))
    app.command("report")(user_errors(report_command))
