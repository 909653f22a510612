"""Where training numbers go: metrics.jsonl (always), tensorboard or wandb, and curves.png.

metrics.jsonl is the record `repa report` reads: one JSON object per line, ``kind`` is
``train`` or ``val``, with the step and the scalar metrics (t-binned losses as lists).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stages.core.objective import NUM_T_BINS, bin_by_t
from stages.core.run_files import CURVES_FILE, METRICS_FILE, append_jsonl, read_jsonl


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / METRICS_FILE)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop records logged after ``step``: a resumed run logs those steps again."""
    kept = [r for r in read_metrics(run_dir) if r["step"] <= step]
    (Path(run_dir) / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in kept))


def append_metrics(run_dir: Path, record: dict) -> None:
    append_jsonl(Path(run_dir) / METRICS_FILE, record)


class TrainWindow:
    """Training metrics summed on the device between two log lines (no host sync per step)."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, denoise, cos, grad norm, steps
        self.bins = torch.zeros(3, NUM_T_BINS, dtype=torch.float64, device=device)  # denoise, cos, count

    def add_micro_batch(self, loss: torch.Tensor, denoise: torch.Tensor, cos: torch.Tensor, t: torch.Tensor,
                        weight: float) -> None:
        self.sums[:3] += torch.stack([loss.detach(), denoise.mean(), cos.mean()]).double() * weight
        denoise_sum, counts = bin_by_t(denoise, t)
        self.bins[0] += denoise_sum
        self.bins[1] += bin_by_t(cos, t)[0]
        self.bins[2] += counts

    def add_step(self, grad_norm: torch.Tensor) -> None:
        self.sums[3] += grad_norm.detach().double()
        self.sums[4] += 1

    def record(self, reduce) -> dict:
        """Means over the window (summed over processes by ``reduce``), then start a new window."""
        sums, bins = reduce(self.sums.clone()), reduce(self.bins.clone())
        n = sums[4].clamp_min(1)
        counts = bins[2].clamp_min(1)
        denoise_bins = bins[0] / counts
        out = {"loss": float(sums[0] / n), "denoise": float(sums[1] / n), "repa_cos": float(sums[2] / n),
               "grad_norm": float(sums[3] / n), "denoise_bins": denoise_bins.tolist(),
               "repa_cos_bins": (bins[1] / counts).tolist(),
               # Every t-bin weighted alike: the denoising loss under uniform t, as validation measures it,
               # whatever t distribution training draws from (None while a bin saw no sample).
               "denoise_uniform_t": float(denoise_bins.mean()) if bool((bins[2] > 0).all()) else None}
        self.sums.zero_()
        self.bins.zero_()
        return out


# Names in the trackers where the metrics.jsonl key says less.
TRACKER_NAMES = {"img_per_s": "samples_per_s"}
REPA_KEYS = ("repa_cos", "repa_cos_bins")


def tracker_values(prefix: str, record: dict, repa: bool) -> dict[str, float]:
    """A train or validation record as tracker scalars: ``train/denoise``, ``train/repa_loss`` (the REPA
    loss, -cosine, unweighted), ``train/repa_cos``, ``train_by_t/denoise_t0.0-0.1`` …; REPA values only
    when REPA is on, and t-bins that saw no sample left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in REPA_KEYS and not repa:
            continue
        if isinstance(value, list):
            n = len(value)
            for i, v in enumerate(value):
                if v != 0.0:  # an empty bin is reported as exactly 0.0, a value no real loss or cosine takes
                    out[f"{prefix}_by_t/{key.removesuffix('_bins')}_t{i / n:.1f}-{(i + 1) / n:.1f}"] = float(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{TRACKER_NAMES.get(key, key)}"] = float(value)
    if repa and "repa_cos" in record:
        out[f"{prefix}/repa_loss"] = -float(record["repa_cos"])
    return out


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


def write_curves(run_dir: Path) -> Path:
    path = Path(run_dir) / CURVES_FILE
    plot_curves(read_metrics(run_dir), path, title=str(run_dir))
    return path
