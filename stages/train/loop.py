"""`repa train`: SiT + rectified flow + REPA under accelerate, fed only by the feature cache.

Reads top to bottom: helpers, then ``run_train``. Progress is counted in optimizer steps; all
randomness of step ``s`` (latent sampling, t, noise, label/caption dropout) comes from a generator
seeded with (seed, rank, s, micro-batch) and the data order from (seed, epoch), so a run resumed
from a checkpoint continues bit-for-bit where the interrupted one stopped.
"""

from __future__ import annotations

import copy
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cache_schema import UsageError, read_manifest
from cache_schema.fsutil import atomic_write_json

from .checkpoint import checkpoint_path, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .data import CacheBatchDataset, EpochBatchSampler, make_loader, split_ids, to_device
from .metrics import CURVES_FILE, append_metrics, plot_curves, read_metrics, truncate_metrics
from .model import SiT, count_parameters, repa_loss_per_sample
from .objective import NUM_T_BINS, bin_by_t, denoise_loss_per_sample, interpolate, sample_latents, sample_t
from .previews import Previewer
from .setup import build_model_config, check_resume, prepare_run_dir, resolve_cond
from .validation import Validator

#################################################################################
#                                    Helpers                                    #
#################################################################################


def step_generator(seed: int, rank: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    """The generator for one micro-batch: a pure function of its position in the run."""
    state = int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(state)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return f


def resolve_precision(name: str) -> str:
    if name == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return name


class Conditioner:
    """Turns a batch into the model's conditioning keywords, with dropout to the null condition."""

    def __init__(self, cond: str, model: SiT, dropout: float):
        self.cond, self.model, self.dropout = cond, model, dropout

    def __call__(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        drop = None
        if generator is not None and self.dropout > 0 and self.cond != "none":
            n = batch["moments"].shape[0]
            drop = torch.rand(n, generator=generator, device=batch["moments"].device) < self.dropout
        if self.cond == "class":
            y = batch["label"]
            return {"y": y if drop is None else torch.where(drop, torch.full_like(y, self.model.null_class), y)}
        if self.cond == "text":
            text, mask = batch["text"].float(), batch["text_mask"]
            if text.shape[1] == 0:  # every caption in the batch has zero tokens: attend to one masked slot
                text = text.new_zeros(text.shape[0], 1, text.shape[2])
                mask = mask.new_zeros(mask.shape[0], 1)
            if drop is not None:
                null, null_mask = self.model.null_text(text.shape[0], text.shape[1])
                text = torch.where(drop[:, None, None], null.to(text.dtype), text)
                mask = torch.where(drop[:, None], null_mask, mask)
            return {"text": text, "text_mask": mask}
        return {}


def micro_step(forward, conditioner: Conditioner, batch: dict, gen: torch.Generator, cfg: TrainConfig,
               scale: float, shift: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward one micro-batch: (loss, per-sample denoise loss, per-sample REPA cosine, t); the last three detached."""
    x = sample_latents(batch["moments"], scale, shift, gen)
    t = sample_t(x.shape[0], cfg.time_sampling, gen, x.device)
    noise = torch.randn(x.shape, generator=gen, device=x.device)
    x_t, v = interpolate(x, noise, t)
    pred, proj = forward(x_t, t, **conditioner(batch, gen))
    denoise = denoise_loss_per_sample(pred, v)
    loss = denoise.mean()
    cos = torch.zeros_like(denoise)
    if proj is not None:
        repa = repa_loss_per_sample(proj, batch["dino"])
        loss = loss + cfg.repa_lambda * repa.mean()
        cos = -repa.detach()
    return loss, denoise.detach(), cos, t


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
class TrainResult:
    steps: int
    final_val: dict | None
    run_dir: Path


#################################################################################
#                                 Training loop                                 #
#################################################################################


def run_train(cfg: TrainConfig, log=print) -> TrainResult:
    from accelerate import Accelerator

    cfg.validate()
    manifest = read_manifest(cfg.cache)
    resume_path = prepare_run_dir(cfg)
    accelerator = Accelerator(
        mixed_precision=resolve_precision(cfg.mixed_precision),
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(cfg.run_dir),
        cpu=not torch.cuda.is_available(),
    )
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # -- data ---------------------------------------------------------------------------------
    dataset_probe = CacheBatchDataset(cfg.cache, need_dino=False, need_text=False, need_label=False)
    reader = dataset_probe.reader
    labels = reader.read("label", np.arange(len(reader))) if len(reader) else np.zeros(0, np.int64)
    cond = resolve_cond(cfg, manifest, labels)
    model_cfg = build_model_config(cfg, manifest, cond, labels)
    per_step = world * cfg.grad_accum
    if cfg.batch_size % per_step:
        raise UsageError(f"--batch-size {cfg.batch_size} must be divisible by processes x --grad-accum = {per_step}")
    micro = cfg.batch_size // per_step
    train_ids, val_ids = split_ids(reader.keys, cfg.val_fraction)
    dataset = CacheBatchDataset(cfg.cache, need_dino=model_cfg.repa_dim is not None,
                                need_text=cond == "text", need_label=cond == "class")
    try:
        probe = EpochBatchSampler(train_ids, micro, cfg.seed, rank, world, name=f"the training split of {cfg.cache}")
    except ValueError as e:
        raise UsageError(f"--batch-size {cfg.batch_size}: {e}") from None

    # -- model, optimizer, resume -------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = SiT(model_cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay,
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    start_step = 0
    if resume_path is not None:
        ckpt = check_resume(resume_path, cfg, manifest, model_cfg)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        start_step = ckpt["step"]
        if main:
            truncate_metrics(cfg.run_dir, start_step)
            log(f"resumed from {resume_path} at step {start_step}")
    elif main:
        truncate_metrics(cfg.run_dir, 0)  # a fresh start: records of an earlier, checkpoint-less attempt go
    if start_step >= cfg.steps:
        raise UsageError(f"--steps {cfg.steps}: the run is already at step {start_step}; raise --steps to continue")
    ema.to(device)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    forward = torch.compile(model) if cfg.compile else model
    conditioner = Conditioner(cond, raw_model, cfg.cond_dropout)

    sampler = EpochBatchSampler(train_ids, micro, cfg.seed, rank, world,
                                start=probe.position_after(start_step * cfg.grad_accum))
    loader = make_loader(dataset, sampler, cfg.num_workers, pin_memory=device.type == "cuda")
    validator = Validator(dataset, val_ids, cfg.max_val_samples, max(micro, 1), manifest.latent, rank, world, device)
    scale, shift = manifest.latent["scaling_factor"], manifest.latent["shift_factor"]
    previewer = None
    if cfg.preview_every and main and len(val_ids):
        previewer = Previewer(cfg.cache, dataset, val_ids, manifest.latent)

    params = count_parameters(raw_model)
    if main:
        atomic_write_json(Path(cfg.run_dir) / "config.json", {
            "config": cfg.to_json(), "model_config": asdict(model_cfg), "cond": cond, "parameters": params,
            "cache_fingerprint": manifest.fingerprint, "train_samples": len(train_ids), "val_samples": len(val_ids),
        })
        log(f"train: {model_cfg.preset or 'custom'} width {model_cfg.width} depth {model_cfg.depth} "
            f"({params / 1e6:.2f} M params), cond={cond}, REPA lambda={cfg.repa_lambda} at block {model_cfg.align_layer}, "
            f"{len(train_ids)} train / {len(val_ids)} val samples, batch {cfg.batch_size} = {world} proc x "
            f"{cfg.grad_accum} accum x {micro}, device {device}")
    if cfg.report_to != "none":
        accelerator.init_trackers("tb", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                for k, v in cfg.to_json().items()})

    bar = tqdm(total=cfg.steps, initial=start_step, unit="step", disable=not main, dynamic_ncols=True, desc="train")

    def reduce_sum(t: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(t, reduction="sum") if world > 1 else t

    def validate(step: int) -> dict:
        metrics = validator.run(forward, conditioner, reduce_sum)
        if main:
            record = {"kind": "val", "step": step, **metrics}
            append_metrics(cfg.run_dir, record)
            plot_curves(read_metrics(cfg.run_dir), Path(cfg.run_dir) / CURVES_FILE, title=str(cfg.run_dir))
            accelerator.log({f"val/{k}": v for k, v in metrics.items() if not isinstance(v, list)}, step=step)
            accelerator.log({f"val_bins/denoise_t{i}": v for i, v in enumerate(metrics["denoise_bins"])}, step=step)
            bar.write(f"step {step}: val denoise {metrics['denoise']:.4f}"
                      + (f", REPA cosine {metrics['repa_cos']:.3f}" if "repa_cos" in metrics else ""))
        return metrics

    def save(step: int) -> None:
        if main:
            state = {
                "step": step, "model": raw_model.state_dict(), "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                "data_position": sampler.position_after((step - start_step) * cfg.grad_accum),
                "config": cfg.to_json(), "model_config": asdict(model_cfg), "cond": cond,
                "fingerprint": manifest.fingerprint, "latent": manifest.latent, "cache": str(cfg.cache),
            }
            save_checkpoint(checkpoint_path(cfg.run_dir, step), state, cfg.keep_checkpoints)
        accelerator.wait_for_everyone()

    # -- the loop -------------------------------------------------------------------------------
    model.train()
    batches = iter(loader)
    window = torch.zeros(5, dtype=torch.float64, device=device)  # loss, denoise, cos, grad norm, steps
    bins = torch.zeros(3, NUM_T_BINS, dtype=torch.float64, device=device)  # denoise, cos, count
    last_log, last_log_step = time.perf_counter(), start_step
    # A fresh run is validated before its first step, so every curve starts from the untrained model.
    val_metrics = validate(0) if start_step == 0 else None
    step = start_step
    for step in range(start_step + 1, cfg.steps + 1):
        for m in range(cfg.grad_accum):
            batch = to_device(next(batches), device)
            gen = step_generator(cfg.seed, rank, step, m, device)
            with nullcontext() if m == cfg.grad_accum - 1 else accelerator.no_sync(model):
                loss, denoise, cos, t = micro_step(forward, conditioner, batch, gen, cfg, scale, shift)
                accelerator.backward(loss / cfg.grad_accum)
            window[:3] += torch.stack([loss.detach(), denoise.mean(), cos.mean()]).double() / cfg.grad_accum
            denoise_sum, counts = bin_by_t(denoise, t)
            bins[0] += denoise_sum
            bins[1] += bin_by_t(cos, t)[0]
            bins[2] += counts
        grad_norm = optimizer_update(accelerator, model, optimizer, scheduler, cfg.grad_clip)
        update_ema(ema, raw_model, cfg.ema_decay)
        window[3] += grad_norm.detach().double()  # stays on the device: no sync per step
        window[4] += 1
        bar.update(1)

        if step % cfg.log_every == 0 or step == cfg.steps:
            w, b = reduce_sum(window.clone()), reduce_sum(bins.clone())
            n = w[4].clamp_min(1)
            now = time.perf_counter()
            rate = (step - last_log_step) * cfg.batch_size / (now - last_log)
            record = {
                "kind": "train", "step": step, "loss": float(w[0] / n), "denoise": float(w[1] / n),
                "repa_cos": float(w[2] / n), "grad_norm": float(w[3] / n), "lr": scheduler.get_last_lr()[0],
                "img_per_s": rate, "denoise_bins": (b[0] / b[2].clamp_min(1)).tolist(),
                "repa_cos_bins": (b[1] / b[2].clamp_min(1)).tolist(),
            }
            if main:
                append_metrics(cfg.run_dir, record)
                accelerator.log({f"train/{k}": v for k, v in record.items() if isinstance(v, float)}, step=step)
                bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{rate:.0f}", refresh=False)
            window.zero_()
            bins.zero_()
            last_log, last_log_step = now, step
        if step % cfg.val_every == 0 or step == cfg.steps:
            val_metrics = validate(step)
        if previewer is not None and step % cfg.preview_every == 0:
            with accelerator.autocast():
                previewer.save(ema, Conditioner(cond, ema, 0.0), step, cfg.run_dir, device)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save(step)
    bar.close()
    accelerator.end_training()
    if main:
        (Path(cfg.run_dir) / "final.json").write_text(json.dumps({"step": step, "val": val_metrics}, indent=1))
    return TrainResult(steps=step, final_val=val_metrics, run_dir=Path(cfg.run_dir))
