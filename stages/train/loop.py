"""`repa train`: SiT + rectified flow + REPA under accelerate, fed only by the feature cache.

Reads top to bottom: helpers, then ``run_train`` and ``train``: set-up calls (``stages.train.start``), then
``run_loop``, each step a named call.
Progress is counted in optimizer steps. The data of step ``s`` and all its randomness (latent sampling,
t, noise, label/caption dropout, flips) are functions of (seed, s, position in the global batch), never of
the rank or the number of processes (``EpochBatchSampler``, ``stages.train.draws``): a run resumed from a
checkpoint continues bit-for-bit where the interrupted one stopped, and one resumed on another number of
processes, or with other gradient accumulation, continues the same run up to float rounding.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from cache_schema import read_manifest
from stages.core.diffusion.diffusion_variable import TargetTokens, VaeLatents
from stages.core.diffusion.family_settings import FamilySettings
from stages.core.diffusion.objective import batch_loss_terms
from stages.core.errors import UsageError
from stages.core.files.checkpoint import (
    checkpoint_contents,
    checkpoint_path,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
)
from stages.core.files.run_files import FINAL_FILE
from stages.core.model.conditioning import Conditioner
from stages.core.model.network import build_model
from stages.core.options import check
from stages.core.runtime.cuda_settings import fast_cuda_math
from stages.core.runtime.progress import progress_bar
from stages.core.runtime.threads import set_threads

from .config import Alignment, TrainConfig, implied
from .draws import StepDraws, draw_step
from .metrics import TrainWindow, append_metrics, tracker_values, write_curves
from .optim import make_optimizer
from .previews import latent_grid, preview_weights
from .setup import check_flip, lock_run_dir, prepare_run_dir
from .start import Feeds, RunData, diffusion_variable, feeds, plan_data, record_start, resume
from .stopping import TrainStop
from .trackers import check_trackers, log_image, make_trackers, start_trackers, tracker_config

if TYPE_CHECKING:
    from accelerate import Accelerator

#################################################################################
#                                    Helpers                                    #
#################################################################################


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, every parameter in one fused call (torch's own EMA update)."""
    ema_params = list(ema.parameters())
    params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params, strict=True)]
    get_ema_multi_avg_fn(decay)(ema_params, params, None)


def resolve_precision(name: str) -> str:
    if name == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return name


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    from accelerate import Accelerator

    accelerator = Accelerator(
        mixed_precision=resolve_precision(cfg.mixed_precision),
        log_with=make_trackers(cfg) or None,
        project_dir=str(cfg.run_dir),
        cpu=not torch.cuda.is_available(),
    )
    fast_cuda_math(accelerator.device, autotune=False)  # caption lengths vary: autotuning would re-run per shape
    return accelerator


def micro_step(forward, conditioner: Conditioner, batch: dict, draws: StepDraws, repa_lambda: float, variable,
               targets: Sequence[str] = ("dino",), lambdas: list[float] | None = None,
               family: FamilySettings | None = None):
    """Forward one micro-batch: (loss, per-sample denoise loss, per-sample REPA cosine, t); the last three detached.

    ``batch`` holds the distinct images, ``draws`` their draws (``StepDraws.piece``): one latent is sampled per
    image and repeated ``draws.multiplicity`` times with the rest of the batch (``tile``), each copy with its
    own t, noise and dropout, as repa-rf samples ``latent_dist`` before its ``.repeat``. ``targets``: the
    alignment targets in projector order; ``lambdas``: their weights (else ``repa_lambda``); ``family``: what
    the --method adds to REPA (stages.core.diffusion.family); ``variable``: what is diffused
    (stages.core.diffusion.diffusion_variable)."""
    x = tile_rows(variable.clean(batch, draws.latent_noise), draws.multiplicity)
    batch = tile({k: v for k, v in batch.items() if k not in variable.fields}, draws.multiplicity)
    terms = batch_loss_terms(forward, batch, x, draws.noise, draws.t, conditioner(batch, drop=draws.drop), targets,
                             family, cls_noise=draws.cls_noise)
    return terms.total(repa_lambda, lambdas), terms.denoise.detach(), terms.cosine(), draws.t


