"""Everything `repa train` decides before the first step, with a one-line error for each bad case.

Conditioning and model shape come from the cache manifest (latent channels and size, DINOv2 dim
and token grid, caption dim) and the config; nothing about the cache is passed as a flag.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import cast

import numpy as np

from cache_schema import Manifest
from stages.core.errors import UsageError
from stages.core.files.checkpoint import latest_checkpoint, list_checkpoints
from stages.core.model.model_config import DEFAULT_HEAD_DIM, RAE_ARCHS, ModelConfig
from stages.core.model.model_presets import MODEL_PRESETS

from .config import TrainConfig, implied, resume_differences
from .methods import family_model_fields


def resolve_cond(cfg: TrainConfig, manifest: Manifest, labels: np.ndarray) -> str:
    has_text = manifest.text is not None
    has_labels = bool(len(labels)) and bool((labels >= 0).all())
    cond = cfg.cond
    if cond == "auto":
        cond = "text" if has_text else "class" if has_labels else "none"
    if cond == "text" and not has_text:
        raise UsageError(
            f"--cond text: cache {cfg.cache} has no caption features; re-encode with --text-encoder or use "
            "--cond class/none"
        )
    if cond == "class" and not has_labels:
        missing = int((labels < 0).sum())
        raise UsageError(
            f"--cond class: {missing} of {len(labels)} samples in cache {cfg.cache} have no class label; "
            "encode a source with .cls entries or use --cond text/none"
        )
    return cond


def build_model_config(cfg: TrainConfig, manifest: Manifest, cond: str, labels: np.ndarray,
                       shape: tuple[int, int, int] | None = None) -> ModelConfig:
    """``shape``: (C, h, w) of what the model diffuses (default: the cache's VAE latent)."""
    check_targets(cfg, manifest)
    channels, size = shape[:2] if shape else (manifest.latent["channels"], manifest.latent["size"])
    preset = dict(MODEL_PRESETS[cfg.model]) if cfg.model else {}
    num_classes = cfg.num_classes if cfg.num_classes is not None else int(labels.max(initial=-1)) + 1
    if cond == "class" and labels.size and labels.max() >= num_classes:
        raise UsageError(f"--num-classes {num_classes}: the cache holds label {int(labels.max())}; raise it")
    if cfg.head_dim or cfg.width:  # an explicit shape replaces the preset's head count
        heads, head_dim = None, cfg.head_dim or preset.get("head_dim")
    else:
        heads, head_dim = preset.get("num_heads"), preset.get("head_dim")
    align = cfg.align_layer or preset.get("align_layer") or 8
    arch = cfg.arch or preset.get("arch", "sit")
    kw = dict(
        preset=cfg.model,
        arch=arch,
        width=cfg.width or preset.get("width"),
        depth=cfg.depth or preset.get("depth"),
        head_dim=head_dim if heads is None else None,
        num_heads=heads,
        patch_size=cfg.patch_size or preset.get("patch_size") or (1 if arch in RAE_ARCHS else 2),
        in_channels=channels,
        input_size=size,
        cond=cond,
        num_classes=max(num_classes, 1),
        text_dim=cast(dict, manifest.text)["dim"] if cond == "text" else None,  # resolve_cond: text has captions
        text_mask=cfg.text_mask,
        repa_dims=tuple(manifest.target(name)["dim"] for name in cfg.target_names()) if repa_on(cfg) else (),
        align_layer=align,
        align_layers=cfg.layers() if repa_on(cfg) else (),
        projector_dim=cfg.projector_dim,
        **ddt_head(cfg, preset, head_dim),
        **family_model_fields(cfg, manifest, repa_on(cfg)),
    )
    try:
        mc = ModelConfig(**kw)
    except ValueError as e:
        flag = (("--align-layers" if cfg.align_layers else "--align-layer") if "align_layer" in str(e)
                else "--cond" if "cond=" in str(e) else "--model" if "arch" in str(e) else "--width/--depth/--head-dim")
        raise UsageError(f"{flag}: {e}") from None
    if mc.repa:
        grid = mc.input_size // mc.patch_size
        for name in cfg.target_names():
            target_grid = manifest.target(name)["grid"][0]
            if grid != target_grid:
                raise UsageError(
                    f"the model sees a {grid}x{grid} token grid (latent {mc.input_size} / patch {mc.patch_size}) but "
                    f"the cache holds a {target_grid}x{target_grid} grid for target {name}; use --patch-size "
                    f"{mc.input_size // target_grid} or --repa-lambda 0"
                )
    return mc


def ddt_head(cfg: TrainConfig, preset: dict, head_dim: int | None) -> dict:
    """DiT-DH's wide head: the preset's, or --head-width/--head-depth with heads of --head-dim (default 64)."""
    if (cfg.arch or preset.get("arch")) != "dit-dh":
        return {}
    width = cfg.head_width or preset.get("head_width", 0)
    heads = preset.get("head_heads", 0)
    if cfg.head_width or cfg.head_dim:
        heads = width // (head_dim or DEFAULT_HEAD_DIM)
    return {"head_width": width, "head_depth": cfg.head_depth or preset.get("head_depth", 0), "head_heads": heads}


def repa_on(cfg: TrainConfig) -> bool:
    lambdas = cfg.lambdas()
    return implied(cfg.repa_lambda) > 0 and (lambdas is None or max(lambdas) > 0)


def check_targets(cfg: TrainConfig, manifest: Manifest) -> list[str]:
    """--targets, each checked to be an alignment target of the cache."""
    names = cfg.target_names()
    for name in names:
        if name not in manifest.target_names():
            raise UsageError(f"--targets {cfg.targets}: cache {cfg.cache} has no target {name!r}; it has "
                             f"{', '.join(manifest.target_names())} (add one with `repa encode --add-target`)")
    return names


def check_flip(cfg: TrainConfig, manifest: Manifest) -> None:
    """--flip needs the features of the flipped crops, stored only by `repa encode --flips`."""
    if cfg.flip and not manifest.flips:
        raise UsageError(f"--flip: cache {cfg.cache} holds no features of flipped crops (encoded without --flips); "
                         "re-encode it with `repa encode --flips`, or drop --flip")


def split_batch(cfg: TrainConfig, world: int, ckpt: dict | None) -> int:
    """The micro-batches per step (gradient accumulation) that split the global batch over ``world`` processes.

    The global batch (--batch-size, of which --batch-size / --batch-multiplicity distinct images) defines the
    run; processes and accumulation only split it, each micro-batch holding whole groups of copies. --grad-accum
    is taken as given. Without it a fresh run uses 1, and a resumed one the fewest micro-batches whose
    per-process size is at most the checkpoint's, so a run resumed on fewer processes fits where it ran."""
    k = cfg.batch_multiplicity
    if cfg.batch_size % k:
        raise UsageError(f"--batch-multiplicity {k} must divide --batch-size {cfg.batch_size}")
    distinct = cfg.batch_size // k

    def unsplittable(over: str, fix: str) -> UsageError:
        return UsageError(f"--batch-size {cfg.batch_size}: its {distinct} distinct images per step (--batch-size / "
                          f"--batch-multiplicity) cannot be split evenly over {over}; {fix}")

    if distinct % world:
        raise unsplittable(f"{world} process(es)", f"run on a process count that divides {distinct}")
    per_process = distinct // world
    if cfg.grad_accum is not None:
        if per_process % cfg.grad_accum:
            raise unsplittable(f"{world} process(es) x --grad-accum {cfg.grad_accum}",
                               f"choose a --grad-accum that divides {per_process}")
        return cfg.grad_accum
    limit = saved_micro_batch(ckpt, world) or cfg.batch_size // world
    return next((a for a in range(1, per_process + 1) if per_process % a == 0 and k * per_process // a <= limit),
                per_process)


def saved_micro_batch(ckpt: dict | None, world: int) -> int | None:
    """Rows per process and micro-batch of the run that wrote ``ckpt`` (None: unknown). A checkpoint
    from before runs recorded their process count is taken to come from ``world`` processes."""
    config = (ckpt or {}).get("config", {})
    if ckpt is None or "batch_size" not in config:  # no checkpoint, or not one of `repa train` (check_resume names it)
        return None
    return config["batch_size"] // (ckpt.get("processes", world) * (config.get("grad_accum") or 1))


RUN_LOCK = ".lock"


def lock_run_dir(run: Path):
    """Create the run directory and hold its lock (an flock, released by the OS however the process
    ends, so a killed run never blocks a resume); a second training on the same directory is refused."""
    run = Path(run)
    try:
        run.mkdir(parents=True, exist_ok=True)
        handle = open(run / RUN_LOCK, "a+")
    except OSError as e:
        raise UsageError(f"--run-dir {run}: not writable ({e.strerror}); choose another directory") from None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UsageError(f"--run-dir {run} is in use by {holder}; wait for that training to end or choose another "
                         "--run-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def resumes(cfg: TrainConfig) -> bool:
    """Whether this run continues from a checkpoint: --resume-from, --resume, or by default a --run-dir that
    holds checkpoints (not after --overwrite or --no-resume)."""
    if cfg.resume_from is not None or cfg.resume:
        return True
    return cfg.resume is None and not cfg.overwrite and bool(list_checkpoints(Path(cfg.run_dir)))


def prepare_run_dir(cfg: TrainConfig, main: bool = True) -> Path | None:
    """Check the run directory (``main``: empty it for --overwrite); return the checkpoint to resume from."""
    run = Path(cfg.run_dir)
    resuming = resumes(cfg)
    if main and cfg.overwrite and not resuming:
        for entry in run.iterdir():  # everything but the lock this process holds
            if entry.name != RUN_LOCK:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--run-dir {run}: not writable ({e.strerror}); choose another directory") from None
    if cfg.resume_from is not None:
        return Path(cfg.resume_from)
    if resuming:
        ckpt = latest_checkpoint(run)
        if ckpt is None:
            raise UsageError(f"--resume: {run} holds no checkpoint; start without --resume")
        return ckpt
    if list_checkpoints(run):
        raise UsageError(f"--no-resume: --run-dir {run} already holds checkpoints; drop --no-resume to continue from "
                         "the newest, or pass --overwrite to delete them and start over")
    return None


def training_parts(cfg: TrainConfig, manifest: Manifest, ckpt: dict | None) -> dict[str, int]:
    """The parts a run reads, with their sample counts. Resuming: those it started with, so a cache that
    grew since does not change its data (a part re-encoded to another sample count is refused). Else
    every part of a complete cache; with --allow-partial, the complete parts of any cache (a part cut
    short will be redone, so it is left out)."""
    have = {p["name"]: p for p in manifest.parts}
    if ckpt is not None and "parts" in ckpt:
        parts = dict(ckpt["parts"])
        for name, count in parts.items():
            if name in have and have[name]["num_samples"] != count:
                raise UsageError(f"part {name} of cache {cfg.cache} was re-encoded since this run started ({count} -> "
                                 f"{have[name]['num_samples']} samples); resuming would change the data: start a new "
                                 "--run-dir")
        return parts
    if not manifest.complete and not cfg.allow_partial:
        raise UsageError(f"cache {cfg.cache} is {manifest.completeness()}; finish the encode (rerun the same "
                         "command) or pass --allow-partial to train on what is committed")
    return {p["name"]: p["num_samples"] for p in manifest.parts if p.get("complete", True)}


def select_training(cfg: TrainConfig, reader, train_ids: np.ndarray) -> np.ndarray:
    """The training ids whose stored similarity reaches --min-similarity (all of them without it).

    Applied after the key-hash split, to the training side only: no sample moves between training and
    validation, and validation is the same whatever the threshold."""
    if cfg.min_similarity is None:
        return train_ids
    if "similarity" not in reader.fields:
        raise UsageError(f"--min-similarity {cfg.min_similarity}: cache {cfg.cache} stores no image-caption similarity "
                         "(encoded without --similarity-model); re-encode with --similarity-model, or drop "
                         "--min-similarity")
    similarity = reader.read("similarity", train_ids)
    kept = train_ids[similarity >= cfg.min_similarity]
    if not len(kept):
        raise UsageError(f"--min-similarity {cfg.min_similarity}: no training sample of {cfg.cache} reaches it (stored "
                         f"similarities go up to {similarity.max(initial=float('nan')):.4f}); lower it")
    return kept


def _saved_model_config(saved: dict) -> dict | None:
    """A checkpoint's model config with fields added since it was written at their defaults."""
    try:
        return asdict(ModelConfig(**saved))
    except (TypeError, ValueError):
        return None


def check_resume(ckpt: dict, path: Path, cfg: TrainConfig, manifest: Manifest, model_cfg: ModelConfig) -> dict:
    """The checkpoint, after checking it was made by the same config on the same cache."""
    diff = resume_differences(ckpt["config"], cfg.to_json())
    if _saved_model_config(ckpt["model_config"]) != asdict(model_cfg):
        diff.append("model shape (from the cache manifest)")
    if diff:
        raise UsageError(f"cannot resume from {path}: settings differ ({'; '.join(diff)}); use the original settings "
                         "or a new --run-dir")
    if ckpt["fingerprint"] != manifest.fingerprint:
        raise UsageError(
            f"cannot resume from {path}: it was trained on cache fingerprint {ckpt['fingerprint']}, "
            f"{cfg.cache} has {manifest.fingerprint}; point --cache at the original cache"
        )
    return ckpt
