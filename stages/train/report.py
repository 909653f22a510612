"""`repa report`: compare training runs side by side, as a table, as JSON and as a PNG.

Everything comes from what a run directory already holds: ``config.json`` (settings and parameter
count), ``metrics.jsonl`` (train and validation records), ``final.json`` (written when the run ends)
and, when present, ``eval.jsonl`` (one evaluation per line: ``step``, ``fid``, ``is_mean``, maybe
``clip_score``; the newest line is shown).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache_schema.layout import FIRST_TARGET
from stages.core.errors import UsageError
from stages.core.run_files import CONFIG_FILE, EVAL_FILE, FINAL_FILE, METRICS_FILE

from .config import RESUMABLE_CHANGES
from .metrics import read_metrics

# Bookkeeping that does not change what a run learns; kept out of "settings that differ".
_BOOKKEEPING = RESUMABLE_CHANGES - {"steps", "cache", "max_val_samples"}
# t ranges of the compact per-bin columns (t = 0 is data, t = 1 is noise).
T_RANGES = ((0.0, 0.3), (0.3, 0.7), (0.7, 1.0))
EVAL_COLUMNS = (("fid", "FID", "{:.2f}"), ("is_mean", "IS", "{:.2f}"), ("clip_score", "CLIP", "{:.4g}"))


@dataclass
class RunReport:
    """The numbers of one run that the comparison shows."""

    run: str
    path: Path
    parameters: int | None = None
    steps: int = 0  # last step reached
    requested_steps: int | None = None
    finished: bool = False
    final_val: float | None = None
    final_val_step: int | None = None
    best_val: float | None = None
    best_val_step: int | None = None
    final_bins: list[float | None] = field(default_factory=list)
    repa_cos: float | None = None
    targets: str | None = None  # the alignment targets, comma-separated ("none" without REPA)
    img_per_s: float | None = None
    evaluation: dict | None = None
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_json(self, settings: list[str]) -> dict:
        out = {k: v for k, v in vars(self).items() if k not in ("config", "val_curve")}
        out["path"] = str(self.path)
        out["settings"] = {k: self.config.get(k) for k in settings}
        return out


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).exists() or (path / METRICS_FILE).exists()


def expand_runs(paths: list[Path]) -> list[Path]:
    """Run directories from the arguments: a run stands for itself, any other directory for the runs in it."""
    out: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise UsageError(f"{path}: no such directory; give run directories or a sweep's output directory")
        found = [path] if is_run_dir(path) else sorted(p for p in path.iterdir() if p.is_dir() and is_run_dir(p))
        if not found:
            raise UsageError(f"{path}: not a run directory (no {CONFIG_FILE} or {METRICS_FILE}) and holds no runs")
        out += [p for p in found if p not in out]
    return out


def _newest_json_line(path: Path) -> dict | None:
    if not path.exists():
        return None
    for line in reversed(path.read_text().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:  # blank, or cut short by a kill
            continue
    return None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def summarize_run(run_dir: Path) -> RunReport:
    run_dir = Path(run_dir)
    rep = RunReport(run=run_dir.name, path=run_dir)
    meta = _read_json(run_dir / CONFIG_FILE)
    if meta:
        rep.config = meta.get("config", {})
        rep.parameters = meta.get("parameters")
        rep.requested_steps = rep.config.get("steps")
        rep.targets = (rep.config.get("targets") or FIRST_TARGET) if rep.config.get("repa_lambda", 1) > 0 else "none"
    records = read_metrics(run_dir)
    val = sorted((r for r in records if r["kind"] == "val"), key=lambda r: r["step"])
    train = [r for r in records if r["kind"] == "train"]
    final = _read_json(run_dir / FINAL_FILE)
    rep.steps = final["step"] if final else max((r["step"] for r in records), default=0)
    rep.finished = final is not None and (rep.requested_steps is None or rep.steps >= rep.requested_steps)
    rep.val_curve = [(r["step"], r["denoise"]) for r in val]
    if val:
        last, best = val[-1], min(val, key=lambda r: r["denoise"])
        rep.final_val, rep.final_val_step = last["denoise"], last["step"]
        rep.best_val, rep.best_val_step = best["denoise"], best["step"]
        # Validation reports an empty t-bin as exactly 0.0, a value no real loss takes.
        rep.final_bins = [b if b != 0.0 else None for b in last["denoise_bins"]]
        rep.repa_cos = last.get("repa_cos")
    rates = [r["img_per_s"] for r in train if r.get("img_per_s")]
    rep.img_per_s = statistics.median(rates) if rates else None
    rep.evaluation = _newest_json_line(run_dir / EVAL_FILE)
    return rep


def compare_runs(run_dirs: list[Path]) -> tuple[list[RunReport], list[str]]:
    """The runs' reports sorted by final validation loss (runs without one last), and the settings that differ."""
    reports = sorted((summarize_run(p) for p in run_dirs),
                     key=lambda r: (r.final_val is None, r.final_val if r.final_val is not None else 0.0))
    names = [r.run for r in reports]
    for r in reports:
        if names.count(r.run) > 1:  # same-named runs of different sweeps: tell them apart by path
            r.run = str(r.path)
    keys = sorted({k for r in reports for k in r.config} - _BOOKKEEPING)
    differ = [k for k in keys if len({json.dumps(r.config.get(k)) for r in reports}) > 1]
    return reports, differ