def optimizer_update(accelerator: Accelerator, model, optimizer, scheduler, grad_clip: float) -> torch.Tensor:
    """Clip, step, schedule, zero; returns the gradient norm before clipping."""
    if grad_clip > 0:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        grad_norm = torch.norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@dataclass
class Trainer:
    """What one optimizer step needs; ``step`` runs it (accumulation, update, EMA, metrics)."""

    cfg: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by accelerate (DDP-wrapped on several processes)
    forward: object  # the model, compiled or not
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    conditioner: Conditioner
    latent: dict  # the diffused latent's shape: channels, size
    window: TrainWindow
    param_table: list[dict]  # lr and weight decay of every parameter
    nonfinite: torch.Tensor | None = None  # on the device: set once a loss or gradient norm was not finite
    cls_dim: int | None = None  # REG: the width of the class token it denoises (its path noise is a step draw)
    # what is diffused (stages.core.diffusion.diffusion_variable); None: the VAE latents
    variable: VaeLatents | TargetTokens | None = None
    alignment: Alignment | None = None  # the config's, parsed once (None: parsed here)

    def __post_init__(self) -> None:
        if self.variable is None:
            self.variable = VaeLatents(self.latent)
        if self.alignment is None:
            self.alignment = self.cfg.alignment()

    @property
    def raw_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def diverged(self) -> bool:
        """Whether any step so far had a non-finite loss or gradient (one host sync: call at log time)."""
        return self.nonfinite is not None and bool(self.nonfinite.item())

    def weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in [*self.raw_model.parameters(), *self.ema.parameters()])

    def step(self, step: int, batches) -> None:
        """One optimizer step on the next ``grad_accum`` micro-batches of ``batches``: this process's pieces of
        the global batch (``EpochBatchSampler``), each with its rows of the step's draws."""
        cfg, device, variable, alignment = self.cfg, self.accelerator.device, self.variable, self.alignment
        assert variable is not None and alignment is not None  # __post_init__ sets both
        accum, world, rank = cfg.grad_accum, self.accelerator.num_processes, self.accelerator.process_index
        assert accum is not None  # build_trainer resolves it
        family = cfg.family(step)
        targets = list(alignment.targets)
        lambdas = None if alignment.lambdas is None else list(alignment.lambdas)
        draws = draw_step(cfg.seed, step, cfg.batch_size // cfg.batch_multiplicity, cfg.batch_multiplicity,
                          self.latent, cfg.time_sampling, self.conditioner, device,
                          cls_dim=self.cls_dim if family.class_token else None, posterior=variable.posterior,
                          time_shift=variable.shift if isinstance(variable, TargetTokens) else None)
        for m in range(accum):
            piece = draws.piece(rank, m, world, accum)
            with nullcontext() if m == accum - 1 else self.accelerator.no_sync(self.model):
                loss, denoise, cos, t = micro_step(self.forward, self.conditioner, next(batches), piece,
                                                   implied(cfg.repa_lambda), variable, targets, lambdas, family)
                self.accelerator.backward(loss / accum)
            self.window.add_micro_batch(loss, denoise, cos, t, 1.0 / accum)
            self._flag(loss)
        grad_norm = optimizer_update(self.accelerator, self.model, self.optimizer, self.scheduler, cfg.grad_clip)
        update_ema(self.ema, self.raw_model, cfg.ema_decay)
        self.window.add_step(grad_norm)  # stays on the device: no sync per step
        self._flag(grad_norm)

    def _flag(self, value: torch.Tensor) -> None:
        bad = ~torch.isfinite(value.detach()).all()
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad


