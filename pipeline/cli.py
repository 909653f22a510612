"""The `repa` command line: one sub-command per stage, plus cache, data and encoder tools.

Stage modules are imported inside their commands, so `repa train` never imports encoder code.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cache_schema import UsageError

app = typer.Typer(
    help="Train diffusion transformers with REPA from an offline feature cache: encode once, train many runs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
cache_app = typer.Typer(help="Inspect and check a feature cache.", no_args_is_help=True)
data_app = typer.Typer(help="Example data.", no_args_is_help=True)
encoders_app = typer.Typer(help="Example encoders.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
app.add_typer(data_app, name="data")
app.add_typer(encoders_app, name="encoders")

ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", help="TOML preset (see configs/); options given on the command line override it.", metavar="FILE"),
]


def user_errors(fn):
    """Turn expected failures into `error: <one line>` and exit status 2; tear down process groups."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UsageError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: committed parts and checkpoints are kept; rerun the same command to resume", err=True)
            raise typer.Exit(130) from None
        finally:
            _teardown_distributed()

    return wrapper


def _teardown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _none(value: Optional[str]) -> Optional[str]:
    return None if value is None or value.lower() in ("", "none") else value


# -- encode ---------------------------------------------------------------------------------------
def _encode_defaults():
    from stages.encode.config import EncodeConfig

    return EncodeConfig()


_E = _encode_defaults()


@app.command()
@user_errors
def encode(
    ctx: typer.Context,
    config: ConfigOpt = None,
    source: Annotated[str, typer.Option(help="Webdataset shards: path, brace pattern (data/cc12m-train-{0000..2175}.tar), glob or pipe: URL.", metavar="PATTERN")] = _E.source,
    cache: Annotated[Path, typer.Option(help="Output cache directory.", metavar="DIR")] = _E.cache,
    resolution: Annotated[int, typer.Option(help="Centre-crop size in pixels (multiple of 16).")] = _E.resolution,
    vae: Annotated[str, typer.Option(help="AutoencoderKL: Hub id or local folder.", metavar="ID|DIR")] = _E.vae,
    vae_subfolder: Annotated[Optional[str], typer.Option(help="Subfolder of --vae holding the VAE (e.g. vae for FLUX.1).")] = _E.vae_subfolder,
    dino: Annotated[str, typer.Option(help="DINOv2 model: Hub id or local folder (-small/-base/-large/-giant, -with-registers).", metavar="ID|DIR")] = _E.dino,
    text_encoder: Annotated[Optional[str], typer.Option(help="T5 encoder or CLIP text model (Hub id or folder), or none.", metavar="ID|DIR|none")] = _E.text_encoder,
    text_subfolder: Annotated[Optional[str], typer.Option(help="Subfolder of --text-encoder (e.g. text_encoder_2); the tokenizer is read from the matching tokenizer folder.")] = _E.text_subfolder,
    max_text_tokens: Annotated[int, typer.Option(help="Truncate captions to this many tokens.")] = _E.max_text_tokens,
    batch_size: Annotated[int, typer.Option(help="Images per encoder batch.")] = _E.batch_size,
    num_workers: Annotated[Optional[int], typer.Option(help="Decode processes per GPU process [default: CPU cores / processes].")] = _E.num_workers,
    dtype: Annotated[str, typer.Option(help="Encoder precision: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32.")] = _E.dtype,
    feature_codec: Annotated[str, typer.Option(help="Storage of DINOv2 and caption features: fp16, or int8 with a per-token scale (half the bytes).")] = _E.feature_codec,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the VAE and DINOv2.")] = _E.compile,
    max_samples: Annotated[Optional[int], typer.Option(help="Stop after this many samples (trial runs).")] = _E.max_samples,
    max_pixels: Annotated[int, typer.Option(help="Skip images with more pixels than this.")] = _E.max_pixels,
    jpeg_draft: Annotated[bool, typer.Option("--jpeg-draft/--no-jpeg-draft", help="Decode large JPEGs at reduced DCT scale (about 2x faster; part of the fingerprint).")] = _E.jpeg_draft,
    shard_size: Annotated[int, typer.Option(help="Samples per zarr shard file.")] = _E.shard_size,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete what the cache holds and start over.")] = _E.overwrite,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be encoded and the estimated cache size; load no model.")] = _E.dry_run,
):
    """Stage one: encode a webdataset corpus into a feature cache (resumable; run under `accelerate launch` for all GPUs)."""
    from pipeline.config import from_context
    from stages.encode.config import EncodeConfig
    from stages.encode.run import run_encode

    values = dict(locals())
    values["text_encoder"] = _none(text_encoder)
    cfg = from_context(EncodeConfig, ctx, values, config, "encode")
    cfg.text_encoder = _none(cfg.text_encoder)
    summary = run_encode(cfg, log=lambda msg: typer.echo(msg, err=True))
    if _is_main():
        typer.echo("\n".join(summary.lines))


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


