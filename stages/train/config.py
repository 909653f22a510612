"""Every knob of `repa train`, with its default and what it does (defaults: official REPA ImageNet-256)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from cache_schema import UsageError

TIME_SAMPLINGS = ("uniform", "logit-normal")
CONDITIONINGS = ("auto", "class", "text", "none")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    cache: Path = Path("cache/demo")  # feature cache written by `repa encode` (read-only here)
    run_dir: Path = Path("runs/demo")  # checkpoints, logs, metrics.jsonl, curves.png
    # -- model ----------------------------------------------------------------------------------
    model: str | None = "SiT-XL/2"  # preset (SiT-B/2, SiT-L/2, SiT-XL/2, /4, /8); None: use width/depth below
    width: int | None = None  # hidden size (128-2048); overrides the preset's
    depth: int | None = None  # number of blocks; overrides the preset's
    head_dim: int | None = None  # channels per attention head; overrides the preset's head count
    patch_size: int | None = None  # latent pixels per token side; overrides the preset's
    cond: str = "auto"  # auto (text if the cache has caption features, else class if it has labels, else none)
    num_classes: int | None = None  # class count for cond=class; None: max label in the cache + 1
    # -- objective --------------------------------------------------------------------------------
    time_sampling: str = "uniform"  # uniform t, or logit-normal t = sigmoid(n), n ~ N(0, 1)
    repa_lambda: float = 0.5  # weight of the REPA loss; 0 disables REPA and drops the projector
    align_layer: int | None = None  # 1-based block whose output is aligned; None: preset's (8 for L/XL, 4 for B)
    projector_dim: int = 2048  # hidden size of the REPA projector MLP
    cond_dropout: float = 0.1  # probability of replacing a label/caption by the null one (for CFG)
    # -- optimisation -----------------------------------------------------------------------------
    batch_size: int = 256  # global batch (all processes, all accumulation steps)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # AdamW learning rate
    lr_schedule: str = "constant"  # constant, or cosine decay to 0 after warmup
    warmup_steps: int = 0  # linear warmup from 0 to lr
    weight_decay: float = 0.0  # AdamW weight decay
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    grad_clip: float = 1.0  # clip the global grad norm to this (0 disables)
    ema_decay: float = 0.9999  # EMA of the weights, updated every step
    mixed_precision: str = "auto"  # auto (bf16 on GPU, off on CPU), bf16, fp16, no
    compile: bool = False  # torch.compile the model
    steps: int = 400_000  # optimizer steps to train for
    seed: int = 0  # seeds weights, data order and all noise
    # -- data -----------------------------------------------------------------------------------
    val_fraction: float = 0.01  # share of the cache (chosen by key hash) held out for validation
    max_val_samples: int = 2048  # cap on held-out samples evaluated per validation
    num_workers: int = 4  # DataLoader workers per process
    # -- bookkeeping ----------------------------------------------------------------------------
    log_every: int = 50  # steps between logged training metrics
    val_every: int = 2000  # steps between validations (and curve PNGs)
    ckpt_every: int = 10_000  # steps between checkpoints
    keep_checkpoints: int = 3  # keep the newest K checkpoints (0 keeps all)
    preview_every: int = 0  # steps between saved preview latents of fixed validation conditions (0: off)
    report_to: str = "tensorboard"  # tensorboard, wandb or none (metrics.jsonl is always written)
    resume: bool = False  # continue from the newest checkpoint in run_dir
    resume_from: Path | None = None  # continue from this checkpoint file
    overwrite: bool = False  # delete an existing run_dir first

    def validate(self) -> None:
        def bad(msg: str):
            raise UsageError(msg)

        if self.time_sampling not in TIME_SAMPLINGS:
            bad(f"--time-sampling {self.time_sampling!r}: choose {' or '.join(TIME_SAMPLINGS)}")
        if self.cond not in CONDITIONINGS:
            bad(f"--cond {self.cond!r}: choose one of {', '.join(CONDITIONINGS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            bad(f"--lr-schedule {self.lr_schedule!r}: choose {' or '.join(LR_SCHEDULES)}")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            bad(f"--mixed-precision {self.mixed_precision!r}: choose auto, bf16, fp16 or no")
        if self.report_to not in ("tensorboard", "wandb", "none"):
            bad(f"--report-to {self.report_to!r}: choose tensorboard, wandb or none")
        if self.batch_size <= 0 or self.grad_accum <= 0 or self.steps <= 0:
            bad("--batch-size, --grad-accum and --steps must be positive")
        if self.repa_lambda < 0:
            bad(f"--repa-lambda {self.repa_lambda}: must be >= 0")
        if not 0 <= self.cond_dropout < 1:
            bad(f"--cond-dropout {self.cond_dropout}: must be in [0, 1)")
        if not 0 <= self.val_fraction < 1:
            bad(f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        if self.model is None and (self.width is None or self.depth is None):
            bad("without --model, give both --width and --depth")
        for name in ("log_every", "val_every", "ckpt_every"):
            if getattr(self, name) <= 0:
                bad(f"--{name.replace('_', '-')} must be positive")

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}


# Settings that may change when a run resumes: bookkeeping, not the trajectory.
RESUMABLE_CHANGES = frozenset(
    {"steps", "run_dir", "cache", "num_workers", "log_every", "val_every", "ckpt_every", "keep_checkpoints",
     "preview_every", "report_to", "resume", "resume_from", "overwrite", "max_val_samples", "compile"}
)
