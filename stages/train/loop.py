"""`repa train`: SiT + rectified flow + REPA under accelerate, fed only by the feature cache.

Reads top to bottom: helpers, then ``run_train`` (set-up, then the loop, each step a named call).
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
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from cache_schema import read_manifest, settings_diff
from cache_schema.storage.fsutil import atomic_write_json
from stages.core.data.split import split_cache
from stages.core.diffusion.family_settings import FamilySettings
from stages.core.diffusion.objective import batch_loss_terms, latent_normalisation, sample_latents
from stages.core.errors import UsageError
from stages.core.files.checkpoint import (
    checkpoint_contents,
    checkpoint_path,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from stages.core.files.run_files import CONFIG_FILE, FINAL_FILE
from stages.core.model.conditioning import Conditioner
from stages.core.model.network import build_model, count_parameters
from stages.core.options import check
from stages.core.runtime.cuda_settings import fast_cuda_math
from stages.core.runtime.progress import progress_bar
from stages.core.runtime.threads import set_threads

from .config import TrainConfig
from .data import CacheBatchDataset, EpochBatchSampler, make_loader
from .draws import StepDraws, draw_step
from .metrics import TrainWindow, append_metrics, tracker_values, truncate_metrics, write_curves
from .optim import make_optimizer, write_parameter_table
from .prefetch import DevicePrefetcher
from .previews import Previewer, latent_grid, preview_weights
from .setup import (
    build_model_config,
    check_flip,
    check_resume,
    lock_run_dir,
    prepare_run_dir,
    resolve_cond,
    select_training,
    split_batch,
    training_parts,
)
from .stopping import TrainStop
from .trackers import check_trackers, log_image, make_trackers, start_trackers, tracker_config
from .validation import Validator

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


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    accelerator = Accelerator(
        mixed_precision=resolve_precision(cfg.mixed_precision),
        log_with=make_trackers(cfg) or None,
        project_dir=str(cfg.run_dir),
        cpu=not torch.cuda.is_available(),
    )
    fast_cuda_math(accelerator.device, autotune=False)  # caption lengths vary: autotuning would re-run per shape
    return accelerator


def micro_step(forward, conditioner: Conditioner, batch: dict, draws: StepDraws, repa_lambda: float, latent: dict,
               targets: list[str] = ("dino",), lambdas: list[float] | None = None,
               family: FamilySettings | None = None):
    """Forward one micro-batch: (loss, per-sample denoise loss, per-sample REPA cosine, t); the last three detached.

    ``batch`` holds the distinct images, ``draws`` their draws (``StepDraws.piece``): one latent is sampled per
    image and repeated ``draws.multiplicity`` times with the rest of the batch (``tile``), each copy with its
    own t, noise and dropout, as repa-rf samples ``latent_dist`` before its ``.repeat``. ``targets``: the
    alignment targets in projector order; ``lambdas``: their weights (else ``repa_lambda``); ``family``: what
    the --method adds to REPA (stages.core.diffusion.family)."""
    x = tile_rows(sample_latents(batch["moments"], *latent_normalisation(latent), noise=draws.latent_noise),
                  draws.multiplicity)
    batch = tile({k: v for k, v in batch.items() if k != "moments"}, draws.multiplicity)
    terms = batch_loss_terms(forward, batch, x, draws.noise, draws.t, conditioner(batch, drop=draws.drop), targets,
                             family, cls_noise=draws.cls_noise)
    return terms.total(repa_lambda, lambdas), terms.denoise.detach(), terms.cosine(), draws.t


def optimizer_update(accelerator, model, optimizer, scheduler, grad_clip: float) -> torch.Tensor:
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
    accelerator: object
    model: torch.nn.Module  # as prepared by accelerate (DDP-wrapped on several processes)
    forward: object  # the model, compiled or not
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    conditioner: Conditioner
    latent: dict
    window: TrainWindow
    param_table: list[dict]  # lr and weight decay of every parameter
    nonfinite: torch.Tensor | None = None  # on the device: set once a loss or gradient norm was not finite
    cls_dim: int | None = None  # REG: the width of the class token it denoises (its path noise is a step draw)

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
        cfg, device = self.cfg, self.accelerator.device
        accum, world, rank = cfg.grad_accum, self.accelerator.num_processes, self.accelerator.process_index
        family = cfg.family(step)
        draws = draw_step(cfg.seed, step, cfg.batch_size // cfg.batch_multiplicity, cfg.batch_multiplicity,
                          self.latent, cfg.time_sampling, self.conditioner, device,
                          cls_dim=self.cls_dim if family.class_token else None)
        for m in range(accum):
            piece = draws.piece(rank, m, world, accum)
            with nullcontext() if m == accum - 1 else self.accelerator.no_sync(self.model):
                loss, denoise, cos, t = micro_step(self.forward, self.conditioner, next(batches), piece,
                                                   cfg.repa_lambda, self.latent, cfg.target_names(), cfg.lambdas(),
                                                   family)
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


def build_trainer(cfg: TrainConfig, accelerator, model_cfg, cond: str, latent: dict) -> Trainer:
    """A fresh model (seeded), its EMA, optimizer and schedule, prepared by accelerate. ``cfg.grad_accum``
    None (not derived by ``split_batch``): one micro-batch per step."""
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
                   TrainWindow(device), table)


def restore(trainer: Trainer, ckpt: dict) -> int:
    """Load a checkpoint's weights, EMA, optimizer, schedule and RNG into ``trainer``; returns its step."""
    trainer.raw_model.load_state_dict(ckpt["model"])
    trainer.ema.load_state_dict(ckpt["ema"])
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
    return int(ckpt["step"])


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
        window=window)


