"""Every option of `repa train`: its default, its help text and its checks, declared once
(defaults: official REPA ImageNet-256)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cache_schema.format.layout import FIRST_TARGET
from stages.core.diffusion.family_settings import PROJECTOR_TYPES, TARGET_NORMS, FamilySettings
from stages.core.errors import UsageError
from stages.core.model.model_config import ARCHS
from stages.core.model.model_presets import MODEL_PRESETS
from stages.core.options import canonical, option, to_json
from stages.core.runtime.stop import DEFAULT_STOP_SIGNALS, parse_signals

from .methods import METHODS, NEUTRAL, method_parts, method_settings

CONDITIONINGS = ("auto", "class", "text", "none")
TIME_SAMPLINGS = ("uniform", "logit-normal")
LR_SCHEDULES = ("constant", "cosine", "repa-rf-cosine", "linear-decay")
PARAM_GROUPS = ("uniform", "repa-rf-mup")
PRECISIONS = ("auto", "bf16", "fp16", "no")
TRACKERS = ("tensorboard", "wandb", "all", "none")

T = TypeVar("T")


def implied(value: T | None) -> T:
    """An option that --method sets unless it is given (``repa_lambda``, ``class_token_weight``, ...):
    ``TrainConfig.__post_init__`` fills it in for every valid --method, and ``check()`` refuses the others
    before any of them is read."""
    assert value is not None, "an option of --method read before the method was expanded"
    return value


@dataclass(frozen=True)
class Alignment:
    """--targets, --target-lambdas and --align-layers, parsed and checked once (``TrainConfig.alignment``)."""

    targets: tuple[str, ...]  # the projectors' order
    lambdas: tuple[float, ...] | None  # one REPA weight per target; None: --repa-lambda for all
    layers: tuple[int, ...]  # one block per target; empty: --align-layer for all


@dataclass
class TrainConfig:
    cache: Path = option(
        None, "Feature cache written by `repa encode` (read-only).", metavar="DIR", required=True,
        default_text="required",
    )
    run_dir: Path = option(
        None, "Run directory: checkpoints, metrics.jsonl, curves.png, tracker logs.", metavar="DIR", required=True,
        default_text="required",
    )
    # -- model ------------------------------------------------------------------------------------
    model: str | None = option(
        "SiT-XL/2", "Preset: SiT-B/2, SiT-L/2, SiT-XL/2 (and /4, /8), repa-rf-w512/w1024/w2048 (repa-rf's "
        "DiT), RAE's DiTDH-S, DiTDH-XL and LightningDiT-B/1, -L/1, -XL/1, or none to use --width/--depth.",
        choices=tuple(MODEL_PRESETS), none_word=True,
    )
    arch: str | None = option(
        None, "Network family: sit (official REPA's SiT), repa-rf (repa-rf's CC12M DiT), dit-dh or lightning-dit "
        "(RAE's, class-conditional or unconditional, no REPA projector).",
        default_text="the preset's, else sit", choices=ARCHS,
    )
    width: int | None = option(None, "Hidden size (a multiple of --head-dim); overrides the preset.", gt=0)
    depth: int | None = option(None, "Number of blocks; overrides the preset.", gt=0)
    head_dim: int | None = option(None, "Channels per attention head; overrides the preset's heads.", gt=0)
    patch_size: int | None = option(None, "Latent pixels per token side; overrides the preset.", gt=0)
    head_width: int | None = option(
        None, "DiT-DH: hidden size of the wide head (its heads: --head-dim each); overrides the preset.", gt=0,
    )
    head_depth: int | None = option(None, "DiT-DH: blocks of the wide head; overrides the preset.", gt=0)
    cond: str = option(
        "auto", "Conditioning: auto (text if the cache has captions, else class if labelled, else none), "
        "class, text, none.", choices=CONDITIONINGS,
    )
    num_classes: int | None = option(None, "Classes for --cond class.", default_text="max label + 1", gt=0)
    text_mask: bool = option(
        True, "Cross-attention ignores padded caption tokens (--no-text-mask: attends to every stored token, as "
        "repa-rf's DiT does).",
    )
    # -- objective --------------------------------------------------------------------------------
    diffuse: str | None = option(
        None, "Diffuse this alignment target's patch tokens instead of the VAE latents (RAE, docs/rae.md): the "
        "cached fp16 tokens as a (dim, grid, grid) latent, final-LayerNorm affine removed where the cache records "
        "it, normalised per element by statistics over the training split (RUN_DIR/stat.pt, RAE's format), t "
        "shifted by sqrt(dim·grid²/4096); no REPA term (--method sit).", metavar="TARGET", none_word=True,
        default_text="none: the VAE latents",
    )
    diffuse_stats: Path | None = option(
        None, "--diffuse: normalise with these statistics (RAE's stat.pt, {mean, var} of shape (dim, grid, grid)) "
        "instead of computing them over the cache.", metavar="FILE",
        default_text="RUN_DIR/stat.pt, computed once and reused on resume",
    )
    time_sampling: str = option(
        "uniform", "t distribution: uniform or logit-normal (with --diffuse: RAE's, drawn on [0, 0.999], the "
        "logit-normal truncated there, then shifted).", choices=TIME_SAMPLINGS,
    )
    method: str = option(
        "repa", f"Objective, as its official code sets it (docs/methods.md): {', '.join(METHODS)}, or several joined "
        "by + (e.g. reg+irepa). The options below that it sets take its values unless given.", metavar="NAME",
    )
    repa_lambda: float | None = option(
        None, "Weight of the REPA loss; 0 disables REPA and the projector.", ge=0,
        default_text="the method's: 0.5, irepa 1.0, sit and dispersive 0",
    )
    targets: str | None = option(
        None, "Alignment targets of the cache, comma-separated (e.g. dino,clip-l; `repa cache info` lists them): one "
        "REPA projector each, the REPA loss averaged over them as official REPA does.",
        default_text="the cache's first target, dino", metavar="NAME,...", none_word=True,
    )
    target_lambdas: str | None = option(
        None, "REPA weight of each of --targets, comma-separated, in their order (replaces --repa-lambda, which "
        "then only switches REPA on).", metavar="L,...", none_word=True,
    )
    align_layer: int | None = option(
        None, "1-based block whose output is aligned to DINOv2.", default_text="preset's: 8 for L/XL, 4 for B",
    )
    align_layers: str | None = option(
        None, "1-based block of each of --targets, comma-separated, in their order (e.g. 8,4), when targets are "
        "aligned at different blocks.", default_text="--align-layer for every target", metavar="K,...",
        none_word=True,
    )
    projector_dim: int = option(2048, "Hidden size of the REPA projector MLP.", gt=0)
    projector: str | None = option(
        None, "REPA projector: mlp (REPA's) or conv (iREPA's Conv2d over the token grid).", choices=PROJECTOR_TYPES,
        default_text="the method's: conv for irepa, else mlp",
    )
    projector_kernel: int | None = option(
        None, "Kernel size of the conv projector (odd).", gt=0, default_text="the method's: 1 (iREPA's LDM recipe)",
    )
    target_norm: str | None = option(
        None, "Alignment targets as stored (none) or z-scored over the token axis (zscore, iREPA).",
        choices=TARGET_NORMS, default_text="the method's: zscore for irepa, else none",
    )
    zscore_alpha: float | None = option(
        None, "Share of the token mean --target-norm zscore subtracts.", ge=0, default_text="the method's: 0.6",
    )
    class_token_weight: float | None = option(
        None, "REG: weight of the class token's velocity loss; > 0 feeds the target's noised class token to the model "
        "and aligns [class token, patch tokens] (the cache must store class tokens: `repa encode --class-tokens`).",
        ge=0, default_text="the method's: 0.03 for reg, else 0",
    )
    dispersive_lambda: float | None = option(
        None, "Weight of the dispersive loss on --dispersive-layer's output (0: off).", ge=0,
        default_text="the method's: 0.25 for dispersive, else 0",
    )
    dispersive_tau: float | None = option(
        None, "Temperature of the dispersive loss.", gt=0, default_text="the method's: 1",
    )
    dispersive_layer: int | None = option(
        None, "1-based block whose output the dispersive loss spreads.", ge=0,
        default_text="the method's: the last block",
    )
    align_stop: int | None = option(
        None, "Stop the alignment loss after this many steps (HASTE's early stop; 0: never).", ge=0,
        default_text="the method's: 250000 for haste, else 0",
    )
    cond_dropout: float = option(
        0.1, "Probability of dropping the label/caption to the null one (for CFG).", ge=0, lt=1,
    )
    # -- optimisation -----------------------------------------------------------------------------
    batch_size: int = option(256, "Global batch size (all processes and accumulation steps).", gt=0)
    batch_multiplicity: int = option(
        1, "Each sample read appears this many times in a batch: one latent drawn from its posterior, each copy "
        "with its own t and noise (repa-rf uses 4: 16 distinct images per 64).", gt=0,
    )
    grad_accum: int | None = option(
        None, "Micro-batches per optimizer step; they and the processes only split --batch-size (the run is the "
        "same, to rounding, for any split).",
        default_text="1; resuming on another process count: the fewest that keep the checkpoint's per-process "
        "micro-batch", gt=0,
    )
    lr: float = option(1e-4, "AdamW learning rate (the base rate of --param-groups repa-rf-mup).", gt=0)
    lr_schedule: str = option(
        "constant", "constant; cosine: decay to 0 after a linear warmup from lr/warmup; repa-rf-cosine: transformers' "
        "cosine schedule with warmup as repa-rf uses it (warmup from 0, 10% of --steps unless --warmup-steps); "
        "linear-decay: RAE's, constant, then linear to --final-lr between --lr-decay-start and --lr-decay-end, "
        "then constant.",
        choices=LR_SCHEDULES, aliases=(("seed-cosine", "repa-rf-cosine"),),
    )
    warmup_steps: int = option(0, "Linear warmup steps.", ge=0)
    lr_decay_start: int = option(
        0, "linear-decay: the step after which the lr falls linearly from --lr (RAE: 40 epochs).", ge=0,
    )
    lr_decay_end: int | None = option(
        None, "linear-decay: the step at which it reaches --final-lr, kept from there on (RAE: 800 epochs).", gt=0,
        default_text="--steps",
    )
    final_lr: float = option(0.0, "linear-decay: the lr from --lr-decay-end on (RAE: 2e-5).", ge=0)
    weight_decay: float = option(0.0, "AdamW weight decay (the base decay of --param-groups repa-rf-mup).", ge=0)
    adam_betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas.", metavar="B1 B2")
    param_groups: str = option(
        "uniform", "uniform: one lr and weight decay for every parameter; repa-rf-mup: repa-rf's muP-style "
        "groups (per-parameter lr and decay by fan-in, written to RUN_DIR/param_groups.tsv).", choices=PARAM_GROUPS,
        aliases=(("seed-mup", "repa-rf-mup"),),
    )
    grad_clip: float = option(1.0, "Clip the gradient norm to this (0: off).", ge=0)
    ema_decay: float = option(0.9999, "EMA decay, updated every step.", ge=0, le=1)
    mixed_precision: str = option("auto", "auto (bf16 on GPU, off on CPU), bf16, fp16, no.", choices=PRECISIONS)
    compile: bool = option(False, "torch.compile the model.")
    steps: int = option(400_000, "Optimizer steps to train for.", gt=0)
    seed: int = option(0, "Seed for weights, data order and noise.", ge=0)
    # -- data -------------------------------------------------------------------------------------
    val_fraction: float = option(
        0.01, "Share of the cache held out for validation (chosen by key hash); 0 trains on every sample.",
        ge=0, lt=1,
    )
    val_cache: Path | None = option(
        None, "Validate on this cache instead (e.g. held-out shards encoded with the same settings).",
        metavar="DIR",
    )
    min_similarity: float | None = option(
        None, "Train only on samples whose image-caption similarity, stored by `repa encode --similarity-model`, is "
        "at least this; the validation split is kept whole, so runs with different thresholds compare.", ge=-1, le=1,
    )
    flip: bool = option(
        False, "Horizontal flips: each training sample is read, with probability 1/2, as its flipped crop (moments "
        "and targets together), stored by `repa encode --flips`; a function of (--seed, epoch), so resume is exact. "
        "Validation and previews never flip; captions are not flipped.", flags=("--flip",),
    )
    max_val_samples: int = option(2048, "Held-out samples evaluated per validation.", ge=0)
    allow_partial: bool = option(
        False, "Train on a cache whose encode has not finished (missing or cut-short input shards).",
        flags=("--allow-partial",),
    )
    num_workers: int = option(4, "DataLoader workers per process.", ge=0)
    threads: int | None = option(
        None, "torch intra-op threads per process.",
        default_text="cores per process minus loader workers, or OMP_NUM_THREADS", gt=0,
    )
    # -- bookkeeping ------------------------------------------------------------------------------
    log_every: int = option(50, "Steps between logged training metrics.", gt=0)
    val_every: int = option(2000, "Steps between validations (and curves.png).", gt=0)
    ckpt_every: int = option(10_000, "Steps between checkpoints.", gt=0)
    keep_checkpoints: int = option(3, "Checkpoints to keep (0: all).", ge=0)
    preview_every: int = option(
        0, "Steps between saved preview latents (decode with `repa decode-previews`; 0: off).", ge=0,
    )
    report_to: str = option(
        "tensorboard", "Trackers (accelerate's): tensorboard (RUN_DIR/tb), wandb (RUN_DIR/wandb; pip install "
        "'.[wandb]'), all (tensorboard, and wandb when installed) or none; metrics.jsonl is always written.",
        choices=TRACKERS,
    )
    tracker_project: str = option("repa", "Project the run is logged under (wandb).", metavar="NAME")
    run_name: str | None = option(None, "Name of the run in the trackers.", metavar="NAME",
                                  default_text="the run directory's name")
    resume: bool | None = option(
        None, "--resume: continue from the newest checkpoint in --run-dir (refused if there is none); --no-resume: "
        "start a new run (refused if --run-dir holds checkpoints, unless --overwrite).",
        flags=("--resume/--no-resume",),
        default_text="continue from the newest checkpoint when --run-dir holds one (same settings), else start",
    )
    resume_from: Path | None = option(None, "Continue from this checkpoint file.", metavar="FILE")
    overwrite: bool = option(False, "Delete an existing --run-dir first and start over.", flags=("--overwrite",))
    stop_signals: str = option(
        DEFAULT_STOP_SIGNALS, "Signals that stop training cleanly: the optimizer step in flight is finished, a "
        "checkpoint of it written, and the process exits with status 128 + the signal's number (TERM 143, INT 130, "
        "USR1 138); a second signal stops at once. Comma-separated names, or none.", metavar="SIG,...",
    )

    def __post_init__(self) -> None:
        """Options the method sets and that were not given take the method's values."""
        if not isinstance(self.method, str):
            return  # check() names the bad value
        try:
            settings = method_settings(self.method, self.depth or MODEL_PRESETS.get(self.model or "", {}).get("depth"))
        except UsageError:
            return  # check() repeats it in one line
        for name, value in settings.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def family(self, step: int | None = None) -> FamilySettings:
        """What the method adds to REPA's objective at (1-based) ``step``; without a step, every addition."""
        return FamilySettings(class_token_weight=implied(self.class_token_weight),
                              target_norm=implied(self.target_norm), zscore_alpha=implied(self.zscore_alpha),
                              dispersive_lambda=implied(self.dispersive_lambda),
                              dispersive_tau=implied(self.dispersive_tau),
                              align=not (self.align_stop and step is not None and step > self.align_stop))

    def check(self) -> None:
        method_parts(self.method)
        self.alignment()
        if implied(self.dispersive_lambda) > 0 and not self.dispersive_layer:
            raise UsageError(f"--dispersive-lambda {self.dispersive_lambda}: give --dispersive-layer, the block whose "
                             "output it spreads")
        if implied(self.projector_kernel) % 2 == 0:
            raise UsageError(f"--projector-kernel {self.projector_kernel}: must be odd, so the grid keeps its size")
        if self.model is None and (self.width is None or self.depth is None):
            raise UsageError("without --model, give both --width and --depth")
        if self.val_cache is not None and self.val_fraction > 0:
            raise UsageError("--val-cache holds the validation samples; pass --val-fraction 0 with it")
        self.target_names()
        self.lambdas()
        self.layers()
        parse_signals(self.stop_signals)
        if not 0 < self.adam_betas[0] < 1 or not 0 < self.adam_betas[1] < 1:
            raise UsageError(f"--adam-betas {self.adam_betas[0]} {self.adam_betas[1]}: both must be in (0, 1)")
        if self.lr_schedule == "linear-decay" and (self.lr_decay_end or self.steps) <= self.lr_decay_start:
            raise UsageError(f"--lr-decay-end {self.lr_decay_end or self.steps} must come after --lr-decay-start "
                             f"{self.lr_decay_start}")
        if self.diffuse_stats is not None and not self.diffuse:
            raise UsageError("--diffuse-stats normalises the tokens of --diffuse TARGET; give --diffuse or drop it")
        if self.diffuse:
            extras = {"--repa-lambda": implied(self.repa_lambda),
                      "--class-token-weight": implied(self.class_token_weight),
                      "--dispersive-lambda": implied(self.dispersive_lambda)}
            given = next((flag for flag, value in extras.items() if value > 0), None)
            if given:
                raise UsageError(f"--diffuse {self.diffuse}: the model diffuses the target itself, so there is no "
                                 f"alignment term ({given} is {extras[given]}); pass --method sit")
            if self.preview_every:
                raise UsageError(f"--diffuse {self.diffuse}: previews are decoded with the VAE; pass --preview-every "
                                 "0 and draw images with `repa sample`, which decodes with the RAE decoder")

    def target_names(self) -> list[str]:
        """--targets as a list: the projectors' order (default: the cache's first target)."""
        if not self.targets:
            return [FIRST_TARGET]
        names = [n.strip() for n in self.targets.split(",")]
        if "" in names or len(set(names)) != len(names):
            raise UsageError(f"--targets {self.targets}: give each target name once, comma-separated "
                             "(e.g. dino,clip-l)")
        return names

    def lambdas(self) -> list[float] | None:
        """The REPA weight of each target (--target-lambdas), or None: --repa-lambda for all."""
        if self.target_lambdas is None:
            return None
        try:
            values = [float(v) for v in self.target_lambdas.split(",")]
        except ValueError:
            raise UsageError(f"--target-lambdas {self.target_lambdas}: comma-separated numbers, e.g. 0.5,1") from None
        if len(values) != len(self.target_names()) or min(values) < 0:
            raise UsageError(f"--target-lambdas {self.target_lambdas}: one non-negative weight per target of --targets "
                             f"({', '.join(self.target_names())})")
        return values

    def layers(self) -> tuple[int, ...]:
        """--align-layers as a tuple, one block per target (empty: --align-layer for all)."""
        if self.align_layers is None:
            return ()
        try:
            values = tuple(int(v) for v in self.align_layers.split(","))
        except ValueError:
            raise UsageError(f"--align-layers {self.align_layers}: comma-separated block numbers, e.g. 8,4") from None
        if len(values) != len(self.target_names()):
            raise UsageError(f"--align-layers {self.align_layers}: one block per target of --targets "
                             f"({', '.join(self.target_names())})")
        return values

    def alignment(self) -> Alignment:
        lambdas = self.lambdas()
        return Alignment(tuple(self.target_names()), None if lambdas is None else tuple(lambdas), self.layers())

    def to_json(self) -> dict:
        return to_json(self)


