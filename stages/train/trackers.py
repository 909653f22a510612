"""Experiment trackers, through accelerate's tracker classes: tensorboard and wandb, kept in the run directory.

tensorboard writes ``RUN_DIR/tb`` (``tensorboard --logdir runs`` lists every run by its directory);
wandb writes ``RUN_DIR/wandb`` under ``--tracker-project``, named ``--run-name`` (default: the run
directory's name). A resumed run continues the same wandb run: its id is kept in ``RUN_DIR/trackers.json``.
Images (the preview grids) go to every tracker in the form it takes them.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
from pathlib import Path

import numpy as np

from cache_schema.fsutil import atomic_write_json
from stages.core.errors import UsageError

TRACKER_FILE = "trackers.json"
TENSORBOARD_DIR = "tb"


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


def tracker_names(report_to: str) -> list[str]:
    """The trackers ``--report-to`` asks for; ``all``: tensorboard, and wandb where it is installed."""
    if report_to == "none":
        return []
    if report_to == "all":
        return ["tensorboard", *(["wandb"] if wandb_installed() else [])]
    if report_to == "wandb" and not wandb_installed():
        raise UsageError("--report-to wandb: wandb is not installed; pip install -e '.[wandb]' (or pip install wandb), "
                         "or use --report-to tensorboard")
    return [report_to]


def run_name(cfg) -> str:
    return cfg.run_name or Path(cfg.run_dir).resolve().name


def _wandb_id(run_dir: Path, resuming: bool) -> str:
    """The id of this run's wandb run: the one recorded when resuming, else a new one."""
    if resuming:
        try:
            return str(json.loads((run_dir / TRACKER_FILE).read_text())["wandb_id"])
        except (OSError, ValueError, KeyError):
            pass
    return secrets.token_hex(4)


def make_trackers(cfg) -> list:
    """accelerate tracker objects for ``Accelerator(log_with=...)``; they start in ``init_trackers``."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    run_dir = Path(cfg.run_dir)
    out = []
    for name in tracker_names(cfg.report_to):
        if name == "tensorboard":
            out.append(TensorBoardTracker(TENSORBOARD_DIR, run_dir))
        else:  # wandb: files under the run directory, not the working directory
            resuming = bool(cfg.resume or cfg.resume_from)
            out.append(WandBTracker(cfg.tracker_project, name=run_name(cfg), dir=str(run_dir),
                                    id=_wandb_id(run_dir, resuming), resume="allow"))
    return out


def start_trackers(accelerator, cfg) -> None:
    """Start the trackers (main process) with the config as hyperparameters; record the wandb run id."""
    if not accelerator.log_with:
        return
    config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.to_json().items()}
    accelerator.init_trackers(cfg.tracker_project, config=config)
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            if tracker.name == "wandb":
                atomic_write_json(Path(cfg.run_dir) / TRACKER_FILE, {"wandb_id": tracker.run.id,
                                                                     "wandb_project": cfg.tracker_project})


def log_image(accelerator, key: str, image: np.ndarray, step: int) -> None:
    """One (H, W, 3) uint8 image to every tracker (main process)."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({key: image[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({key: [image]}, step=step)
