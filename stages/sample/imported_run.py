"""The run directory `repa import-checkpoint` writes, whatever the file came from (REPA, REG, iREPA or RAE):
``config.json`` and one checkpoint in the one checkpoint format, so `repa sample` and `repa evaluate` read it
like a trained run.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import torch

from cache_schema import CacheError, Manifest, read_manifest
from cache_schema.storage.fsutil import atomic_write_json
from stages.core.errors import UsageError
from stages.core.files.checkpoint import checkpoint_contents, checkpoint_path, list_checkpoints, save_checkpoint
from stages.core.files.run_files import CONFIG_FILE
from stages.core.model.model_config import ModelConfig


def load_import_file(path: Path) -> object:
    """The file's contents: tensors, plain values and REPA's argument namespace only (RAE's files hold no more)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such checkpoint") from None
    except Exception as e:
        raise UsageError(f"{path}: not a loadable REPA or RAE checkpoint ({type(e).__name__}); only tensors, plain "
                         "values and REPA's argument namespace are read") from None


def import_cache(cache: Path) -> Manifest:
    """The manifest of --cache, the cache the imported run samples and evaluates with."""
    try:
        return read_manifest(cache)
    except CacheError as e:
        raise UsageError(f"--cache: {e}") from None


def check_new_run_dir(run_dir: Path) -> None:
    if list_checkpoints(run_dir):
        raise UsageError(f"--run-dir {run_dir} already holds checkpoints; choose a new run directory")


def write_imported_run(source: Path, run_dir: Path, cache: Path, manifest: Manifest, *, step: int, model: dict,
                       ema: dict, model_config: ModelConfig, parameters: int, val_fraction: float, config: dict,
                       diffusion: dict | None = None) -> Path:
    """Write ``run_dir`` from imported weights; ``config`` adds the importer's own entries (method, arguments) to
    the run's. Returns the checkpoint written."""
    run_dir = Path(run_dir)
    check_new_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"cache": str(cache), "run_dir": str(run_dir), "model": model_config.preset, "cond": model_config.cond,
              "val_fraction": val_fraction, "imported_from": str(source), **config}
    ckpt = checkpoint_path(run_dir, step)
    save_checkpoint(ckpt, checkpoint_contents(
        step=step, model=model, ema=ema, config=config, model_config=asdict(model_config), cond=model_config.cond,
        fingerprint=manifest.fingerprint, latent=manifest.latent, cache=str(cache),
        parts={p["name"]: p["num_samples"] for p in manifest.parts}, diffusion=diffusion))
    atomic_write_json(run_dir / CONFIG_FILE, {
        "config": config, "model_config": asdict(model_config), "cond": model_config.cond, "parameters": parameters,
        "cache_fingerprint": manifest.fingerprint, "imported_from": str(source),
    })
    return ckpt

