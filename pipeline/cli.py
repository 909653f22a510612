"""The `repa` command line: one command per stage, plus sweeps, reports and cache, data and encoder tools.

Stage options come from each stage's config declaration (``pipeline.commands``). Stage modules are
imported inside the commands, so `repa --help` imports no torch and `repa train` no encoder code.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from stages.core.errors import UsageError
from stages.encode.config import EncodeConfig
from stages.fetch.config import FetchConfig
from stages.sample.config import EvaluateConfig, SampleConfig
from stages.train.config import TrainConfig

from .commands import config_command
from .errors import is_main_process, run_as_rank, user_errors

app = typer.Typer(
    help="Train diffusion transformers with REPA from an offline feature cache: encode once, train many runs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts contain brackets ([default: ...]) that rich would eat as markup
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
cache_app = typer.Typer(help="Inspect and check a feature cache.", no_args_is_help=True, rich_markup_mode=None)
data_app = typer.Typer(help="Corpora: fetch one from the Hub, pack an image folder, or write the demo's.",
                       no_args_is_help=True, rich_markup_mode=None)
encoders_app = typer.Typer(help="Example encoders.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(cache_app, name="cache")
app.add_typer(data_app, name="data")
app.add_typer(encoders_app, name="encoders")


def _log(msg: str) -> None:
    typer.echo(msg, err=True)


def _stops_at_once(what: str):
    """Stop signals (SIGTERM, SIGINT, SIGUSR1) end a stage that has no step to finish at once, unwinding as
    Ctrl-C does (workers shut down, claims released), with one line: ``what`` was kept and what to do."""
    from stages.core.runtime.stop import DEFAULT_STOP_SIGNALS, StopSignals, parse_signals, signal_name

    return StopSignals(parse_signals(DEFAULT_STOP_SIGNALS),
                       lambda signum: f"{signal_name(signum)}: stopped; {what}" if is_main_process() else "")


# -- the stages -------------------------------------------------------------------------------------
def _encode(cfg: EncodeConfig) -> None:
    from stages.encode.run import run_encode

    with _stops_at_once("committed parts are kept and the parts in progress are redone: rerun the same command "
                        "to continue"):
        summary = run_encode(cfg, log=_log)
    if is_main_process():
        typer.echo("\n".join(summary.lines))


def _train(cfg: TrainConfig) -> None:
    from stages.train.loop import run_train

    result = run_train(cfg, log=_log)
    if is_main_process() and result.final_val:
        typer.echo(f"trained to step {result.steps}; final val denoise {result.final_val['denoise']:.4f}; "
                   f"run in {result.run_dir}")


def _sample(cfg: SampleConfig) -> None:
    from stages.sample.run import run_sample

    with _stops_at_once("the images written so far are kept; rerun the same command with --overwrite to draw "
                        "them all"):
        result = run_sample(cfg, log=_log)
    if is_main_process():
        typer.echo(f"{len(result.images)} images in {result.out}; grid {result.grid}; sidecar {result.sidecar}")


def _evaluate(cfg: EvaluateConfig) -> None:
    from stages.sample.evaluate import run_evaluate

    result = run_evaluate(cfg, log=_log)
    if is_main_process() and isinstance(result, dict):
        typer.echo(json.dumps(result))


config_command(app, "encode", EncodeConfig, _encode, "Stage one: encode a webdataset corpus into a feature cache "
               "(resumable; run under `accelerate launch` for all GPUs).")
config_command(app, "train", TrainConfig, _train, "Stage two: train SiT + REPA from the cache only "
               "(run under `accelerate launch` for several GPUs).")
config_command(app, "sample", SampleConfig, _sample, "Stage three: images from a trained run, with a grid and a "
               "JSON sidecar (run under `accelerate launch` for all GPUs).")
config_command(app, "evaluate", EvaluateConfig, _evaluate, "FID and Inception Score (and CLIP score) of samples "
               "conditioned on the held-out split; appended to RUN_DIR/eval.jsonl.")


@app.command("decode-previews")
@user_errors
def decode_previews(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `repa train --preview-every N`.",
                                            metavar="RUN_DIR")],
    cache: Annotated[Path | None, typer.Option(help="Cache whose manifest names the VAE.", metavar="DIR",
                                               show_default="the one the run trained on")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Decode steps decoded before again.")] = False,
):
    """Decode the preview latents saved during training (RUN_DIR/previews/step-*.pt) into PNG grids."""
    from stages.sample.decode import decode_previews as decode

    if not is_main_process():
        return  # a handful of small grids: one process decodes them
    written = decode(run_dir, cache, overwrite, log=_log)
    typer.echo(f"decoded {len(written)} preview step(s) in {run_dir / 'previews'}")


@app.command("import-checkpoint")
@user_errors
def import_checkpoint(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint saved by the train.py of official REPA, REG, "
                                               "iREPA or RAE (stage 2), or their released weights.",
                                               metavar="CHECKPOINT")],
    run_dir: Annotated[Path, typer.Option(help="New run directory to create.", metavar="DIR")],
    cache: Annotated[Path, typer.Option(help="A cache encoded with the checkpoint's VAE and resolution (names the "
                                        "VAE and latent scaling to sample with; for RAE, holds the --diffuse "
                                        "target).", metavar="DIR")],
    num_heads: Annotated[int | None, typer.Option(help="SiT files: attention heads.",
                                                  show_default="REPA's preset for the width")] = None,
    model: Annotated[str | None, typer.Option(help="RAE files: the DiT-DH preset it was trained as (DiTDH-S, "
                                                 "DiTDH-XL).", show_default="read from the file's shapes")] = None,
    diffuse: Annotated[str | None, typer.Option(help="RAE files: the cache's DINOv2-with-registers target whose "
                                                   "tokens it generates.", metavar="TARGET")] = None,
    diffuse_stats: Annotated[Path | None, typer.Option(help="RAE files: the stat.pt of latent statistics it was "
                                                          "trained with.", metavar="FILE")] = None,
    val_fraction: Annotated[float, typer.Option(help="Held-out share of --cache that `repa evaluate` conditions on "
                                                "and compares with.")] = 0.01,
):
    """Turn an official REPA, REG or iREPA (SiT) checkpoint, or an RAE stage-2 (DiT-DH) one, into a run directory
    that `repa sample` and `repa evaluate` read. The file says which it is (an RAE one holds a DiT-DH's weights)."""
    from stages.sample.import_checkpoint import import_checkpoint as run_import

    path = run_import(checkpoint, run_dir, cache, num_heads=num_heads, model=model, diffuse=diffuse,
                      diffuse_stats=diffuse_stats, val_fraction=val_fraction, log=_log)
    typer.echo(f"run {run_dir} ready ({path.name}); sample it with: repa sample --run-dir {run_dir}")


# -- ablations ----------------------------------------------------------------------------------------
@app.command()
@user_errors
def sweep(
    config: Annotated[Path, typer.Argument(help="Sweep file: a train table of shared settings and a sweep table with "
                                           "out, name and grid (see configs/sweep-demo.toml).", metavar="CONFIG.toml")],
    parallel: Annotated[int | None, typer.Option(help="Runs trained at once.",
                                                 show_default="one per GPU, else 1")] = None,
    gpus: Annotated[str, typer.Option(help="GPU ids to spread runs over, one run per GPU (0,1,...), auto (every "
                                      "visible GPU) or none.")] = "auto",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the planned runs and what each would do; "
                                          "train nothing.")] = False,
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
    outcome = launch_sweep(runs, parallel or max(len(gpu_ids), 1), gpu_ids, log=_log)
    typer.echo(f"sweep {spec.out}: {len(outcome.finished)} trained, {len(outcome.skipped)} already finished, "
               f"{len(outcome.failed)} failed" + (f" ({', '.join(outcome.failed)})" if outcome.failed else "")
               + f"; compare with: repa report {spec.out}")
    if outcome.failed:
        raise typer.Exit(1)


