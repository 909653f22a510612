"""Starting a run, in the order ``loop.train`` calls it: what the cache gives the run (``plan_data``), what is
diffused (``diffusion_variable``), what a checkpoint restores (``resume``), what feeds the loop (``feeds``) and
what the run records about itself (``record_start``). Each user error is raised here, before the first step."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import numpy as np

from cache_schema import read_manifest, settings_diff
from cache_schema.storage.fsutil import atomic_write_json
from stages.core.data.split import split_cache
from stages.core.diffusion.diffusion_variable import TargetTokens
from stages.core.errors import UsageError
from stages.core.files.checkpoint import set_rng_state
from stages.core.files.run_files import CONFIG_FILE
from stages.core.model.model_config import ModelConfig
from stages.core.model.network import count_parameters

from .config import Alignment, TrainConfig
from .data import CacheBatchDataset, EpochBatchSampler, make_loader
from .metrics import truncate_metrics
from .optim import write_parameter_table
from .prefetch import DevicePrefetcher
from .previews import Previewer
from .rae_tokens import diffused_target, token_variable
from .setup import build_model_config, check_resume, resolve_cond, select_training, split_batch, training_parts
from .validation import Validator

if TYPE_CHECKING:
    from accelerate import Accelerator


class DatasetNeeds(TypedDict, total=False):
    """What the run's datasets read (``CacheBatchDataset``'s keyword arguments), the same for a --val-cache."""

    need_dino: bool
    need_text: bool
    need_label: bool
    targets: list[str]
    class_tokens: bool
    need_moments: bool


@dataclass
class RunData:
    """What the cache gives a run, decided once at its start."""

    cfg: TrainConfig  # grad_accum derived (split_batch)
    parts: dict[str, int]  # the parts it trains on, fixed for the whole run
    cond: str
    model_cfg: ModelConfig
    alignment: Alignment
    micro: int  # rows per process and micro-batch, copies included
    train_ids: np.ndarray
    val_ids: np.ndarray
    dataset: CacheBatchDataset
    val_dataset: CacheBatchDataset
    first_epoch: EpochBatchSampler  # the order of the run's first epoch: where a resumed run finds its place


def plan_data(cfg: TrainConfig, manifest, accelerator: Accelerator, ckpt: dict | None) -> RunData:
    """Conditioning, model shape, split and datasets, all from the cache (and the checkpoint, when resuming)."""
    world = accelerator.num_processes
    parts = training_parts(cfg, manifest, ckpt)
    reader = CacheBatchDataset(cfg.cache, need_dino=False, need_text=False, need_label=True, parts=list(parts)).reader
    labels = reader.index_arrays()["label"]
    cond = resolve_cond(cfg, manifest, labels)
    shape = None
    if cfg.diffuse:  # RAE: the model's input is the target's token grid
        record = diffused_target(cfg, manifest)
        shape = (record["dim"], *record["grid"])
    model_cfg = build_model_config(cfg, manifest, cond, labels, shape)
    alignment = cfg.alignment()
    grad_accum = split_batch(cfg, world, ckpt)
    cfg = replace(cfg, grad_accum=grad_accum)
    micro = cfg.batch_size // (world * grad_accum)
    train_ids, val_ids = split_cache(reader, cfg.val_fraction)
    train_ids = select_training(cfg, reader, train_ids)
    needs = DatasetNeeds(need_dino=model_cfg.repa, need_text=cond == "text", need_label=cond == "class",
                         targets=list(alignment.targets), class_tokens=cfg.family().class_token)
    if cfg.diffuse:
        needs.update(DatasetNeeds(need_dino=True, targets=[cfg.diffuse], need_moments=False))
    # Validation reads the training dataset unflipped.
    dataset = CacheBatchDataset(cfg.cache, parts=list(parts), flips=cfg.flip, index=reader.index_arrays(), **needs)
    val_dataset = dataset
    if cfg.val_cache is not None:
        val_dataset, val_ids = validation_cache(cfg, manifest, needs, alignment)
    try:
        first_epoch = EpochBatchSampler(train_ids, micro // cfg.batch_multiplicity, cfg.seed, accelerator.process_index,
                                        world, name=f"the training split of {cfg.cache}", flip=cfg.flip,
                                        grad_accum=grad_accum)
    except ValueError as e:
        raise UsageError(f"--batch-size {cfg.batch_size}: {e}") from None
    return RunData(cfg, parts, cond, model_cfg, alignment, micro, train_ids, val_ids, dataset, val_dataset,
                   first_epoch)


def validation_cache(cfg: TrainConfig, manifest, needs: DatasetNeeds,
                     alignment: Alignment) -> tuple[CacheBatchDataset, np.ndarray]:
    """The --val-cache dataset and its ids; it must hold features made exactly as the training cache's."""
    assert cfg.val_cache is not None  # called for a --val-cache only
    val_manifest = read_manifest(cfg.val_cache)
    if val_manifest.fingerprint != manifest.fingerprint:
        diff = "; ".join(settings_diff(manifest.settings, val_manifest.settings)) or "fingerprint"
        raise UsageError(f"--val-cache {cfg.val_cache}: encoded with other settings than {cfg.cache} ({diff}); "
                         "encode the validation shards with the same settings")
    for name in [*alignment.targets, *([cfg.diffuse] if cfg.diffuse else [])]:
        if name in manifest.targets and val_manifest.targets.get(name, {}).get("fingerprint") != \
                manifest.targets[name]["fingerprint"]:
            raise UsageError(f"--val-cache {cfg.val_cache}: target {name} is missing or made with other settings than "
                             f"in {cfg.cache}; add it with the same `repa encode --add-target {name}` command")
    dataset = CacheBatchDataset(cfg.val_cache, **needs)
    return dataset, np.arange(len(dataset), dtype=np.int64)