def build_trainer(cfg: TrainConfig, accelerator: Accelerator, model_cfg, cond: str, latent: dict, variable=None,
                  alignment: Alignment | None = None) -> Trainer:
    """A fresh model (seeded), its EMA, optimizer and schedule, prepared by accelerate. ``cfg.grad_accum``
    None (not derived by ``split_batch``): one micro-batch per step. ``variable``: what is diffused (default:
    the VAE latents of the manifest record ``latent``)."""
    if variable is not None:
        latent = {"channels": variable.shape[0], "size": variable.shape[1]}
    cfg = replace(cfg, grad_accum=cfg.grad_accum or 1)
    device = accelerator.device
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg)
    ema = copy.deepcopy(model).requires_grad_(False).to(device)
    optimizer, scheduler, table = make_optimizer(cfg, model, device)
    model, optimizer = accelerator.prepare(model, optimizer)
    forward = torch.compile(model) if cfg.compile else model
    conditioner = Conditioner(cond, accelerator.unwrap_model(model), cfg.cond_dropout)
    return Trainer(cfg, accelerator, model, forward, ema, optimizer, scheduler, conditioner, latent,
                   TrainWindow(device), table, variable=variable, alignment=alignment)


def tile_rows(x: torch.Tensor, times: int) -> torch.Tensor:
    """``x`` repeated ``times`` times along the batch axis, whole (as repa-rf's ``.repeat``)."""
    return x if times == 1 else x.repeat(times, *([1] * (x.dim() - 1)))


def tile(batch: dict, times: int) -> dict:
    """Each sample ``times`` times, the whole batch repeated (``tile_rows`` of every entry)."""
    return batch if times == 1 else {k: tile_rows(v, times) for k, v in batch.items()}


def checkpoint_state(trainer: Trainer, step: int, cond: str, model_cfg, manifest, parts: dict[str, int],
                     window: dict) -> dict:
    return checkpoint_contents(
        step=step, model=trainer.raw_model.state_dict(), ema=trainer.ema.state_dict(), config=trainer.cfg.to_json(),
        model_config=asdict(model_cfg), cond=cond, fingerprint=manifest.fingerprint, latent=manifest.latent,
        cache=str(trainer.cfg.cache), parts=parts, optimizer=trainer.optimizer.state_dict(),
        scheduler=trainer.scheduler.state_dict(), rng=rng_state(), processes=trainer.accelerator.num_processes,
        window=window, diffusion=trainer.variable.record() if isinstance(trainer.variable, TargetTokens) else None)


class Diverged(UsageError):
    """Training met a non-finite loss or gradient; nothing after the last good checkpoint was kept."""


def stop_if_diverged(trainer: Trainer, step: int, last_good: int | None, run_dir: Path) -> None:
    if trainer.diverged() or not trainer.weights_finite():
        where = (f"the last good checkpoint is {checkpoint_path(run_dir, last_good)} (the same command resumes from "
                 "it, and meets the same data)" if last_good else "no checkpoint was written yet")
        raise Diverged(f"step {step}: the loss or gradient became non-finite (NaN/inf) since the last check; {where}; "
                       "check the cache with `repa cache verify`, or start over with a lower --lr in a new --run-dir")


class RateClock:
    """Images per second between two log lines."""

    def __init__(self, step: int):
        self.last, self.last_step = time.perf_counter(), step

    def rate(self, step: int, batch_size: int) -> float:
        now = time.perf_counter()
        rate = (step - self.last_step) * batch_size / max(now - self.last, 1e-9)
        self.last, self.last_step = now, step
        return rate


