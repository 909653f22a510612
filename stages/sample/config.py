"""Every knob of `repa sample` and `repa evaluate`, with its default and what it does.

Both commands share :class:`SamplingOptions` (which run, which weights, which sampler and guidance);
:class:`SampleConfig` adds where images go and what they are conditioned on, :class:`EvaluateConfig`
the metrics. Nothing the run already knows (VAE, text encoder, latent scaling, conditioning) is an
option: it comes from the checkpoint and the cache manifest it trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cache_schema import UsageError

from .samplers import DEFAULT_STEPS, SAMPLERS

GRID_MAX_IMAGES = 64  # the grid shows the first images only; a 50k-image grid helps nobody


@dataclass
class SamplingOptions:
    run_dir: Path = Path("runs/demo")  # run directory written by `repa train`
    checkpoint: Path | None = None  # checkpoint file; None: the newest in run_dir/checkpoints
    cache: Path | None = None  # cache whose manifest names the VAE/text encoder; None: the one the run trained on
    ema: bool = True  # sample with the EMA weights (False: the raw weights)
    sampler: str = "euler"  # euler or heun (probability-flow ODE), sde (Euler-Maruyama, as REPA's paper numbers)
    steps: int | None = None  # sampling steps; None: 50 for euler/heun, 250 for sde
    seed: int = 0  # image i starts from noise seeded with (seed, i)
    cfg: float = 1.0  # classifier-free guidance scale (1: no guidance)
    guidance_low: float = 0.0  # guidance applies only for t in [guidance_low, guidance_high] (t = 1 is noise)
    guidance_high: float = 1.0  # REPA's best ImageNet numbers use cfg 1.8 with guidance_high 0.7
    batch_size: int = 64  # images per sampling batch on each process
    num_samples: int = 16  # images to generate

    @property
    def num_steps(self) -> int:
        return DEFAULT_STEPS[self.sampler] if self.steps is None else self.steps

    @property
    def interval(self) -> list[float]:
        return [self.guidance_low, self.guidance_high]

    def validate(self) -> None:
        if self.sampler not in SAMPLERS:
            raise UsageError(f"--sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if self.steps is not None and self.steps <= 0:
            raise UsageError(f"--steps {self.steps}: must be a positive number of sampling steps")
        if self.guidance_high < self.guidance_low:
            raise UsageError(
                f"--guidance-high {self.guidance_high} is below --guidance-low {self.guidance_low}; "
                "guidance applies for guidance-low <= t <= guidance-high"
            )
        if self.cfg < 0:
            raise UsageError(f"--cfg {self.cfg}: must be >= 0 (1 disables guidance)")
        if self.seed < 0:
            raise UsageError(f"--seed {self.seed}: must be >= 0")
        if self.batch_size <= 0:
            raise UsageError(f"--batch-size {self.batch_size}: must be positive")
        if self.num_samples <= 0:
            raise UsageError(f"--num-samples {self.num_samples}: must be positive")

    def record(self) -> dict:
        """How the images were made, as written next to them and into eval.jsonl."""
        return {"sampler": self.sampler, "steps": self.num_steps, "cfg": self.cfg, "interval": self.interval}


@dataclass
class SampleConfig(SamplingOptions):
    out: Path | None = None  # output folder; None: RUN_DIR/samples/step-XXXXXXX
    prompts: Path | None = None  # text runs: a file with one prompt per line
    prompt: list[str] = field(default_factory=list)  # text runs: prompts given on the command line
    classes: str | None = None  # class runs: comma-separated ids, or "random" (the default for class runs)
    overwrite: bool = False  # replace images, grid and sidecar written earlier in `out`
    decode_latents: Path | None = None  # instead of sampling: decode RUN_DIR/previews/step-*.pt into PNG grids

    def validate(self) -> None:
        if self.decode_latents is not None:
            return  # decoding previews uses none of the sampling options
        super().validate()
        if self.prompts is not None and self.prompt:
            raise UsageError("give --prompts FILE or --prompt TEXT, not both")
        if (self.prompts is not None or self.prompt) and self.classes is not None:
            raise UsageError("give prompts (text runs) or --classes (class runs), not both")


@dataclass
class EvaluateConfig(SamplingOptions):
    num_samples: int = 10_000  # generated images (50 000 for numbers comparable with papers)
    inception_weights: Path | None = None  # NVIDIA's inception-2015-12-05.pt; None: download into the torch hub cache
    reference: Path | None = None  # .npz with mu and sigma (and n); None: computed from the held-out source images
    make_reference: Path | None = None  # only write the held-out split's statistics to this .npz, then stop
    clip_model: str | None = None  # CLIP model (Hub id or folder) for a CLIP score on captioned data; None: off
    overwrite: bool = False  # replace an existing --make-reference file

    def validate(self) -> None:
        super().validate()
        if self.make_reference is not None and self.reference is not None:
            raise UsageError("--make-reference writes reference statistics and --reference reads them; give one")
        if self.num_samples < 2:
            raise UsageError(f"--num-samples {self.num_samples}: FID needs at least 2 images")
