"""The checkpoint format: everything needed to continue a run bit-for-bit or to sample from it.

``RUN/checkpoints/step-0001000.pt`` holds plain tensors and plain Python values only, so it loads
with ``torch.load(weights_only=True)`` and a shared checkpoint cannot run code. ``checkpoint_contents``
builds it (training and ``repa import-checkpoint`` both call it), with these entries:

- ``step``; ``model`` and ``ema`` state dicts; the run's ``config`` and ``model_config`` as JSON values;
  ``cond`` (``class``, ``text`` or ``none``);
- the cache it trained on: its ``fingerprint``, its ``latent`` statistics, its path ``cache``, and ``parts``
  (part name -> samples: the parts the run trains on, fixed at its start, so a resumed run reads the same data);
- ``diffusion``: None for a run on the VAE latents; for one on a target's tokens (RAE, ``repa train --diffuse``)
  the target, its token size and grid, the latent statistics ``mean``/``var``/``eps`` and the final LayerNorm's
  vectors when known (``stages.core.diffusion.diffusion_variable.TargetTokens.record``);
- written by training only: ``optimizer`` and ``scheduler`` states, ``rng`` (torch and CUDA generator
  states), ``processes`` (how many it ran on; absent from checkpoints written while a step's draws still
  depended on the rank) and ``window`` (the partial sums of the metrics since the last log line).

Checkpoints are written to a temporary file, fsynced and renamed, so a kill leaves the previous one intact.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from stages.core.errors import UsageError
from stages.core.files.run_files import CKPT_DIR
from stages.core.files.tensor_files import save_tensors

_NAME = re.compile(r"^step-(\d{7,})\.pt$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step-{step:07d}.pt"


def checkpoint_step(path: Path) -> int | None:
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    found = [(step, p) for p in d.iterdir() if (step := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def rng_state() -> dict:
    """The global torch (and CUDA) generator states. Training draws all its noise from generators
    seeded by position, so these only matter to code outside the loop that uses the global ones."""
    state: dict[str, Tensor | list[Tensor]] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore ``rng_state()``; a run resumed on a machine with fewer GPUs restores the ones it has."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


TRAINING_ENTRIES = ("optimizer", "scheduler", "rng", "processes", "window")


def checkpoint_contents(*, step: int, model: dict, ema: dict, config: dict, model_config: dict, cond: str,
                        fingerprint: str, latent: dict, cache: str, parts: dict[str, int],
                        diffusion: dict | None = None, **training) -> dict:
    """A checkpoint's entries (see the module docstring); ``training`` takes only ``TRAINING_ENTRIES``."""
    unknown = set(training) - set(TRAINING_ENTRIES)
    if unknown:
        raise TypeError(f"not checkpoint entries: {sorted(unknown)}")
    return {"step": step, "model": model, "ema": ema, "config": config, "model_config": model_config, "cond": cond,
            "fingerprint": fingerprint, "latent": latent, "cache": cache, "parts": dict(parts), "diffusion": diffusion,
            **training}


def save_checkpoint(path: Path, state: dict) -> None:
    """Write a checkpoint whole or not at all (``save_tensors``)."""
    save_tensors(path, state, "checkpoint")


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (0 keeps all)."""
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, loaded without running any code stored in the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such checkpoint; list them in RUN_DIR/{CKPT_DIR}/") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(
            f"{path}: not a loadable checkpoint ({type(e).__name__}: {first[:200]}); "
            "checkpoints hold tensors and plain values only; use one written by `repa train`"
        ) from None