@app.command()
@user_errors
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories, or a sweep's output directory (stands for the "
                                               "runs in it).", metavar="RUN_DIR...")],
    plot: Annotated[Path | None, typer.Option(help="PNG of validation curves, final losses against the settings "
                                              "that differ and per-t losses.", metavar="FILE",
                                              show_default="report.png in the sweep or run directory, else in the "
                                              "runs' common parent")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON.")] = False,
):
    """Compare runs: final and best validation loss, loss by t, REPA cosine, FID/IS when evaluated."""
    from stages.train.report import compare_runs, expand_runs, format_table, plot_report

    run_dirs = expand_runs(runs)
    reports, differ = compare_runs(run_dirs)
    if plot is None:  # beside the runs: a sweep's directory, the one run's, or the runs' common parent
        where = runs[0] if len(runs) == 1 else Path(os.path.commonpath([p.resolve() for p in run_dirs]))
        plot = where / "report.png"
    plot_report(reports, plot, differ)
    if as_json:
        typer.echo(json.dumps([r.to_json(differ) for r in reports], indent=1))
    else:
        typer.echo(format_table(reports, differ))
    _log(f"wrote {plot}")


# -- cache tools ----------------------------------------------------------------------------------
@cache_app.command("info")
@user_errors
def cache_info(cache: Annotated[str, typer.Argument(help="Cache directory or s3://bucket/prefix.", metavar="CACHE")]):
    """Samples, parts, skips by reason, fields, bytes per sample, encoders and fingerprint."""
    from cache_schema import read_manifest
    from cache_schema.operations.info import describe

    typer.echo("\n".join(describe(read_manifest(cache))))


