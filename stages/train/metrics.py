"""Where training numbers go: metrics.jsonl (always), tensorboard or wandb, and curves.png.

metrics.jsonl is the record `repa report` reads: one JSON object per line, ``kind`` is
``train`` or ``val``, with the step and the scalar metrics (t-binned losses as lists).
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
    return out


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop records logged after ``step``: a resumed run logs those steps again."""
    kept = [r for r in read_metrics(run_dir) if r["step"] <= step]
    (Path(run_dir) / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in kept))


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_curves(records: list[dict], path: Path, title: str = "") -> None:
    """Training and validation denoising loss over steps, and the last validation loss (and REPA
    cosine) per t-bin, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        # the total loss includes -lambda*cosine and can be negative: plot the denoising part (log scale)
        ax1.plot([r["step"] for r in train], [r["denoise"] for r in train], label="train denoise", alpha=0.6)
    if val:
        ax1.plot([r["step"] for r in val], [r["denoise"] for r in val], "o-", label="val denoise")
        bins = val[-1]["denoise_bins"]
        centres = [(i + 0.5) / len(bins) for i in range(len(bins))]
        ax2.plot(centres, bins, "o-", label=f"val denoise @ step {val[-1]['step']}")
        if val[-1].get("repa_cos_bins"):
            ax2b = ax2.twinx()
            ax2b.plot(centres, val[-1]["repa_cos_bins"], "s--", color="tab:red", label="val REPA cosine")
            ax2b.set_ylabel("REPA cosine")
    ax1.set_xlabel("step")
    ax1.set_ylabel("denoising loss")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.set_title(title or "loss")
    ax2.set_xlabel("t (0 = data, 1 = noise)")
    ax2.set_ylabel("denoising loss")
    ax2.set_title("validation loss by t")
    ax2.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
