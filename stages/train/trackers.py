"""Experiment trackers, through accelerate's tracker classes: tensorboard and wandb, kept in the run directory.

tensorboard writes ``RUN_DIR/tb`` (``tensorboard --logdir runs`` lists every run by its directory);
wandb writes ``RUN_DIR/wandb`` under ``--tracker-project``, named ``--run-name`` (default: the run
directory's name). A resumed run continues the same log: tensorboard's folder, its points after the
checkpoint purged (they are logged again), and the same wandb run, whose id is kept in
``RUN_DIR/trackers.json``. Images (the preview grids) go to every tracker in the form it takes them.

``check_trackers`` runs before the run directory is touched, so a tracker that cannot start (wandb
missing, not logged in, its server unreachable) costs one line and no half-made run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cache_schema.storage.fsutil import atomic_write_json
from stages.core.errors import UsageError

if TYPE_CHECKING:
    from accelerate import Accelerator

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


WANDB_FIX = "set WANDB_MODE=offline (sync later with `wandb sync`), or use --report-to tensorboard"


# wandb retries an unreachable server for minutes; a run that cannot log should be told so at once.
LOGIN_CHECK_SECONDS = float(os.environ.get("REPA_WANDB_CHECK_SECONDS", 30))


def _within(seconds: float, call):
    """``call()``'s result, or TimeoutError if it has not returned after ``seconds`` (it runs on in a daemon
    thread, which the exiting process does not wait for)."""
    import threading

    box: dict = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True, name="wandb-login-check")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer from the wandb server in {seconds:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def check_trackers(cfg) -> None:
    """Refuse, in one line saying the fix, trackers that could not start: wandb not installed, not logged in,
    or its server not answering (checked with the stored key, unless WANDB_MODE is offline or disabled)."""
    if "wandb" not in tracker_names(cfg.report_to):
        return
    flag = f"--report-to {cfg.report_to}"
    if os.environ.get("WANDB_MODE", "").strip().lower() in ("offline", "dryrun", "disabled"):
        return
    import wandb

    try:
        if wandb.setup().settings.mode in ("offline", "dryrun", "disabled"):  # `wandb offline`, settings files
            return
        logged_in = _within(LOGIN_CHECK_SECONDS, lambda: wandb.login(prompt=False, verify=True))
    except Exception as e:  # wandb's own errors for a rejected key or an unreachable server vary by version
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"{flag}: wandb cannot verify the login ({reason}); check the network or run "
                         f"`wandb login` again, or {WANDB_FIX}") from None
    if not logged_in:
        raise UsageError(f"{flag}: not logged in to wandb; run `wandb login` (or set WANDB_API_KEY), or {WANDB_FIX}")


def tensorboard_tracker():
    """accelerate's tensorboard tracker writing straight into its folder, its hyperparameters included: no
    timestamped subfolder per start. ``purge_step`` (set before it starts): where a resumed run takes up."""
    from accelerate.tracking import TensorBoardTracker

    class RunTensorBoardTracker(TensorBoardTracker):
        def store_init_configuration(self, values: dict) -> None:
            from torch.utils.tensorboard.summary import hparams

            values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}
            for summary in hparams(values, {}):
                self.writer.file_writer.add_summary(summary)
            self.writer.flush()

    return RunTensorBoardTracker


def make_trackers(cfg) -> list:
    """accelerate tracker objects for ``Accelerator(log_with=...)``; they start in ``init_trackers``."""
    from accelerate.tracking import WandBTracker

    from .setup import resumes

    run_dir = Path(cfg.run_dir)
    out = []
    for name in tracker_names(cfg.report_to):
        if name == "tensorboard":
            out.append(tensorboard_tracker()("", run_dir / TENSORBOARD_DIR))
        else:  # wandb: files under the run directory, not the working directory
            out.append(WandBTracker(cfg.tracker_project, name=run_name(cfg), dir=str(run_dir),
                                    id=_wandb_id(run_dir, resumes(cfg)), resume="allow"))
    return out


def tracker_config(cfg, parameters: int, fingerprint: str) -> dict:
    """The hyperparameters the trackers show: the settings that have a value (lists kept as lists), the
    parameter count and the cache fingerprint, as in config.json."""
    config = {k: v for k, v in cfg.to_json().items() if v is not None}
    return {**config, "parameters": parameters, "cache_fingerprint": fingerprint}


def start_trackers(accelerator: Accelerator, cfg, config: dict, start_step: int = 0) -> None:
    """Start the trackers (main process) with ``config`` as hyperparameters; record the wandb run id.
    Resumed from ``start_step``, tensorboard drops the points it holds after that step (they are logged again)."""
    if not accelerator.log_with:
        return
    for tracker in accelerator.log_with:
        if tracker.name == "tensorboard" and start_step:
            tracker.init_kwargs["purge_step"] = start_step + 1
    accelerator.init_trackers(cfg.tracker_project, config=config)
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            if tracker.name == "wandb":
                atomic_write_json(Path(cfg.run_dir) / TRACKER_FILE, {"wandb_id": tracker.run.id,
                                                                     "wandb_project": cfg.tracker_project})


def log_image(accelerator: Accelerator, key: str, image: np.ndarray, step: int) -> None:
    """One (H, W, 3) uint8 image to every tracker (main process)."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({key: image[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({key: [image]}, step=step)