@cache_app.command("verify")
@user_errors
def cache_verify(
    cache: Annotated[Path, typer.Argument(help="Cache directory.", metavar="CACHE")],
    quick: Annotated[bool, typer.Option("--quick", help="Only compare every part's files and sizes with its "
                                        "record and read its small arrays (keys, labels, offsets: crc32c and row "
                                        "counts), not the feature shards.")] = False,
):
    """Check every committed part: files and sizes, crc32c of every chunk, counts, finite values, unique keys.
    Lists every bad part and exits non-zero if there is one."""
    from cache_schema import CacheError, read_manifest
    from cache_schema.operations.verify import find_problems
    from cache_schema.storage.object_store import cache_root, is_s3
    from stages.core.runtime.progress import progress_bar

    if is_s3(cache):
        raise CacheError(f"{cache_root(cache)}: verify reads local caches; verify the local cache before pushing it, "
                         "or a copy")

    manifest = read_manifest(cache)
    seen: set[str] = set()
    with progress_bar(total=len(manifest.parts) * (1 + len(manifest.targets)), unit="part", desc="verify",
              dynamic_ncols=True) as bar:
        def progress(name: str, problem: str | None) -> None:
            if problem:
                bar.write(f"BAD {name}", file=sys.stderr)
            if name not in seen:  # a part is reported again when the key check across parts finds it bad
                seen.add(name)
                bar.set_postfix_str(name, refresh=False)
                bar.update(1)

        problems = find_problems(cache, quick=quick, progress=progress)
    if problems:
        for problem in problems.values():
            _log(f"error: {problem}")
        typer.echo(f"{len(problems)} bad part(s) in {cache}; repair them with the encode command and --repair")
        raise typer.Exit(1)
    typer.echo(f"verified {manifest.num_samples} samples in {cache}" + (" (quick)" if quick else ""))


@cache_app.command("push")
@user_errors
def cache_push(
    cache: Annotated[Path, typer.Argument(help="Local cache directory.", metavar="CACHE")],
    dest: Annotated[str, typer.Argument(help="Where to publish it: s3://bucket/prefix (endpoint: AWS_ENDPOINT_URL).",
                                        metavar="S3_URL")],
    threads: Annotated[int, typer.Option(min=1, help="Parallel uploads.")] = 8,
    max_rate: Annotated[float | None, typer.Option(min=0.001, help="Upload at most this many MiB/s per thread.",
                                                   metavar="MIB_S")] = None,
):
    """Upload a committed cache to S3-compatible object storage; each part's record goes last, with a conditional
    write. Resumable: a rerun skips the parts already there and uploads again those a crash cut short."""
    from cache_schema.writing.push import push_cache
    from stages.core.runtime.progress import progress_bar

    bars: list[Any] = []  # made once the bytes to upload are known (the manifest and the records were checked)

    def progress(total: int, done: int) -> None:
        if not bars:
            bars.append(progress_bar(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="push",
                                     dynamic_ncols=True))
        bars[0].update(done)

    try:
        result = push_cache(cache, dest, threads=threads, progress=progress,
                            max_rate=max_rate * 2**20 if max_rate else None)
    finally:
        for bar in bars:
            bar.close()
    typer.echo(f"pushed {len(result.uploaded)} part(s) ({result.bytes / 2**20:.1f} MiB) to {dest}; "
               f"{len(result.skipped)} already there")