class Diverged(UsageError):
    """Training met a non-finite loss or gradient; nothing after the last good checkpoint was kept."""


def stop_if_diverged(trainer: Trainer, step: int, last_good: int | None, run_dir: Path) -> None:
    if trainer.diverged() or not trainer.weights_finite():
        where = (f"the last good checkpoint is {checkpoint_path(run_dir, last_good)} (the same command resumes from "
                 "it, and meets the same data)" if last_good else "no checkpoint was written yet")
        raise Diverged(f"step {step}: the loss or gradient became non-finite (NaN/inf) since the last check; {where}; "
                       "check the cache with `repa cache verify`, or start over with a lower --lr in a new --run-dir")


def validation_cache(cfg: TrainConfig, manifest, needs: dict) -> tuple[CacheBatchDataset, np.ndarray]:
    """The --val-cache dataset and its ids; it must hold features made exactly as the training cache's."""
    val_manifest = read_manifest(cfg.val_cache)
    if val_manifest.fingerprint != manifest.fingerprint:
        diff = "; ".join(settings_diff(manifest.settings, val_manifest.settings)) or "fingerprint"
        raise UsageError(f"--val-cache {cfg.val_cache}: encoded with other settings than {cfg.cache} ({diff}); "
                         "encode the validation shards with the same settings")
    for name in cfg.target_names():
        if name in manifest.targets and val_manifest.targets.get(name, {}).get("fingerprint") != \
                manifest.targets[name]["fingerprint"]:
            raise UsageError(f"--val-cache {cfg.val_cache}: target {name} is missing or made with other settings than "
                             f"in {cfg.cache}; add it with the same `repa encode --add-target {name}` command")
    dataset = CacheBatchDataset(cfg.val_cache, **needs)
    return dataset, np.arange(len(dataset), dtype=np.int64)


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

    def __init__(self, cfg: TrainConfig, accelerator, start_step: int):
        self.run_dir, self.accelerator = Path(cfg.run_dir), accelerator
        self.main = accelerator.is_main_process
        self.repa = cfg.repa_lambda > 0
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


