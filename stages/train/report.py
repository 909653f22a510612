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

from cache_schema.format.layout import FIRST_TARGET
from stages.core.errors import UsageError
from stages.core.files.run_files import CONFIG_FILE, EVAL_FILE, FINAL_FILE, METRICS_FILE

from .config import RESUMABLE_CHANGES
from .methods import NEUTRAL
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
    method: str | None = None  # `repa train --method` (runs made before it: repa)
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
        rep.method = rep.config.get("method", "repa")
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
    evals = [(key, title, spec) for key, title, spec in EVAL_COLUMNS
             if any((r.evaluation or {}).get(key) is not None for r in reports)]
    header = ["run", "params", "steps", "val final", "val best", *(f"t {lo:.1f}-{hi:.1f}" for lo, hi in T_RANGES),
              "REPA cos", "targets", "method", *(title for _, title, _ in evals), *(["eval step"] if evals else [])]
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
            r.method or "-",
            *(_fmt(ev.get(key), spec) for key, _, spec in evals),
            *([_fmt(ev.get("step"), "{}")] if evals else []),
        ])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded).rstrip()

    out = [line(header), line(["-" * w for w in widths]), *map(line, rows)]
    if differ:
        out.append(f"settings that differ: {', '.join(differ)}")
    implied: dict[str, str] = {}
    for r in reports:
        if r.method:
            implied.setdefault(r.method, ", ".join(f"{k} {r.config[k]}" for k in NEUTRAL
                                                   if r.config.get(k, NEUTRAL[k]) != NEUTRAL[k]))
    if implied:
        out.append("method settings (where not neutral): " + "; ".join(f"{m}: {v or '-'}" for m, v in implied.items()))
    if any(not r.finished for r in reports):
        out.append("steps N/M: reached N of the M requested (the run has not finished)")
    return "\n".join(out)


LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _value_text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _value_order(text: str) -> tuple:
    """Numbers in numeric order, then anything else alphabetically."""
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


@dataclass
class RunStyles:
    """How each run is drawn: colour for the first setting that differs, line style for the second, marker
    for the third; runs that differ in no setting get a colour each."""

    axes: list[str]
    values: dict[str, list[str]]  # the values each of ``axes`` takes, in order
    styles: list[dict]
    legend: list[tuple[str, dict]]  # (label, line properties) explaining colours, styles and markers

    @classmethod
    def of(cls, reports: list[RunReport], differ: list[str]) -> RunStyles:
        import matplotlib.pyplot as plt

        # Settings with more values first, so a 3 x 2 grid colours the 3 and dashes the 2.
        axes = sorted(differ, key=lambda k: -len({_value_text(r.config.get(k)) for r in reports}))[:3]
        if not axes:
            cmap = plt.get_cmap("tab10" if len(reports) <= 10 else "tab20")
            styles = [dict(color=cmap(i % cmap.N), ls="-", marker="o") for i in range(len(reports))]
            return cls([], {}, styles, [(r.run, s) for r, s in zip(reports, styles, strict=True)])
        values = {k: sorted({_value_text(r.config.get(k)) for r in reports}, key=_value_order) for k in axes}
        cmap = plt.get_cmap("viridis")
        n = len(values[axes[0]])
        colour = {v: cmap(0.85 * i / max(n - 1, 1)) for i, v in enumerate(values[axes[0]])}
        dash = {v: LINE_STYLES[i % len(LINE_STYLES)] for i, v in enumerate(values[axes[1]])} if len(axes) > 1 else {}
        mark = {v: MARKERS[i % len(MARKERS)] for i, v in enumerate(values[axes[2]])} if len(axes) > 2 else {}
        styles = []
        for r in reports:
            v = [_value_text(r.config.get(k)) for k in axes]
            styles.append(dict(color=colour[v[0]], ls=dash.get(v[1], "-") if len(v) > 1 else "-",
                               marker=mark.get(v[2], "o") if len(v) > 2 else "o"))
        legend = [(f"{axes[0]} = {v}", dict(color=c, ls="-", marker="o")) for v, c in colour.items()]
        legend += [(f"{axes[1]} = {v}", dict(color="0.3", ls=d, marker="")) for v, d in dash.items()]
        legend += [(f"{axes[2]} = {v}", dict(color="0.3", ls="", marker=m)) for v, m in mark.items()]
        return cls(axes, values, styles, legend)


def _zoom(ax, values: list[float], pad: float = 0.08) -> None:
    """A y-range around ``values`` only, so differences between runs fill the panel."""
    if not values:
        return
    lo, hi = min(values), max(values)
    margin = (hi - lo) * pad or abs(hi) * 0.02 or 0.01
    ax.set_ylim(lo - margin, hi + margin)