def bin_ranges(bins: list[float | None]) -> list[float | None]:
    """Mean loss over the bins whose centres fall in each of ``T_RANGES`` (None where all are empty)."""
    out = []
    for lo, hi in T_RANGES:
        inside = [b for i, b in enumerate(bins) if lo <= (i + 0.5) / len(bins) < hi and b is not None]
        out.append(sum(inside) / len(inside) if inside else None)
    return out


#################################################################################
#                                    Output                                     #
#################################################################################


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def format_table(reports: list[RunReport], differ: list[str]) -> str:
    """A fixed-width comparison table, one row per run, best final validation loss first."""
    evals = [(key, title, spec) for key, title, spec in EVAL_COLUMNS if any((r.evaluation or {}).get(key) is not None for r in reports)]
    header = ["run", "params", "steps", "val final", "val best", *(f"t {lo:.1f}-{hi:.1f}" for lo, hi in T_RANGES),
              "REPA cos", "targets", "img/s", *(title for _, title, _ in evals), *(["eval step"] if evals else [])]
    rows = []
    for r in reports:
        ev = r.evaluation or {}
        rows.append([
            r.run,
            "-" if r.parameters is None else f"{r.parameters / 1e6:.2f}M",
            f"{r.steps}" + (f"/{r.requested_steps}" if not r.finished and r.requested_steps else ""),
            _fmt(r.final_val, "{:.4f}"),
            "-" if r.best_val is None else f"{r.best_val:.4f} @{r.best_val_step}",
            *(_fmt(v, "{:.4f}") for v in bin_ranges(r.final_bins)),
            _fmt(r.repa_cos, "{:.3f}"),
            r.targets or "-",
            _fmt(r.img_per_s, "{:.0f}"),
            *(_fmt(ev.get(key), spec) for key, _, spec in evals),
            *([_fmt(ev.get("step"), "{}")] if evals else []),
        ])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(header), line(["-" * w for w in widths]), *map(line, rows)]
    if differ:
        out.append(f"settings that differ: {', '.join(differ)}")
    if any(not r.finished for r in reports):
        out.append("steps N/M: reached N of the M requested (the run has not finished)")
    return "\n".join(out)


def plot_report(reports: list[RunReport], path: Path) -> None:
    """Validation loss over steps for every run, and each run's final validation loss per t-bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    legend_rows = (len(reports) + 2) // 3
    height = 4.5 + 0.22 * legend_rows
    fig, (curves, bins) = plt.subplots(1, 2, figsize=(13, height))
    colours = plt.get_cmap("tab10" if len(reports) <= 10 else "tab20")
    for i, r in enumerate(reports):
        colour = colours(i % colours.N)
        if r.val_curve:
            steps, losses = zip(*r.val_curve)
            curves.plot(steps, losses, "o-", ms=3, color=colour, label=r.run)
        points = [((j + 0.5) / len(r.final_bins), b) for j, b in enumerate(r.final_bins) if b is not None]
        if points:
            bins.plot(*zip(*points), "o-", ms=3, color=colour, label=r.run)
    curves.set_xlabel("step")
    curves.set_ylabel("validation denoising loss")
    losses = [loss for r in reports for _, loss in r.val_curve]
    if losses and max(losses) > 3 * min(losses):  # log only where it helps: narrow ranges read better linear
        curves.set_yscale("log")
    curves.set_title("validation loss")
    bins.set_xlabel("t (0 = data, 1 = noise)")
    bins.set_ylabel("validation denoising loss")
    bins.set_yscale("log")  # the loss falls by an order of magnitude from t = 0 to t = 1
    bins.set_title("final validation loss by t")
    handles, labels = curves.get_legend_handles_labels()
    if labels:
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.22 * legend_rows / height, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