# -- demo data and tiny encoders --------------------------------------------------------------------
@data_app.command("demo")
@user_errors
def data_demo(
    out: Annotated[Path, typer.Option(help="Output folder for the tar shards.", metavar="DIR")] = Path("data/demo"),
    shards: Annotated[int, typer.Option(help="Number of tar shards.")] = 4,
    samples_per_shard: Annotated[int, typer.Option(help="Samples per shard.")] = 256,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same data).")] = 0,
    labels: Annotated[bool, typer.Option("--labels/--no-labels",
                                         help="Also write a class id (cls) per sample.")] = False,
):
    """Write synthetic captioned images (shapes, colours, positions) as CC12M-layout webdataset shards."""
    from stages.demo.data import write_demo_shards

    paths = write_demo_shards(out, num_shards=shards, samples_per_shard=samples_per_shard, seed=seed, labels=labels)
    typer.echo(f"wrote {len(paths)} shards x {samples_per_shard} samples to {out}")


@data_app.command("pack")
@user_errors
def data_pack(
    src: Annotated[Path, typer.Argument(help="Image-folder tree (one folder per class, e.g. ILSVRC2012 train/), or "
                                             "with --labels a flat folder of images (ILSVRC2012 val/).",
                                        metavar="SRC")],
    out: Annotated[Path, typer.Option(help="Output folder for the tar shards.", metavar="DIR")],
    shard_size: Annotated[int, typer.Option(help="Samples per shard.", min=1)] = 1000,
    prefix: Annotated[str | None, typer.Option(help="Shard name prefix: PREFIX-000000.tar, ...",
                                               show_default="SRC's folder name")] = None,
    labels: Annotated[Path | None, typer.Option(
        help="For a flat folder: `NAME CLASS` per line (CLASS a number, or a class folder name of --classes).",
        metavar="FILE")] = None,
    classes: Annotated[Path | None, typer.Option(
        help="Image-folder tree whose sorted folder names number the class names in --labels (e.g. train/).",
        metavar="DIR")] = None,
    workers: Annotated[int, typer.Option(help="Shards written at once.", min=1)] = 4,
):
    """Pack an image folder into webdataset shards with `cls` labels (sorted-folder order, as ImageFolder and
    REPA number them), original image bytes kept; rerun the same command to finish an interrupted pack."""
    from stages.fetch.pack import pack_folder

    s = pack_folder(src, out, shard_size, prefix, labels, classes, workers, log=_log)
    skipped = f"; skipped {len(s.skipped)} other files" if s.skipped else ""
    typer.echo(f"packed {s.samples} images of {s.classes} classes into {s.shards} shards ({s.written} written now, "
               f"{s.shards - s.written} already there){skipped}")
    typer.echo(f"encode them with: repa encode --source '{s.pattern}' ...")


def _fetch(cfg: FetchConfig) -> None:
    from stages.fetch.run import run_fetch

    typer.echo("\n".join(run_fetch(cfg, log=_log).lines))


config_command(data_app, "fetch", FetchConfig, _fetch, "Download a webdataset corpus from the Hugging Face Hub "
               "(parallel, resumable, sizes and sha256 checked) and print the encode command for it.")


@encoders_app.command("tiny")
@user_errors
def encoders_tiny(
    out: Annotated[Path, typer.Option(help="Output folder; one sub-folder per model.",
                                      metavar="DIR")] = Path("models/tiny"),
    seed: Annotated[int, typer.Option(help="Random seed for the weights.")] = 0,
):
    """Write tiny random-init models of the real encoder classes (save_pretrained), for offline runs and tests."""
    from stages.demo.tiny_encoders import write_tiny_encoders

    for name, path in write_tiny_encoders(out, seed=seed).items():
        typer.echo(f"{name:<10} {path}")


@encoders_app.command("fit-vae")
@user_errors
def encoders_fit_vae(
    source: Annotated[str, typer.Option(help="Demo shards to fit on (brace pattern).", metavar="PATTERN")],
    vae: Annotated[Path, typer.Option(help="VAE folder written by `repa encoders tiny` (vae-demo); rewritten in "
                                      "place.", metavar="DIR")] = Path("models/tiny/vae-demo"),
    resolution: Annotated[int, typer.Option(help="Crop size, as the cache will be encoded.")] = 64,
    steps: Annotated[int, typer.Option(help="Fitting steps after the block-colour start (0: the start only).")] = 20,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 16,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same weights).")] = 0,
):
    """Fit the demo's tiny VAE to the demo images (a block-colour autoencoder, then a short fit), so that the
    demo's samples decode to coloured shapes."""
    from stages.demo.fit_vae import fit_demo_vae

    losses = _fit_demo_model("VAE", "--vae", vae, steps, "mse", lambda progress: fit_demo_vae(
        vae, source, resolution, steps, batch_size, seed=seed, progress=progress))
    typer.echo(f"fitted {vae}" + (f": reconstruction MSE {losses[-1]:.4f}" if losses else ""))


