"""`repa train --diffuse TARGET`: what the run diffuses when it is an alignment target's tokens (RAE).

Checks that the cache holds the tokens in a form RAE's latent can use (one error line naming the command
that provides them otherwise), and the latent statistics: loaded from --diffuse-stats, or from
``RUN_DIR/stat.pt`` written by an earlier start of the same run, or computed once over the training split
(both views of every sample with --flip, as RAE's statistics are taken over randomly flipped images) by the
main process and written there in RAE's format, with ``stat.json`` saying what they were computed over.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cache_schema import Manifest
from cache_schema.storage.fsutil import atomic_write_json
from stages.core.diffusion.diffusion_variable import LayerNormAffine, TargetTokens
from stages.core.diffusion.token_stats import StatsAccumulator, load_stats, save_stats
from stages.core.errors import UsageError
from stages.core.runtime.progress import progress_bar

from .config import TrainConfig
from .data import CacheBatchDataset

STATS_FILE = "stat.pt"
STATS_INFO = "stat.json"
STATS_BATCH = 256
RAE_TARGET_MODEL = "facebook/dinov2-with-registers-base"


def add_target_command(cfg: TrainConfig) -> str:
    return f"`repa encode --cache {cfg.cache} --add-target {cfg.diffuse} --target-model {RAE_TARGET_MODEL}`"


def diffused_target(cfg: TrainConfig, manifest: Manifest) -> dict:
    """The manifest record of --diffuse's target, after checking RAE's latent can be made from it."""
    name = cfg.diffuse
    if name not in manifest.target_names():
        raise UsageError(f"--diffuse {name}: cache {cfg.cache} holds no target {name!r} (it has "
                         f"{', '.join(manifest.target_names())}); add its tokens with {add_target_command(cfg)}")
    if manifest.codec != "fp16":
        raise UsageError(f"--diffuse {name}: cache {cfg.cache} stores its tokens as {manifest.codec} (per-token "
                         "scales), not the fp16 tokens RAE's latent is made of; encode a cache with `repa encode "
                         f"--feature-codec fp16` and add the target to it with {add_target_command(cfg)}")
    record = manifest.target(name)
    rows, cols = record["grid"]
    if rows != cols or rows * cols != record["tokens"]:
        raise UsageError(f"--diffuse {name}: target {name} of cache {cfg.cache} has a {rows}x{cols} token grid; "
                         "RAE's latent is a square grid of patch tokens: add a DINOv2 target with "
                         f"{add_target_command(cfg)}")
    return record


def token_variable(cfg: TrainConfig, manifest: Manifest, dataset: CacheBatchDataset, train_ids: np.ndarray,
                   accelerator, log) -> TargetTokens:
    """RAE's variable for this run, its statistics loaded or computed (see the module docstring)."""
    record = diffused_target(cfg, manifest)
    layernorm = LayerNormAffine.from_record(record.get("layernorm"))
    variable = TargetTokens(cfg.diffuse, record["dim"], record["grid"][0], layernorm=layernorm)
    if accelerator.is_main_process and layernorm is None:
        log(f"--diffuse {cfg.diffuse}: the cache records no final-LayerNorm vectors for this target, so its tokens "
            "are diffused as stored (with statistics of these tokens that is RAE's variable up to each channel's "
            "sign; RAE's released stat.pt and decoders expect affine-free tokens: add the target again to record them)")
    run_stats = Path(cfg.run_dir) / STATS_FILE
    source = cfg.diffuse_stats
    if source is None:
        info = stats_info(cfg, manifest, len(train_ids))
        if accelerator.is_main_process and not reusable(run_stats, info):
            with torch.no_grad():
                stats = compute_stats(variable, dataset, train_ids, cfg.flip)
            save_stats(run_stats, stats)
            atomic_write_json(run_stats.with_name(STATS_INFO), info)
            log(f"latent statistics of {cfg.diffuse} over {info['latents']} latents written to {run_stats}")
        accelerator.wait_for_everyone()
        source = run_stats
    variable.stats = load_stats(source, variable.shape)
    return variable


def stats_info(cfg: TrainConfig, manifest: Manifest, samples: int) -> dict:
    """What statistics in the run directory were computed over; they are reused only for the same."""
    return {"target": cfg.diffuse, "cache_fingerprint": manifest.fingerprint,
            "target_fingerprint": manifest.targets.get(cfg.diffuse, {}).get("fingerprint"),
            "val_fraction": cfg.val_fraction, "flips": bool(cfg.flip), "samples": samples,
            "latents": samples * (2 if cfg.flip else 1)}


def reusable(path: Path, info: dict) -> bool:
    try:
        return path.is_file() and json.loads(path.with_name(STATS_INFO).read_text()) == info
    except (OSError, ValueError):
        return False


def compute_stats(variable: TargetTokens, dataset: CacheBatchDataset, ids: np.ndarray, flips: bool):
    """Exact per-element mean and variance of the un-normalised latent over ``ids`` (and their flips)."""
    acc = StatsAccumulator()
    views = [np.asarray(ids)] + ([~np.asarray(ids)] if flips else [])
    with progress_bar(total=sum(len(v) for v in views), unit="sample", desc="latent statistics",
                      dynamic_ncols=True) as bar:
        for view in views:
            for start in range(0, len(view), STATS_BATCH):
                chunk = view[start : start + STATS_BATCH]
                acc.update(variable.raw(dataset.__getitems__(chunk)))
                bar.update(len(chunk))
    return acc.result()
