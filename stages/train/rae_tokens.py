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
from typing import TYPE_CHECKING

import numpy as np
import torch

from cache_schema import Manifest
from cache_schema.storage.fsutil import atomic_write_json
from stages.core.diffusion.diffusion_variable import TargetTokens
from stages.core.diffusion.token_stats import StatsAccumulator, load_stats, save_stats
from stages.core.diffusion.token_target import target_tokens, token_target
from stages.core.runtime.progress import progress_bar

from .config import TrainConfig
from .data import CacheBatchDataset

if TYPE_CHECKING:
    from accelerate import Accelerator

STATS_FILE = "stat.pt"
STATS_INFO = "stat.json"
STATS_BATCH = 256


def diffused_target(cfg: TrainConfig, manifest: Manifest) -> dict:
    """The manifest record of --diffuse's target, after checking RAE's latent can be made from it."""
    assert cfg.diffuse  # called for a --diffuse run only
    return token_target(manifest, cfg.cache, cfg.diffuse)


def token_variable(cfg: TrainConfig, manifest: Manifest, dataset: CacheBatchDataset, train_ids: np.ndarray,
                   accelerator: Accelerator, log) -> TargetTokens:
    """RAE's variable for this run, its statistics loaded or computed (see the module docstring)."""
    assert cfg.diffuse  # called for a --diffuse run only
    record = diffused_target(cfg, manifest)
    variable = target_tokens(cfg.diffuse, record)
    if accelerator.is_main_process and variable.layernorm is None:
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