def _fit_demo_model(what: str, option: str, folder: Path, steps: int, loss_name: str, fit,
                    fitted: str | None = None) -> list[float]:
    """``fit(progress)`` of a tiny demo model in ``folder`` (``fitted``: what is fitted, if not that model), with a
    progress bar showing its loss."""
    from stages.core.runtime.progress import progress_bar

    if not (folder / "config.json").is_file():
        raise UsageError(f"{option} {folder}: no {what} there; write it first with `repa encoders tiny`")
    with progress_bar(total=steps, unit="step", desc=f"fit {fitted or what}", dynamic_ncols=True) as bar:
        def progress(step: int, loss: float) -> None:
            bar.set_postfix({loss_name: f"{loss:.4f}"}, refresh=False)
            bar.update(1)

        return fit(progress)


@encoders_app.command("fit-dino")
@user_errors
def encoders_fit_dino(
    source: Annotated[str, typer.Option(help="Demo shards to fit on (brace pattern).", metavar="PATTERN")],
    dino: Annotated[Path, typer.Option(help="DINOv2 folder written by `repa encoders tiny` (dino); rewritten in "
                                       "place.", metavar="DIR")] = Path("models/tiny/dino"),
    resolution: Annotated[int, typer.Option(help="Crop size, as the cache will be encoded.")] = 64,
    steps: Annotated[int, typer.Option(help="Fitting steps.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same weights).")] = 0,
):
    """Fit the demo's tiny DINOv2 to the demo images (its tokens then tell each patch's shape, colour, size and
    position, as the generator drew them), so that REPA has something to align to."""
    from stages.demo.fit_dino import fit_demo_dino

    losses = _fit_demo_model("DINOv2", "--dino", dino, steps, "loss", lambda progress: fit_demo_dino(
        dino, source, resolution, steps, batch_size, seed=seed, progress=progress))
    typer.echo(f"fitted {dino}" + (f": loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""))


@encoders_app.command("fit-rae-decoder")
@user_errors
def encoders_fit_rae_decoder(
    source: Annotated[str, typer.Option(help="Demo shards to fit on (brace pattern).", metavar="PATTERN")],
    dino: Annotated[Path, typer.Option(help="The DINOv2 (with registers) whose tokens it decodes, as `repa encode "
                                       "--add-target` reads them.", metavar="DIR")] = Path("models/tiny/dino-reg"),
    out: Annotated[Path, typer.Option(help="Folder to write model.pt and config.json to.", metavar="DIR")] = Path(
        "models/tiny/rae-decoder"),
    resolution: Annotated[int, typer.Option(help="Crop size, as the cache is encoded.")] = 64,
    steps: Annotated[int, typer.Option(help="Fitting steps.")] = 400,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 32,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same weights).")] = 0,
):
    """Fit a tiny RAE decoder to the demo images (tokens of --dino in, pixels out), so that samples of a run
    trained with --diffuse on the demo cache decode to shapes."""
    from stages.demo.fit_rae_decoder import fit_demo_rae_decoder

    losses = _fit_demo_model("DINOv2", "--dino", dino, steps, "mse", lambda progress: fit_demo_rae_decoder(
        out, dino, source, resolution, steps, batch_size, seed=seed, progress=progress), fitted="RAE decoder")
    typer.echo(f"fitted {out}" + (f": MSE {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""))


def main() -> None:
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank started by torchrun / accelerate launch
        from stages.core.runtime.processes import exit_when_gone

        exit_when_gone(os.getppid(), code=1)  # the launcher was killed: do not live on without it
    if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):  # one of several ranks, however launched
        run_as_rank(_rank_main)  # first, so that its exit comes after every atexit handler registered later
    else:
        app(prog_name="repa")


def _rank_main() -> None:
    # torch.distributed.nn binds `group=group.WORLD` as default arguments when it is imported. Imported
    # after the process group starts (torch.compile, transformers and diffusers all import it), those
    # defaults keep the group alive past destroy_process_group, its gloo threads running until the end;
    # a rank that finished its work could die with SIGABRT as the interpreter tore them down.
    import torch.distributed.nn  # noqa: F401

    app(prog_name="repa")


if __name__ == "__main__":
    main()