# -- train ----------------------------------------------------------------------------------------
def _train_defaults():
    from stages.train.config import TrainConfig

    return TrainConfig()


_T = _train_defaults()


@app.command()
@user_errors
def train(
    ctx: typer.Context,
    config: ConfigOpt = None,
    cache: Annotated[Path, typer.Option(help="Feature cache written by `repa encode` (read-only).", metavar="DIR")] = _T.cache,
    run_dir: Annotated[Path, typer.Option(help="Run directory: checkpoints, metrics.jsonl, curves.png, tensorboard logs.", metavar="DIR")] = _T.run_dir,
    model: Annotated[Optional[str], typer.Option(help="Preset: SiT-B/2, SiT-L/2, SiT-XL/2 (and /4, /8), or none to use --width/--depth.")] = _T.model,
    width: Annotated[Optional[int], typer.Option(help="Hidden size (128-2048); overrides the preset.")] = _T.width,
    depth: Annotated[Optional[int], typer.Option(help="Number of blocks; overrides the preset.")] = _T.depth,
    head_dim: Annotated[Optional[int], typer.Option(help="Channels per attention head; overrides the preset's heads.")] = _T.head_dim,
    patch_size: Annotated[Optional[int], typer.Option(help="Latent pixels per token side; overrides the preset.")] = _T.patch_size,
    cond: Annotated[str, typer.Option(help="Conditioning: auto (text if the cache has captions, else class if labelled, else none), class, text, none.")] = _T.cond,
    num_classes: Annotated[Optional[int], typer.Option(help="Classes for --cond class [default: max label + 1].")] = _T.num_classes,
    time_sampling: Annotated[str, typer.Option(help="t distribution: uniform or logit-normal.")] = _T.time_sampling,
    repa_lambda: Annotated[float, typer.Option(help="Weight of the REPA loss; 0 disables REPA and the projector.")] = _T.repa_lambda,
    align_layer: Annotated[Optional[int], typer.Option(help="1-based block whose output is aligned to DINOv2 [default: preset's, 8 for L/XL, 4 for B].")] = _T.align_layer,
    projector_dim: Annotated[int, typer.Option(help="Hidden size of the REPA projector MLP.")] = _T.projector_dim,
    cond_dropout: Annotated[float, typer.Option(help="Probability of dropping the label/caption to the null one (for CFG).")] = _T.cond_dropout,
    batch_size: Annotated[int, typer.Option(help="Global batch size (all processes and accumulation steps).")] = _T.batch_size,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = _T.grad_accum,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = _T.lr,
    lr_schedule: Annotated[str, typer.Option(help="constant, or cosine decay to 0 after warmup.")] = _T.lr_schedule,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps.")] = _T.warmup_steps,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = _T.weight_decay,
    grad_clip: Annotated[float, typer.Option(help="Clip the gradient norm to this (0: off).")] = _T.grad_clip,
    ema_decay: Annotated[float, typer.Option(help="EMA decay, updated every step.")] = _T.ema_decay,
    mixed_precision: Annotated[str, typer.Option(help="auto (bf16 on GPU, off on CPU), bf16, fp16, no.")] = _T.mixed_precision,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the model.")] = _T.compile,
    steps: Annotated[int, typer.Option(help="Optimizer steps to train for.")] = _T.steps,
    seed: Annotated[int, typer.Option(help="Seed for weights, data order and noise.")] = _T.seed,
    val_fraction: Annotated[float, typer.Option(help="Share of the cache held out for validation (chosen by key hash).")] = _T.val_fraction,
    max_val_samples: Annotated[int, typer.Option(help="Held-out samples evaluated per validation.")] = _T.max_val_samples,
    num_workers: Annotated[int, typer.Option(help="DataLoader workers per process.")] = _T.num_workers,
    log_every: Annotated[int, typer.Option(help="Steps between logged training metrics.")] = _T.log_every,
    val_every: Annotated[int, typer.Option(help="Steps between validations (and curves.png).")] = _T.val_every,
    ckpt_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = _T.ckpt_every,
    keep_checkpoints: Annotated[int, typer.Option(help="Checkpoints to keep (0: all).")] = _T.keep_checkpoints,
    preview_every: Annotated[int, typer.Option(help="Steps between saved preview latents (decode with `repa sample --decode-latents`; 0: off).")] = _T.preview_every,
    report_to: Annotated[str, typer.Option(help="tensorboard, wandb or none (metrics.jsonl is always written).")] = _T.report_to,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --run-dir.")] = _T.resume,
    resume_from: Annotated[Optional[Path], typer.Option(help="Continue from this checkpoint file.", metavar="FILE")] = _T.resume_from,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete an existing --run-dir first.")] = _T.overwrite,
):
    """Stage two: train SiT + REPA from the cache only (run under `accelerate launch` for several GPUs)."""
    from pipeline.config import from_context
    from stages.train.config import TrainConfig
    from stages.train.loop import run_train

    values = dict(locals())
    values["model"] = _none(model)
    cfg = from_context(TrainConfig, ctx, values, config, "train")
    cfg.model = _none(cfg.model)
    result = run_train(cfg, log=lambda msg: typer.echo(msg, err=True))
    if _is_main() and result.final_val:
        typer.echo(f"trained to step {result.steps}; final val denoise {result.final_val['denoise']:.4f}; run in {result.run_dir}")