def peak_memory(device: torch.device) -> dict:
    """The peak GPU memory since the previous log line, in GiB (nothing on the CPU)."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return {"gpu_mem_gib": peak}


class Logbook:
    """Where the main process sends numbers: metrics.jsonl, curves.png, the trackers and the progress bar."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, start_step: int):
        self.run_dir, self.accelerator = Path(cfg.run_dir), accelerator
        self.main = accelerator.is_main_process
        self.repa = implied(cfg.repa_lambda) > 0
        self.bar = progress_bar(total=cfg.steps, initial=start_step, unit="step", disable=not self.main,
                                dynamic_ncols=True, desc="train")

    def sum_over_processes(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, reduction="sum") if self.accelerator.num_processes > 1 else t

    def train(self, step: int, record: dict) -> None:
        if self.main:
            append_metrics(self.run_dir, {"kind": "train", "step": step, **record})
            self.accelerator.log(tracker_values("train", record, self.repa), step=step)
            # The loss and the REPA term apart: their weighted sum (denoise - lambda * cos) reads as nothing.
            shown = {"denoise": f"{record['denoise']:.4f}"}
            if self.repa:
                shown["repa_cos"] = f"{record['repa_cos']:.3f}"
            self.bar.set_postfix(**shown, img_s=f"{record['img_per_s']:.0f}", refresh=False)

    def validation(self, step: int, metrics: dict) -> dict:
        if self.main:
            append_metrics(self.run_dir, {"kind": "val", "step": step, **metrics})
            write_curves(self.run_dir)
            self.accelerator.log(tracker_values("val", metrics, self.repa), step=step)
            self.bar.write(f"step {step}: val denoise {metrics['denoise']:.4f}"
                           + (f", REPA cosine {metrics['repa_cos']:.3f}" if "repa_cos" in metrics else ""))
        return metrics

    def previews(self, step: int, latents: torch.Tensor) -> None:
        log_image(self.accelerator, "previews/latent_channels_rgb", latent_grid(latents), step)

    def __enter__(self) -> Logbook:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()  # before any error message, so the bar is not redrawn after it


@dataclass
class TrainResult:
    steps: int
    final_val: dict | None
    run_dir: Path


#################################################################################
#                                 Training loop                                 #
#################################################################################


def run_train(cfg: TrainConfig, log=print) -> TrainResult:
    check(cfg)
    if os.environ.get("RANK", "0") == "0":
        check_trackers(cfg)  # before anything touches the run directory
    manifest = read_manifest(cfg.cache)
    stop = TrainStop(cfg)
    with stop.signals:  # from here a stop signal waits for the step in flight (see stages.train.stopping)
        accelerator = make_accelerator(cfg)
        lock = lock_run_dir(cfg.run_dir) if accelerator.is_main_process else None  # one training per run directory
        try:
            return train(cfg, manifest, accelerator, log, stop)
        finally:
            stop.leave()
            if lock is not None:
                lock.close()


def train(cfg: TrainConfig, manifest, accelerator: Accelerator, log, stop: TrainStop | None = None) -> TrainResult:
    set_threads(cfg.threads, cfg.num_workers)
    check_flip(cfg, manifest)
    resume_path = prepare_run_dir(cfg, accelerator.is_main_process)
    ckpt = load_checkpoint(resume_path) if resume_path is not None else None
    data = plan_data(cfg, manifest, accelerator, ckpt)
    cfg = data.cfg
    variable = diffusion_variable(data, manifest, ckpt, accelerator, log)
    trainer = build_trainer(cfg, accelerator, data.model_cfg, data.cond, manifest.latent, variable, data.alignment)
    if cfg.family().class_token:  # REG denoises the first target's class token
        first = data.alignment.targets[0]
        trainer.cls_dim = int((manifest.dino if first == "dino" else manifest.targets[first])["dim"])
    start_step = 0
    if ckpt is not None and resume_path is not None:
        start_step = resume(trainer, ckpt, resume_path, data, manifest, log)
    del ckpt
    if start_step >= cfg.steps:  # a finished run, rerun: nothing to do, nothing touched
        if accelerator.is_main_process:
            log(f"{cfg.run_dir} is already trained to step {start_step} (--steps {cfg.steps}); nothing to do "
                "(raise --steps to train further)")
        return TrainResult(steps=start_step, final_val=None, run_dir=Path(cfg.run_dir))
    feed = feeds(data, trainer, manifest, start_step)
    params = record_start(data, trainer, manifest, log)
    start_trackers(accelerator, cfg, tracker_config(cfg, params, manifest.fingerprint), start_step)
    stop = stop or TrainStop(cfg)
    stop.join(accelerator)
    stop.last_checkpoint = start_step or None
    return run_loop(data, trainer, feed, manifest, start_step, stop)


