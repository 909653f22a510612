"""Where training numbers go: metrics.jsonl (always), tensorboard or wandb, and curves.png.

metrics.jsonl is the record `repa report` reads: one JSON object per line, ``kind`` is
``train`` or ``val``, with the step and the scalar metrics (t-binned losses as lists).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stages.core.diffusion.objective import NUM_T_BINS, bin_by_t
from stages.core.files.run_files import CONFIG_FILE, CURVES_FILE, METRICS_FILE, append_jsonl, read_jsonl


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

    def state(self, reduce) -> dict:
        """The window so far, summed over processes by ``reduce``: what a checkpoint keeps of it, so that the
        first line logged after a resume covers the same steps as without the interruption."""
        return {"sums": reduce(self.sums.clone()).cpu(), "bins": reduce(self.bins.clone()).cpu()}

    def load(self, state: dict, main: bool) -> None:
        """Take up a checkpoint's window: its sums on the main process (``record`` sums over processes)."""
        if main:
            self.sums.copy_(state["sums"])
            self.bins.copy_(state["bins"])

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


def _t_bin_centres(n: int) -> list[float]:
    return [(i + 0.5) / n for i in range(n)]


def _spread_out(records: list[dict], count: int) -> list[dict]:
    """Up to ``count`` records, first and last included, evenly spaced between."""
    if len(records) <= count:
        return records
    picks = sorted({round(i * (len(records) - 1) / (count - 1)) for i in range(count)})
    return [records[i] for i in picks]


def _log_y(ax) -> None:
    """A log y-axis labelled with plain numbers (0.3, not 3x10^-1)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    # minor ticks at 2, 3 and 5 x 10^k only: all nine crowd a panel spanning a decade or more
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if f"{y:.0e}"[0] in "235" else ""))


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[1]:
        ax.legend(loc="best", fontsize=8, framealpha=0.9)


def plot_curves(records: list[dict], path: Path, title: str = "", time_sampling: str = "uniform") -> None:
    """Four panels: the denoising loss over steps (validation, and training on the same footing), the REPA
    cosine over steps, and the validation loss and REPA cosine per t-bin at a few steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    repa = any("repa_cos" in r for r in val)
    fig, ((loss_ax, cos_ax), (bins_ax, bins_cos_ax)) = plt.subplots(2, 2, figsize=(12, 8))

    # Validation draws t uniformly; training may not (logit-normal puts few samples near t = 0 and 1, where
    # the loss is largest and smallest). Its per-bin means, weighted alike, are the uniform-t loss it would
    # show, so both curves measure the same thing.
    reweighted = time_sampling != "uniform" and any(r.get("denoise_uniform_t") is not None for r in train)
    if reweighted:
        pts = [(r["step"], r["denoise_uniform_t"]) for r in train if r.get("denoise_uniform_t") is not None]
        loss_ax.plot(*zip(*pts, strict=True), color="tab:blue", alpha=0.6,
                     label=f"train (t {time_sampling}, t-bins reweighted to uniform t)")
    elif train:
        loss_ax.plot([r["step"] for r in train], [r["denoise"] for r in train], color="tab:blue", alpha=0.6,
                     label=f"train (t {time_sampling})")
    if val:
        loss_ax.plot([r["step"] for r in val], [r["denoise"] for r in val], "o-", color="tab:orange", ms=4,
                     label="validation (held-out, t uniform)")
    losses = [y for line in loss_ax.get_lines() for y in line.get_ydata()]
    if losses and min(losses) > 0 and max(losses) > 3 * min(losses):
        _log_y(loss_ax)
    loss_ax.set(xlabel="step", ylabel="denoising loss", title=title or "denoising loss")
    _legend(loss_ax)

    if repa:
        if train:
            cos_ax.plot([r["step"] for r in train], [r["repa_cos"] for r in train], color="tab:blue", alpha=0.6,
                        label="train")
        pts = [(r["step"], r["repa_cos"]) for r in val if "repa_cos" in r]
        cos_ax.plot(*zip(*pts, strict=True), "o-", color="tab:orange", ms=4, label="validation")
        _legend(cos_ax)
    else:
        cos_ax.text(0.5, 0.5, "REPA off (--repa-lambda 0)", ha="center", va="center", transform=cos_ax.transAxes)
    cos_ax.set(xlabel="step", ylabel="cosine(projected block output, DINOv2)", title="REPA alignment")

    shown = _spread_out(val, 4)
    colours = plt.get_cmap("viridis")
    for k, r in enumerate(shown):
        colour = colours(k / max(len(shown) - 1, 1) * 0.9)
        centres = _t_bin_centres(len(r["denoise_bins"]))
        bins = [(c, b) for c, b in zip(centres, r["denoise_bins"], strict=True) if b != 0.0]  # 0.0: an empty bin
        if bins:
            bins_ax.plot(*zip(*bins, strict=True), "o-", ms=3, color=colour, label=f"step {r['step']}")
        cos_bins = [(c, b) for c, b in zip(centres, r.get("repa_cos_bins") or [], strict=False) if b != 0.0]
        if cos_bins:
            bins_cos_ax.plot(*zip(*cos_bins, strict=True), "o-", ms=3, color=colour, label=f"step {r['step']}")
    if shown:
        _log_y(bins_ax)  # the loss falls by an order of magnitude from t = 0 to t = 1
    bins_ax.set(xlabel="t (0 = data, 1 = noise)", ylabel="validation denoising loss", title="validation loss by t")
    _legend(bins_ax)
    bins_cos_ax.set(xlabel="t (0 = data, 1 = noise)", ylabel="validation REPA cosine", title="REPA cosine by t")
    if repa:
        _legend(bins_cos_ax)
    else:
        bins_cos_ax.text(0.5, 0.5, "REPA off", ha="center", va="center", transform=bins_cos_ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_curves(run_dir: Path) -> Path:
    path = Path(run_dir) / CURVES_FILE
    try:
        time_sampling = json.loads((Path(run_dir) / CONFIG_FILE).read_text())["config"]["time_sampling"]
    except (OSError, ValueError, KeyError):
        time_sampling = "uniform"
    plot_curves(read_metrics(run_dir), path, title=str(run_dir), time_sampling=time_sampling)
    return path