def train(cfg: TrainConfig, manifest, accelerator, log, stop: TrainStop | None = None) -> TrainResult:
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    set_threads(cfg.threads, cfg.num_workers)
    check_flip(cfg, manifest)
    resume_path = prepare_run_dir(cfg, main)
    ckpt = load_checkpoint(resume_path) if resume_path is not None else None
    parts = training_parts(cfg, manifest, ckpt)

    # -- data: conditioning, model shape and split come from the cache ---------------------------
    probe = CacheBatchDataset(cfg.cache, need_dino=False, need_text=False, need_label=True, parts=list(parts))
    reader = probe.reader
    labels = reader.index_arrays()["label"]
    cond = resolve_cond(cfg, manifest, labels)
    model_cfg = build_model_config(cfg, manifest, cond, labels)
    repa = model_cfg.repa
    cfg = replace(cfg, grad_accum=split_batch(cfg, world, ckpt))
    micro = cfg.batch_size // (world * cfg.grad_accum)  # rows per process and micro-batch, copies included
    train_ids, val_ids = split_cache(reader, cfg.val_fraction)
    train_ids = select_training(cfg, reader, train_ids)
    needs = dict(need_dino=repa, need_text=cond == "text", need_label=cond == "class", targets=cfg.target_names(),
                 class_tokens=cfg.class_token_weight > 0)
    # validation reads it unflipped
    dataset = CacheBatchDataset(cfg.cache, parts=list(parts), flips=cfg.flip, index=reader.index_arrays(), **needs)
    val_dataset = dataset
    if cfg.val_cache is not None:
        val_dataset, val_ids = validation_cache(cfg, manifest, needs)
    try:
        first_epoch = EpochBatchSampler(train_ids, micro // cfg.batch_multiplicity, cfg.seed, rank, world,
                                        name=f"the training split of {cfg.cache}", flip=cfg.flip,
                                        grad_accum=cfg.grad_accum)
    except ValueError as e:
        raise UsageError(f"--batch-size {cfg.batch_size}: {e}") from None

    # -- model, optimizer, resume -----------------------------------------------------------------
    trainer = build_trainer(cfg, accelerator, model_cfg, cond, manifest.latent)
    if cfg.class_token_weight > 0:  # REG denoises the first target's class token
        first = cfg.target_names()[0]
        trainer.cls_dim = int((manifest.dino if first == "dino" else manifest.targets[first])["dim"])
    start_step = 0
    if ckpt is not None:
        start_step = restore(trainer, check_resume(ckpt, resume_path, cfg, manifest, model_cfg))
        if "window" in ckpt:
            trainer.window.load(ckpt["window"], main)
        old_draws = "processes" not in ckpt
        del ckpt
        if start_step >= cfg.steps:  # a finished run, rerun: nothing to do, nothing touched
            if main:
                log(f"{cfg.run_dir} is already trained to step {start_step} (--steps {cfg.steps}); nothing to do "
                    "(raise --steps to train further)")
            return TrainResult(steps=start_step, final_val=None, run_dir=Path(cfg.run_dir))
        if main:
            log(f"resumed from {resume_path} at step {start_step}")
            if old_draws:
                log(f"{resume_path} was written by a version whose data order and noise depended on the rank: the "
                    "run goes on from its weights and optimizer state with draws keyed by position in the global "
                    "batch, so it is not the step-for-step continuation an earlier version would have run")
    if main:  # a resumed run logs the steps after its checkpoint again; a fresh one starts from nothing
        truncate_metrics(cfg.run_dir, start_step)
    sampler = EpochBatchSampler(train_ids, micro // cfg.batch_multiplicity, cfg.seed, rank, world,
                                start=first_epoch.position_after(start_step), flip=cfg.flip, grad_accum=cfg.grad_accum)
    # Under torch.compile captions are padded to the cache's maximum, so every step has the same shapes.
    text_length = manifest.settings.get("max_text_tokens") if cfg.compile and cond == "text" else None
    batches = DevicePrefetcher(iter(make_loader(dataset, sampler, cfg.num_workers, pin_memory=device.type == "cuda")),
                               device, text_length)
    validator = None
    if len(val_ids):
        validator = Validator(val_dataset, val_ids, cfg.max_val_samples, max(micro, 1), manifest.latent, rank, world,
                              device, repa=repa, targets=cfg.target_names(), family=cfg.family())
    previewer = None
    if cfg.preview_every and main and len(val_ids):
        previewer = Previewer(val_dataset, val_ids, manifest.latent)

    # -- bookkeeping: config.json, trackers, progress ---------------------------------------------
    params = count_parameters(trainer.raw_model)
    if main:
        atomic_write_json(Path(cfg.run_dir) / CONFIG_FILE, {
            "config": cfg.to_json(), "model_config": asdict(model_cfg), "cond": cond, "parameters": params,
            "cache_fingerprint": manifest.fingerprint, "train_samples": len(train_ids), "val_samples": len(val_ids),
            "parts": len(parts), "cache_status": manifest.completeness(),
            "val_cache": str(cfg.val_cache) if cfg.val_cache else None,
        })
        write_parameter_table(cfg.run_dir, trainer.param_table)
        log(f"train: {model_cfg.preset or 'custom'} width {model_cfg.width} depth {model_cfg.depth} "
            f"({params / 1e6:.2f} M params), cond={cond}, method {cfg.method}, "
            + (f"REPA lambda={cfg.target_lambdas or cfg.repa_lambda} to {cfg.targets or 'dino'} at block "
               f"{cfg.align_layers or model_cfg.align_layer}, " if repa else "no REPA, ")
            + f"{len(train_ids)} train / {len(val_ids)} val samples"
            + (f" (from {cfg.val_cache})" if cfg.val_cache else "" if len(val_ids) else " (no validation)")
            + f", batch {cfg.batch_size} = {world} proc x {cfg.grad_accum} accum x {micro}"
            + (f" ({micro // cfg.batch_multiplicity} distinct x {cfg.batch_multiplicity})"
               if cfg.batch_multiplicity > 1 else "") + f", device {device}")
    start_trackers(accelerator, cfg, tracker_config(cfg, params, manifest.fingerprint), start_step)
    stop = stop or TrainStop(cfg)
    stop.join(accelerator)
    stop.last_checkpoint = start_step or None

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