def run_loop(data: RunData, trainer: Trainer, feed: Feeds, manifest, start_step: int, stop: TrainStop) -> TrainResult:
    """Steps from ``start_step`` to the end (or a stop signal): logging, validation, previews, checkpoints."""
    cfg, accelerator, cond, model_cfg, parts = data.cfg, trainer.accelerator, data.cond, data.model_cfg, data.parts
    device, main = accelerator.device, accelerator.is_main_process
    batches, validator, previewer = feed.batches, feed.validator, feed.previewer
    # -- the loop ---------------------------------------------------------------------------------
    with Logbook(cfg, accelerator, start_step) as logbook:
        def validate(step: int) -> dict | None:
            if validator is None:
                return None
            # Eager, never through the compiled training graph: its other batch sizes (a short last batch)
            # and t values would make torch.compile retrace training with dynamic shapes.
            return logbook.validation(step, validator.run(trainer.raw_model, trainer.conditioner,
                                                          logbook.sum_over_processes))

        trainer.model.train()
        clock = RateClock(start_step)
        last_good = start_step or None
        # A fresh run is validated before its first step, so every curve starts from the untrained model.
        val_metrics = validate(0) if start_step == 0 else None
        step = start_step
        signum = stop.agreed()  # a signal during set-up: no step at all
        for step in range(start_step + 1, (start_step if signum else cfg.steps) + 1):
            trainer.step(step, batches)
            logbook.bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                stop_if_diverged(trainer, step, last_good, cfg.run_dir)
                logbook.train(step, {**trainer.window.record(logbook.sum_over_processes),
                                     "lr": trainer.scheduler.get_last_lr()[0],
                                     "img_per_s": clock.rate(step, cfg.batch_size), **peak_memory(device)})
            if step % cfg.val_every == 0 or step == cfg.steps:
                val_metrics = validate(step)
            if previewer is not None and step % cfg.preview_every == 0:
                shown = preview_weights(trainer.raw_model, trainer.ema, cfg.ema_decay, step)
                with accelerator.autocast():
                    latents = previewer.save(shown, Conditioner(cond, shown, 0.0), step, cfg.run_dir, device)
                logbook.previews(step, latents)
            signum = stop.agreed() if step < cfg.steps else 0  # the last step ends the run anyway
            if step % cfg.ckpt_every == 0 or step == cfg.steps or signum:
                stop_if_diverged(trainer, step, last_good, cfg.run_dir)  # a checkpoint is only ever a good one
                window = trainer.window.state(logbook.sum_over_processes)
                if main:
                    save_checkpoint(checkpoint_path(cfg.run_dir, step),
                                    checkpoint_state(trainer, step, cond, model_cfg, manifest, parts, window))
                    prune_checkpoints(cfg.run_dir, cfg.keep_checkpoints)
                last_good = stop.last_checkpoint = step
                accelerator.wait_for_everyone()
            if signum:
                break
    accelerator.end_training()
    if signum:  # metrics are on disk, trackers closed; the lock goes when run_train returns
        raise stop.stopped(signum, step, start_step)
    if main:
        (Path(cfg.run_dir) / FINAL_FILE).write_text(json.dumps({"step": step, "val": val_metrics}, indent=1))
    return TrainResult(steps=step, final_val=val_metrics, run_dir=Path(cfg.run_dir))
