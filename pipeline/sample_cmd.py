"""`repa sample` and `repa evaluate`, added to the app by ``register``.

Only the config dataclasses are imported here; the stage modules (which load the VAE, the text
encoder and the metrics) are imported inside the commands, so `repa train` never imports them.
"""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from stages.sample.config import EvaluateConfig, SampleConfig

_S = SampleConfig()
_E = EvaluateConfig()

# -- options both commands share (typer reads them from each command's signature) -------------------
RunDirOpt = Annotated[Path, typer.Option(help="Run directory written by `repa train`.", metavar="DIR")]
CheckpointOpt = Annotated[Optional[Path], typer.Option(help="Checkpoint file (default: the newest in RUN_DIR/checkpoints).", metavar="FILE")]
CacheOpt = Annotated[Optional[Path], typer.Option(help="Cache whose manifest names the VAE and text encoder (default: the one the run trained on).", metavar="DIR")]
EmaOpt = Annotated[bool, typer.Option("--ema/--no-ema", help="Use the EMA weights (--no-ema: the raw weights).")]
SamplerOpt = Annotated[str, typer.Option(help="euler or heun (ODE), sde (Euler-Maruyama, as REPA's paper numbers).")]
StepsOpt = Annotated[Optional[int], typer.Option(help="Sampling steps (default: 50 for euler/heun, 250 for sde).")]
SeedOpt = Annotated[int, typer.Option(help="Image i starts from noise seeded with (seed, i).")]
CfgOpt = Annotated[float, typer.Option(help="Classifier-free guidance scale (1: none).")]
LowOpt = Annotated[float, typer.Option(help="Guidance only for t >= this (t = 1 is noise, 0 is data).")]
HighOpt = Annotated[float, typer.Option(help="Guidance only for t <= this (REPA: cfg 1.8 with 0.7).")]
BatchOpt = Annotated[int, typer.Option(help="Images per sampling batch on each process.")]


def register(app: typer.Typer) -> None:
    """Add `sample` and `evaluate` to ``app``."""
    from pipeline.cli import ConfigOpt, _is_main, user_errors

    @app.command()
    @user_errors
    def sample(
        ctx: typer.Context,
        config: ConfigOpt = None,
        run_dir: RunDirOpt = _S.run_dir,
        checkpoint: CheckpointOpt = _S.checkpoint,
        cache: CacheOpt = _S.cache,
        ema: EmaOpt = _S.ema,
        out: Annotated[Optional[Path], typer.Option(help="Output folder (default: RUN_DIR/samples/step-XXXXXXX).", metavar="DIR")] = _S.out,
        num_samples: Annotated[int, typer.Option(help="Images to generate (prompts or classes are cycled).")] = _S.num_samples,
        prompts: Annotated[Optional[Path], typer.Option(help="Text runs: a file with one prompt per line.", metavar="FILE")] = _S.prompts,
        prompt: Annotated[Optional[list[str]], typer.Option(help="Text runs: a prompt (repeat for several).", metavar="TEXT")] = None,
        classes: Annotated[Optional[str], typer.Option(help="Class runs: comma-separated ids (1,2,3) or random (default: random).")] = _S.classes,
        sampler: SamplerOpt = _S.sampler,
        steps: StepsOpt = _S.steps,
        seed: SeedOpt = _S.seed,
        cfg: CfgOpt = _S.cfg,
        guidance_low: LowOpt = _S.guidance_low,
        guidance_high: HighOpt = _S.guidance_high,
        batch_size: BatchOpt = _S.batch_size,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace images, grid and sidecar written earlier.")] = _S.overwrite,
        decode_latents: Annotated[Optional[Path], typer.Option(help="Instead of sampling: decode RUN_DIR/previews/step-*.pt into PNG grids.", metavar="RUN_DIR")] = _S.decode_latents,
    ):
        """Stage three: images from a trained run, with a grid and a JSON sidecar (run under `accelerate launch` for all GPUs)."""
        from pipeline.config import from_context

        values = dict(locals())
        values["prompt"] = list(prompt or [])
        options = from_context(SampleConfig, ctx, values, config, "sample")
        if options.decode_latents is not None:
            from stages.sample.decode import decode_previews

            if not _is_main():
                return  # a handful of small grids: one process decodes them
            written = decode_previews(options.decode_latents, options.cache, options.overwrite,
                                      log=lambda msg: typer.echo(msg, err=True))
            typer.echo(f"decoded {len(written)} preview step(s) in {Path(options.decode_latents) / 'previews'}")
            return
        from stages.sample.run import run_sample

        result = run_sample(options, log=lambda msg: typer.echo(msg, err=True))
        if _is_main():
            typer.echo(f"{len(result.images)} images in {result.out}; grid {result.grid}; sidecar {result.sidecar}")

    @app.command()
    @user_errors
    def evaluate(
        ctx: typer.Context,
        config: ConfigOpt = None,
        run_dir: RunDirOpt = _E.run_dir,
        checkpoint: CheckpointOpt = _E.checkpoint,
        cache: CacheOpt = _E.cache,
        ema: EmaOpt = _E.ema,
        num_samples: Annotated[int, typer.Option(help="Generated images (50000 for numbers comparable with papers).")] = _E.num_samples,
        sampler: SamplerOpt = _E.sampler,
        steps: StepsOpt = _E.steps,
        seed: SeedOpt = _E.seed,
        cfg: CfgOpt = _E.cfg,
        guidance_low: LowOpt = _E.guidance_low,
        guidance_high: HighOpt = _E.guidance_high,
        batch_size: BatchOpt = _E.batch_size,
        inception_weights: Annotated[Optional[Path], typer.Option(help="NVIDIA's inception-2015-12-05.pt for offline use (default: downloaded into the torch hub cache).", metavar="FILE")] = _E.inception_weights,
        reference: Annotated[Optional[Path], typer.Option(help="Reference statistics (.npz with mu, sigma) (default: computed from the held-out source images).", metavar="FILE")] = _E.reference,
        make_reference: Annotated[Optional[Path], typer.Option(help="Only write the held-out split's reference statistics to this .npz.", metavar="FILE")] = _E.make_reference,
        clip_model: Annotated[Optional[str], typer.Option(help="Also report a CLIP score with this model (e.g. openai/clip-vit-large-patch14); text runs.", metavar="ID|DIR")] = _E.clip_model,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --make-reference file.")] = _E.overwrite,
    ):
        """FID and Inception Score (and CLIP score) of samples conditioned on the held-out split; appended to RUN_DIR/eval.jsonl."""
        from pipeline.config import from_context
        from stages.sample.evaluate import run_evaluate

        options = from_context(EvaluateConfig, ctx, dict(locals()), config, "evaluate")
        result = run_evaluate(options, log=lambda msg: typer.echo(msg, err=True))
        if _is_main() and isinstance(result, dict):
            typer.echo(json.dumps(result))