# Settings that may change when a run resumes: bookkeeping, not the trajectory (gradient accumulation only
# splits the global batch, as the number of processes does).
RESUMABLE_CHANGES = frozenset(
    {"steps", "run_dir", "cache", "num_workers", "log_every", "val_every", "ckpt_every", "keep_checkpoints",
     "preview_every", "report_to", "tracker_project", "run_name", "resume", "resume_from", "overwrite",
     "max_val_samples", "compile", "allow_partial", "grad_accum", "stop_signals"}
)


# Settings added after runs existed: a checkpoint without one was made with this value.
LATER_SETTINGS = {"flip": False, "method": "repa", **{k: v for k, v in NEUTRAL.items() if k != "repa_lambda"},
                  "diffuse": None, "diffuse_stats": None, "head_width": None, "head_depth": None, "lr_decay_start": 0,
                  "lr_decay_end": None, "final_lr": 0.0}


def resume_differences(saved: dict, current: dict) -> list[str]:
    """Config fields that differ in ways that would change the training trajectory."""
    out = []
    saved = {**LATER_SETTINGS, **canonical(TrainConfig, saved)}
    for k in sorted(set(saved) | set(current)):
        if k in RESUMABLE_CHANGES:
            continue
        if saved.get(k) != current.get(k):
            out.append(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}")
    return out