def plot_report(reports: list[RunReport], path: Path, differ: list[str] | None = None) -> None:
    """Three panels: validation loss over steps (the untrained step-0 point left out, so the y-range shows
    the differences that matter), the final validation loss of each run against the settings that differ,
    and each run's final loss per t-bin relative to the mean over runs. Colours and line styles stand for
    the settings that differ (``differ``), explained in one legend below the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    look = RunStyles.of(reports, differ or [])
    single = len(reports) == 1  # nothing to compare: its curve and its loss by t, absolute
    if single:
        fig, (curves, bins) = plt.subplots(1, 2, figsize=(11, 5.2))
    else:
        fig, (curves, finals, bins) = plt.subplots(1, 3, figsize=(16, 5.2))

    trained = []
    step0 = [loss for r in reports for step, loss in r.val_curve if step == 0]
    for r, style in zip(reports, look.styles, strict=True):
        points = [(s, v) for s, v in r.val_curve if s > 0]
        if points:
            curves.plot(*zip(*points, strict=True), ms=3, lw=1.3, **style)
            trained += [v for _, v in points]
    _zoom(curves, trained)
    curves.set(xlabel="step", ylabel="validation denoising loss", title="validation loss"
               + (f" (step 0, untrained: {min(step0):.3g}-{max(step0):.3g}, not shown)" if step0 else ""))
    curves.title.set_fontsize(9)

    if single:
        _plot_bins_absolute(bins, reports[0], look.styles[0])
    else:
        _plot_finals(finals, reports, look)
        _plot_bins_relative(bins, reports, look)

    handles = [Line2D([], [], **props) for _, props in look.legend]
    if handles:
        fig.legend(handles, [label for label, _ in look.legend], loc="lower center", fontsize=9, frameon=False,
                   ncol=min(len(handles), 6))
    rows = -(-len(handles) // 6)
    fig.tight_layout(rect=(0, 0.05 + 0.045 * rows, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_bins_absolute(ax, report: RunReport, style: dict) -> None:
    pts = [((j + 0.5) / len(report.final_bins), b) for j, b in enumerate(report.final_bins) if b is not None]
    if pts:
        ax.plot(*zip(*pts, strict=True), ms=3, lw=1.2, **style)
    ax.set(xlabel="t (0 = data, 1 = noise)", ylabel="final validation denoising loss",
           title="final validation loss by t")


def ordered_axis(reports: list[RunReport], setting: str | None) -> bool:
    """Whether ``setting``'s values are numbers, so points in their order may be joined by a line; names (a
    method, a target) are categories, and a line between two of them would read as a trend."""
    values = [r.config.get(setting) for r in reports] if setting else []
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _plot_finals(finals, reports: list[RunReport], look: RunStyles) -> None:
    """Final validation loss against the first setting that differs, a line per value of the second when that
    setting is numeric (points only for categories)."""
    first = look.axes[0] if look.axes else None
    xs = look.values[first] if first else [r.run for r in reports]
    lines: dict[tuple, list] = {}
    for r, style in zip(reports, look.styles, strict=True):
        if r.final_val is None:
            continue
        x = xs.index(_value_text(r.config.get(first))) if first else xs.index(r.run)
        rest = tuple(_value_text(r.config.get(k)) for k in look.axes[1:])
        lines.setdefault(rest, []).append((x, r.final_val, style))
    joined = ordered_axis(reports, first)
    for points in lines.values():
        points.sort()
        if joined:
            finals.plot([p[0] for p in points], [p[1] for p in points], color="0.6", ls=points[0][2]["ls"], lw=1,
                        zorder=1)
        for x, y, style in points:
            finals.plot([x], [y], ls="", ms=7, zorder=2, **{k: v for k, v in style.items() if k != "ls"})
    finals.set_xticks(range(len(xs)), xs, rotation=0 if first else 30, ha="center" if first else "right", fontsize=8)
    _zoom(finals, [r.final_val for r in reports if r.final_val is not None], pad=0.15)
    finals.set(xlabel=first or "run", ylabel="final validation denoising loss", title="final validation loss")


def _plot_bins_relative(bins, reports: list[RunReport], look: RunStyles) -> None:
    """Per t-bin, relative to the mean over runs: the loss spans an order of magnitude across t, ratios do not."""
    width = max((len(r.final_bins) for r in reports), default=0)
    means: list[float | None] = []
    for j in range(width):
        vals = [b for b in (r.final_bins[j] for r in reports if j < len(r.final_bins)) if b is not None]
        means.append(sum(vals) / len(vals) if vals else None)
    ratios = []
    for r, style in zip(reports, look.styles, strict=True):
        pts = [((j + 0.5) / len(r.final_bins), b / mean) for j, b in enumerate(r.final_bins)
               if b is not None and (mean := means[j])]
        if pts:
            bins.plot(*zip(*pts, strict=True), ms=3, lw=1.2, **style)
            ratios += [y for _, y in pts]
    bins.axhline(1.0, color="0.5", lw=0.8)
    _zoom(bins, ratios + [1.0])
    bins.set(xlabel="t (0 = data, 1 = noise)", ylabel="final validation loss / mean over runs",
             title="final validation loss by t, relative")