# -- cache tools ----------------------------------------------------------------------------------
@cache_app.command("info")
@user_errors
def cache_info(cache: Annotated[Path, typer.Argument(help="Cache directory.", metavar="CACHE")]):
    """Samples, parts, skips by reason, fields, bytes per sample, encoders and fingerprint."""
    from cache_schema import read_manifest
    from cache_schema.info import describe

    typer.echo("\n".join(describe(read_manifest(cache))))


@cache_app.command("verify")
@user_errors
def cache_verify(cache: Annotated[Path, typer.Argument(help="Cache directory.", metavar="CACHE")]):
    """Re-read every committed part: counts, finite values, unique keys. Exits non-zero at the first bad part."""
    from cache_schema import verify_cache

    n = verify_cache(cache, progress=lambda name: typer.echo(f"ok  {name}", err=True))
    typer.echo(f"verified {n} samples in {cache}")


# -- demo data and tiny encoders --------------------------------------------------------------------
@data_app.command("demo")
@user_errors
def data_demo(
    out: Annotated[Path, typer.Option(help="Output folder for the tar shards.", metavar="DIR")] = Path("data/demo"),
    shards: Annotated[int, typer.Option(help="Number of tar shards.")] = 4,
    samples_per_shard: Annotated[int, typer.Option(help="Samples per shard.")] = 256,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same data).")] = 0,
    labels: Annotated[bool, typer.Option("--labels/--no-labels", help="Also write a class id (cls) per sample.")] = False,
):
    """Write synthetic captioned images (shapes, colours, positions) as CC12M-layout webdataset shards."""
    from stages.encode.demo_data import write_demo_shards

    paths = write_demo_shards(out, num_shards=shards, samples_per_shard=samples_per_shard, seed=seed, labels=labels)
    typer.echo(f"wrote {len(paths)} shards x {samples_per_shard} samples to {out}")


@encoders_app.command("tiny")
@user_errors
def encoders_tiny(
    out: Annotated[Path, typer.Option(help="Output folder; one sub-folder per model.", metavar="DIR")] = Path("models/tiny"),
    seed: Annotated[int, typer.Option(help="Random seed for the weights.")] = 0,
):
    """Write tiny random-init models of the real encoder classes (save_pretrained), for offline runs and tests."""
    from stages.encoders.tiny import write_tiny_encoders

    for name, path in write_tiny_encoders(out, seed=seed).items():
        typer.echo(f"{name:<10} {path}")


from pipeline.sweep_cmd import register as _register_sweep; _register_sweep(app)


from pipeline.sample_cmd import register as _register_sample; _register_sample(app)
def main() -> None:
    app(prog_name="repa")


if __name__ == "__main__":
    sys.exit(main())
