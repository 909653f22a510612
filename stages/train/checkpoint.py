"""Checkpoints: everything needed to continue a run bit-for-bit, written atomically.

``run_dir/checkpoints/step-0001000.pt`` holds model, EMA, optimizer and scheduler state, RNG
states, the step, the data position, the full config and the cache fingerprint. Noise and data
order are functions of (seed, step), so restoring these reproduces the uninterrupted run.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from cache_schema import UsageError
from cache_schema.fsutil import fsync_dir

from .config import RESUMABLE_CHANGES

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{7,})\.pt$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step-{step:07d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict, keep: int) -> None:
    """torch.save to a temporary file, fsync, rename; then prune to the newest ``keep`` checkpoints."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if keep > 0:
        for old in list_checkpoints(path.parent.parent)[:-keep]:
            old.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such checkpoint; list them in RUN_DIR/{CKPT_DIR}/") from None
    except Exception as e:
        raise UsageError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}); resume from an older one") from e


def resume_differences(saved: dict, current: dict) -> list[str]:
    """Config fields that differ in ways that would change the training trajectory."""
    out = []
    for k in sorted(set(saved) | set(current)):
        if k in RESUMABLE_CHANGES:
            continue
        if saved.get(k) != current.get(k):
            out.append(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}")
    return out
