"""Every option of `repa sample` and `repa evaluate`: default, help text and checks, declared once.

Both commands share :class:`SamplingOptions` (which run, which weights, which sampler and guidance);
:class:`SampleConfig` adds where images go and what they are conditioned on, :class:`EvaluateConfig`
the metrics. Nothing the run already knows (VAE, text encoder, latent scaling, conditioning) is an
option: it comes from the checkpoint and the cache manifest it trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stages.core.errors import UsageError
from stages.core.options import option

SAMPLER_NAMES = ("euler", "heun", "sde")
GRID_MAX_IMAGES = 64  # the grid shows the first images only; a 50k-image grid helps nobody


@dataclass
class SamplingOptions:
    run_dir: Path = option(
        None, "Run directory written by `repa train`.", metavar="DIR", required=True, default_text="required",
    )
    checkpoint: Path | None = option(
        None, "Checkpoint file.", metavar="FILE", default_text="the newest in RUN_DIR/checkpoints",
    )
    cache: Path | None = option(
        None, "Cache whose manifest names the VAE and text encoder.", metavar="DIR",
        default_text="the one the run trained on",
    )
    ema: bool = option(True, "Use the EMA weights (--no-ema: the raw weights).")
    sampler: str = option(
        "euler", "euler or heun (ODE), sde (Euler-Maruyama, as REPA's paper numbers).", choices=SAMPLER_NAMES,
    )
    steps: int | None = option(
        None, "Sampling steps (--diffuse runs: points of RAE's shifted Euler grid, one step fewer).",
        default_text="50 for euler/heun, 250 for sde", gt=0,
    )
    seed: int = option(0, "Image i starts from noise seeded with (seed, i).", ge=0)
    guidance_scale: float = option(
        1.0, "Classifier-free guidance scale (1: none).", flags=("--guidance-scale", "--cfg"), ge=0,
    )
    guidance_low: float = option(0.0, "Guidance only for t >= this (t = 1 is noise, 0 is data).")
    guidance_high: float = option(1.0, "Guidance only for t <= this (REPA: scale 1.8 with 0.7).")
    rae_decoder: str | None = option(
        None, "Runs trained with --diffuse (RAE): the RAE decoder's weights, RAE's model.pt (read with "
        "weights_only=True), a folder holding model.pt and config.json, or hf://OWNER/REPO/PATH/model.pt.",
        metavar="FILE|DIR|hf://...",
    )
    rae_decoder_config: str = option(
        "ViTXL", "The RAE decoder's shape: ViTB, ViTL, ViTXL or RAE's config.json (a --rae-decoder folder's own "
        "config.json is used first).", metavar="PRESET|FILE",
    )
    batch_size: int = option(64, "Images per sampling batch on each process.", gt=0)
    num_samples: int = option(16, "Images to generate (prompts or classes are cycled).", gt=0)
    threads: int | None = option(
        None, "torch intra-op threads per process.", default_text="cores per process, or OMP_NUM_THREADS", gt=0,
    )

    @property
    def interval(self) -> list[float]:
        return [self.guidance_low, self.guidance_high]

    def check(self) -> None:
        if self.guidance_high < self.guidance_low:
            raise UsageError(
                f"--guidance-high {self.guidance_high} is below --guidance-low {self.guidance_low}; "
                "guidance applies for guidance-low <= t <= guidance-high"
            )


@dataclass
class SampleConfig(SamplingOptions):
    out: Path | None = option(None, "Output folder.", metavar="DIR", default_text="RUN_DIR/samples/step-XXXXXXX")
    prompts: Path | None = option(None, "Text runs: a file with one prompt per line.", metavar="FILE")
    prompt: list[str] = option([], "Text runs: a prompt (repeat for several).", metavar="TEXT")
    classes: str | None = option(
        None, "Class runs: comma-separated ids (1,2,3) or random.", default_text="random",
    )
    held_out: bool = option(
        False, "Condition on the captions (text runs) or class ids (class runs) of the run's held-out samples, in the "
        "order reference.png shows those samples, so each generated image sits beside the real one it was asked "
        "for.", flags=("--held-out",),
    )
    overwrite: bool = option(False, "Replace images, grid and sidecar written earlier.", flags=("--overwrite",))

    def check(self) -> None:
        super().check()
        if self.held_out and (self.prompts is not None or self.prompt or self.classes is not None):
            raise UsageError("--held-out takes its conditions from the held-out samples: drop --prompts, --prompt "
                             "and --classes")
        if self.prompts is not None and self.prompt:
            raise UsageError("give --prompts FILE or --prompt TEXT, not both")
        if (self.prompts is not None or self.prompt) and self.classes is not None:
            raise UsageError("give prompts (text runs) or --classes (class runs), not both")


@dataclass
class EvaluateConfig(SamplingOptions):
    num_samples: int = option(
        10_000, "Generated images (50000 for numbers comparable with papers).", ge=2,
    )
    inception_weights: Path | None = option(
        None, "NVIDIA's inception-2015-12-05.pt for offline use.", metavar="FILE",
        default_text="downloaded into the torch hub cache",
    )
    reference: Path | None = option(
        None, "Reference statistics (.npz with mu, sigma).", metavar="FILE",
        default_text="computed from the held-out source images",
    )
    make_reference: Path | None = option(
        None, "Only write the held-out split's reference statistics to this .npz.", metavar="FILE",
    )
    source: str | None = option(
        None, "The cache's input shards, where the recorded paths no longer hold them or they are pipe: commands "
        "(a cache's recorded commands run only when given here).", metavar="PATTERN",
    )
    clip_model: str | None = option(
        None, "Also report a CLIP score with this model (e.g. openai/clip-vit-large-patch14); text runs.",
        metavar="ID|DIR",
    )
    overwrite: bool = option(False, "Replace an existing --make-reference file.", flags=("--overwrite",))

    def check(self) -> None:
        super().check()
        if self.make_reference is not None and self.reference is not None:
            raise UsageError("--make-reference writes reference statistics and --reference reads them; give one")