def diffusion_variable(data: RunData, manifest, ckpt: dict | None, accelerator: Accelerator,
                       log) -> TargetTokens | None:
    """RAE's token variable of a --diffuse run (its statistics: the checkpoint's, else loaded or computed);
    None: the VAE latents."""
    if not data.cfg.diffuse:
        return None
    if ckpt is not None and ckpt.get("diffusion"):
        return TargetTokens.from_record(ckpt["diffusion"])  # the statistics the run started with
    return token_variable(data.cfg, manifest, data.dataset, data.train_ids, accelerator, log)


def restore(trainer, ckpt: dict) -> int:
    """Load a checkpoint's weights, EMA, optimizer, schedule and RNG into ``trainer``; returns its step."""
    trainer.raw_model.load_state_dict(ckpt["model"])
    trainer.ema.load_state_dict(ckpt["ema"])
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
    return int(ckpt["step"])


def resume(trainer, ckpt: dict, path: Path, data: RunData, manifest, log) -> int:
    """Restore ``trainer`` from ``ckpt`` (checked against this run) and say so; returns its step."""
    main = trainer.accelerator.is_main_process
    step = restore(trainer, check_resume(ckpt, path, data.cfg, manifest, data.model_cfg))
    if "window" in ckpt:
        trainer.window.load(ckpt["window"], main)
    if main and step < data.cfg.steps:
        log(f"resumed from {path} at step {step}")
        if "processes" not in ckpt:
            log(f"{path} was written by a version whose data order and noise depended on the rank: the "
                "run goes on from its weights and optimizer state with draws keyed by position in the global "
                "batch, so it is not the step-for-step continuation an earlier version would have run")
    return step


@dataclass
class Feeds:
    batches: DevicePrefetcher
    validator: Validator | None
    previewer: Previewer | None


def feeds(data: RunData, trainer, manifest, start_step: int) -> Feeds:
    """The training batches from ``start_step`` on, the validator and the previewer."""
    cfg, accelerator = data.cfg, trainer.accelerator
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:  # a resumed run logs the steps after its checkpoint again; a fresh one starts anew
        truncate_metrics(cfg.run_dir, start_step)
    sampler = EpochBatchSampler(data.train_ids, data.micro // cfg.batch_multiplicity, cfg.seed, rank, world,
                                start=data.first_epoch.position_after(start_step), flip=cfg.flip,
                                grad_accum=data.first_epoch.grad_accum)
    # Under torch.compile captions are padded to the cache's maximum, so every step has the same shapes.
    text_length = manifest.settings.get("max_text_tokens") if cfg.compile and data.cond == "text" else None
    batches = DevicePrefetcher(iter(make_loader(data.dataset, sampler, cfg.num_workers,
                                                pin_memory=device.type == "cuda")), device, text_length)
    validator = None
    if len(data.val_ids):
        validator = Validator(data.val_dataset, data.val_ids, cfg.max_val_samples, max(data.micro, 1),
                              manifest.latent, rank, world, device, repa=data.model_cfg.repa,
                              targets=list(data.alignment.targets), family=cfg.family(), variable=trainer.variable)
    previewer = None
    if cfg.preview_every and accelerator.is_main_process and len(data.val_ids):
        previewer = Previewer(data.val_dataset, data.val_ids, manifest.latent)
    return Feeds(batches, validator, previewer)


def record_start(data: RunData, trainer, manifest, log) -> int:
    """config.json, the parameter table and the run's one-line description; returns the parameter count."""
    cfg, model_cfg, accelerator = data.cfg, data.model_cfg, trainer.accelerator
    params = count_parameters(trainer.raw_model)
    if not accelerator.is_main_process:
        return params
    atomic_write_json(Path(cfg.run_dir) / CONFIG_FILE, {
        "config": cfg.to_json(), "model_config": asdict(model_cfg), "cond": data.cond, "parameters": params,
        "cache_fingerprint": manifest.fingerprint, "train_samples": len(data.train_ids),
        "val_samples": len(data.val_ids), "parts": len(data.parts), "cache_status": manifest.completeness(),
        "val_cache": str(cfg.val_cache) if cfg.val_cache else None,
    })
    write_parameter_table(cfg.run_dir, trainer.param_table)
    variable, world, micro = trainer.variable, accelerator.num_processes, data.micro
    tokens = isinstance(variable, TargetTokens)
    log(f"train: {model_cfg.preset or 'custom'} width {model_cfg.width} depth {model_cfg.depth} "
        f"({params / 1e6:.2f} M params), cond={data.cond}, method {cfg.method}, "
        + (f"diffusing the tokens of {cfg.diffuse} {variable.shape} (time shift {variable.shift:.3f}), "
           if tokens else "")
        + (f"REPA lambda={cfg.target_lambdas or cfg.repa_lambda} to {cfg.targets or 'dino'} at block "
           f"{cfg.align_layers or model_cfg.align_layer}, " if model_cfg.repa else "no REPA, ")
        + f"{len(data.train_ids)} train / {len(data.val_ids)} val samples"
        + (f" (from {cfg.val_cache})" if cfg.val_cache else "" if len(data.val_ids) else " (no validation)")
        + f", batch {cfg.batch_size} = {world} proc x {cfg.grad_accum} accum x {micro}"
        + (f" ({micro // cfg.batch_multiplicity} distinct x {cfg.batch_multiplicity})"
           if cfg.batch_multiplicity > 1 else "") + f", device {accelerator.device}")
    return params
