"""The layout of a run directory, shared by training (writer), sampling, evaluation, sweeps and reports.

    RUN/
      config.json     the full config, model shape, parameter count, cache fingerprint
      metrics.jsonl   every logged train/val record
      curves.png      loss curves
      final.json      step and last validation numbers, written when training ends
      eval.jsonl      one line per `repa evaluate`
      checkpoints/    step-XXXXXXX.pt
      previews/       step-XXXXXXX.pt latents of fixed held-out conditions
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from stages.core.errors import UsageError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
FINAL_FILE = "final.json"
EVAL_FILE = "eval.jsonl"
CKPT_DIR = "checkpoints"
PREVIEW_DIR = "previews"


def read_run_config(run_dir: Path) -> dict:
    """A run's config.json, written when training starts: its config, model config and cache fingerprint."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: missing; is {run_dir} a run directory written by `repa train`?") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: unreadable ({e})") from None


def read_jsonl(path: Path) -> list[dict]:
    """Every complete JSON line of ``path`` ([] when it does not exist); a line cut short by a kill is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def append_jsonl(path: Path, record: dict, durable: bool = False) -> Path:
    """Append one JSON line; ``durable`` fsyncs it (results nobody wants to recompute)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        if durable:
            f.flush()
            os.fsync(f.fileno())
    return Path(path)
