"""`repa sweep`: train every point of a grid of TrainConfig values over one cache, resumably.

A sweep file holds a ``[train]`` table (the shared settings, as in ``configs/demo.toml``) and a
``[sweep]`` table::

    [sweep]
    out = "runs/sweep-demo"          # parent directory of the runs
    name = "abl"                     # optional prefix of every run name
    grid = { repa_lambda = [0.0, 0.5], width = [64, 128] }

Each point of the cartesian product becomes ``OUT/[name-]key=value,key=value``, trained by its own
``python -m pipeline train --config RUN/sweep-config.toml`` subprocess whose output goes to
``RUN/train.log``. Rerunning the sweep skips finished runs and resumes interrupted ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.core.errors import UsageError
from stages.core.files.run_files import FINAL_FILE, METRICS_FILE
from stages.train.config import TrainConfig, resume_differences

from .config import ConfigError, load_preset, unknown_key_error

RUN_CONFIG = "sweep-config.toml"
RUN_LOG = "train.log"
SWEEP_KEYS = ("out", "name", "grid")
# The sweep decides where each run lives and whether it resumes; a preset may not.
MANAGED_KEYS = frozenset({"run_dir", "resume", "resume_from", "overwrite"})
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_MAX_NAME = 200  # below the usual 255-byte limit on a file name


@dataclass
class SweepSpec:
    path: Path
    base: dict[str, Any]  # the [train] table shared by every run
    grid: dict[str, list]  # TrainConfig field -> values, in file order
    out: Path
    name: str | None = None


@dataclass
class PlannedRun:
    name: str
    run_dir: Path
    varied: dict[str, Any]  # this run's grid point
    train: dict[str, Any]  # the full [train] table it is trained with
    state: str = "new"  # new, resume, done or conflict (see assess)
    detail: str = ""
    start_step: int = 0  # where training starts: the newest checkpoint's step when resuming

    @property
    def steps(self) -> int:
        return int(self.train.get("steps", TrainConfig.steps))


@dataclass
class SweepOutcome:
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


#################################################################################
#                               Reading and planning                            #
#################################################################################


def load_sweep(path: Path) -> SweepSpec:
    """Read and check a sweep file; every error names the file and the offending key."""
    base = load_preset(path, "train")
    sweep = load_preset(path, "sweep")
    where = f"sweep file {path}"
    if not sweep:
        raise ConfigError(f"{where}: no [sweep] table; add one with out = \"runs/NAME\" and "
                          "grid = { KEY = [VALUES] }")
    unknown = sorted(set(sweep) - set(SWEEP_KEYS))
    if unknown:
        raise unknown_key_error(where, unknown[0], set(SWEEP_KEYS), "[sweep]")
    grid = sweep.get("grid", {})
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: [sweep] grid must be a table of KEY = [VALUES]")
    grid = {k.replace("-", "_"): v for k, v in grid.items()}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for table, keys in (("[train]", base), ("[sweep] grid", grid)):
        bad = sorted(set(keys) - fields)
        if bad:
            raise unknown_key_error(where, bad[0], fields - MANAGED_KEYS, table)
        managed = sorted(set(keys) & MANAGED_KEYS)
        if managed:
            raise ConfigError(f"{where}: {table} sets {managed[0]!r}, which the sweep manages; set [sweep] out instead")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: [sweep] grid.{key} must be a non-empty list of values, "
                              f"e.g. {key} = [{values!r}]")
    for key in ("out", "name"):
        if key in sweep and (not isinstance(sweep[key], str) or not sweep[key]):
            raise ConfigError(f"{where}: [sweep] {key} must be a non-empty string")
    out = Path(sweep.get("out", f"runs/{Path(path).stem}"))
    return SweepSpec(path=Path(path), base=base, grid=grid, out=out, name=sweep.get("name"))


def format_value(value: Any) -> str:
    """A grid value as it appears in a run name (before unsafe characters are replaced)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "_".join(format_value(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def run_name(varied: dict[str, Any], prefix: str | None = None) -> str:
    """``[prefix-]key=value,key=value`` with anything but ``A-Za-z0-9._=,+-`` replaced by ``-``."""
    body = ",".join(f"{k}={format_value(v)}" for k, v in varied.items())
    name = _UNSAFE.sub("-", "-".join(p for p in (prefix, body) if p) or "run")
    if len(name) > _MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[:_MAX_NAME - 11]}-{digest}"
    return name


def expand_grid(spec: SweepSpec) -> list[PlannedRun]:
    """One run per point of the cartesian product of the grid, first key varying slowest."""
    keys = list(spec.grid)
    runs: dict[str, PlannedRun] = {}
    for point in itertools.product(*(spec.grid[k] for k in keys)):
        varied = dict(zip(keys, point, strict=True))
        name = run_name(varied, spec.name)
        if name in runs:
            raise ConfigError(f"sweep file {spec.path}: grid points {runs[name].varied} and {varied} "
                              f"both map to run name {name!r}; make the values distinct")
        run_dir = spec.out / name
        runs[name] = PlannedRun(name=name, run_dir=run_dir, varied=varied,
                                train={**spec.base, **varied, "run_dir": str(run_dir)})
    return list(runs.values())


def assess(run: PlannedRun) -> PlannedRun:
    """Set ``run.state`` from what its directory holds.

    done: finished at (or beyond) the requested steps; resume: has checkpoints; new: nothing to keep;
    conflict: holds checkpoints made with other settings (neither resumable nor safe to skip).
    """
    from stages.core.files.checkpoint import checkpoint_step, list_checkpoints

    ckpts = list_checkpoints(run.run_dir)
    final = _read_final_step(run.run_dir)
    ckpt_step = checkpoint_step(ckpts[-1]) if ckpts else None
    saved = run.run_dir / RUN_CONFIG
    if (ckpts or final is not None) and saved.exists():
        diff = resume_differences(tomllib.loads(saved.read_text()).get("train", {}), run.train)
        if diff:
            run.state, run.detail = "conflict", f"holds a run with other settings ({'; '.join(diff)})"
            return run
    # A run killed after its last checkpoint but before final.json has nothing left to train.
    reached = max((s for s in (final, ckpt_step) if s is not None), default=None)
    if reached is not None and reached >= run.steps:
        run.state, run.detail = "done", f"at step {reached}"
    elif ckpt_step is not None:
        run.state, run.detail, run.start_step = "resume", f"from step {ckpt_step} of {run.steps}", ckpt_step
    else:
        run.state, run.detail = "new", f"{run.steps} steps"
    return run


def plan_sweep(spec: SweepSpec) -> list[PlannedRun]:
    return [assess(run) for run in expand_grid(spec)]


def _read_final_step(run_dir: Path) -> int | None:
    try:
        return int(json.loads((run_dir / FINAL_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def to_toml(table: dict[str, Any], section: str) -> str:
    """One TOML table of scalars and lists (all a TrainConfig preset holds)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (str, Path)):
            return json.dumps(str(v))  # JSON string escapes are valid TOML basic-string escapes
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise ConfigError(f"cannot write {v!r} ({type(v).__name__}) to TOML")

    return f"[{section}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in table.items())


#################################################################################
#                                    Launching                                  #
#################################################################################


def resolve_gpus(spec: str) -> list[str]:
    """GPU ids from ``--gpus``: ``auto`` (every visible GPU), ``none``, or a list like ``0,1,3``."""
    if spec.strip().lower() == "none" or not spec.strip():
        return []
    if spec.strip().lower() != "auto":
        return [g.strip() for g in spec.split(",") if g.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # keep the parent's numbering: children see the physical ids listed here
        return [g.strip() for g in visible.split(",") if g.strip() and not g.strip().startswith("-")]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def train_command(run: PlannedRun) -> list[str]:
    cmd = [sys.executable, "-m", "pipeline", "train", "--config", str(run.run_dir / RUN_CONFIG)]
    return cmd + (["--resume"] if run.state == "resume" else [])


def log_tail(path: Path, offset: int = 0, lines: int = 20) -> str:
    """The last lines written to ``path`` after ``offset``, progress-bar redraws collapsed."""
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    shown = [line.rsplit("\r", 1)[-1] for line in text.rstrip().splitlines()]
    return "\n".join(shown[-lines:])


class StepWatcher:
    """The newest training step a run has logged, read from its metrics.jsonl as it grows."""

    def __init__(self, run_dir: Path, start: int):
        self.path, self.offset, self.step = Path(run_dir) / METRICS_FILE, 0, start

    def poll(self) -> int:
        try:
            if self.path.stat().st_size < self.offset:  # rewritten (a resumed run drops records past its checkpoint)
                self.offset = 0
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return self.step
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("kind") == "train":
                self.step = max(self.step, int(record["step"]))
        return self.step


class SweepProgress:
    """One bar for the whole sweep (steps of every run to train) and one per running run, each with its
    rate and ETA; messages are printed above the bars."""

    def __init__(self, queue: list[PlannedRun], log: Callable[[str], None]):
        from tqdm import tqdm

        from stages.core.runtime.progress import progress_bar

        self.tqdm, self.bar, self.log, self.runs = tqdm, progress_bar, log, len(queue)
        self.done = 0
        total = sum(max(r.steps - r.start_step, 0) for r in queue)
        self.overall = progress_bar(total=total, unit="step", dynamic_ncols=True, position=0, desc=self._desc())
        self.bars: dict[str, tuple] = {}  # run name -> (bar, watcher)
        self.free_rows: list[int] = []

    def _desc(self) -> str:
        return f"sweep ({self.done}/{self.runs} runs done)"

    def say(self, message: str) -> None:
        with self.tqdm.external_write_mode():
            self.log(message)

    def started(self, run: PlannedRun) -> None:
        row = self.free_rows.pop(0) if self.free_rows else len(self.bars) + 1
        bar = self.bar(total=run.steps, initial=run.start_step, unit="step", dynamic_ncols=True, position=row,
                        leave=False, desc=run.name if len(run.name) <= 40 else run.name[:37] + "...")
        bar.row = row
        self.bars[run.name] = (bar, StepWatcher(run.run_dir, run.start_step))

    def update(self) -> None:
        for bar, watcher in self.bars.values():
            step = min(watcher.poll(), bar.total)
            if step > bar.n:
                self.overall.update(step - bar.n)
                bar.update(step - bar.n)

    def finished(self, run: PlannedRun, trained: bool) -> None:
        self.update()
        bar, _ = self.bars.pop(run.name)
        if trained:  # steps after the last log line count too
            self.overall.update(bar.total - bar.n)
        self.free_rows.append(bar.row)
        bar.close()
        self.done += 1
        self.overall.set_description(self._desc())

    def close(self) -> None:
        for bar, _ in self.bars.values():
            bar.close()
        self.overall.close()


@dataclass
class _Running:
    run: PlannedRun
    proc: subprocess.Popen
    gpu: str | None
    log_offset: int
    started: float


def _start(run: PlannedRun, gpu: str | None, threads: int | None) -> _Running:
    from cache_schema.storage.fsutil import atomic_write_text

    run.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.run_dir / RUN_CONFIG, f"# repa train --config {run.run_dir / RUN_CONFIG}\n"
                      + to_toml(run.train, "train"))
    if run.state == "new":
        # Records of an attempt killed before its first checkpoint would be appended to, not replaced.
        for stale in (METRICS_FILE, FINAL_FILE):
            (run.run_dir / stale).unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if threads is not None and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)
    log_path = run.run_dir / RUN_LOG
    with open(log_path, "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(train_command(run))}"
                  + (f" (CUDA_VISIBLE_DEVICES={gpu})" if gpu is not None else "") + "\n")
        log.flush()
        offset = log.tell()
        proc = subprocess.Popen(train_command(run), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env)
    return _Running(run, proc, gpu, offset, time.monotonic())


def launch_sweep(runs: list[PlannedRun], parallel: int = 1, gpus: list[str] | None = None,
                 log: Callable[[str], None] = print, poll_s: float = 0.2) -> SweepOutcome:
    """Train the planned runs, ``parallel`` at a time, each on its own GPU when ``gpus`` are given.

    Finished runs are skipped; a failing run is reported with the tail of its log and the others go on.
    """
    gpus = list(gpus or [])
    if parallel < 1:
        raise UsageError(f"--parallel {parallel}: must be at least 1")
    if gpus and parallel > len(gpus):
        raise UsageError(f"--parallel {parallel}: only {len(gpus)} GPU(s) ({','.join(gpus)}) and each run gets its "
                         "own; lower --parallel or pass --gpus none")
    starting = [r for r in runs if r.state in ("new", "resume")]
    for cache in sorted({str(r.train["cache"]) for r in starting if r.train.get("cache")}):
        if not Path(cache).exists():
            raise UsageError(f"cache {cache} does not exist; encode it first with `repa encode` "
                             "(`make encode` for the demo)")
    outcome = SweepOutcome()
    queue = []
    for run in runs:
        if run.state == "done":
            outcome.skipped.append(run.name)
            log(f"skip    {run.name}: finished {run.detail}")
        elif run.state == "conflict":
            outcome.failed.append(run.name)
            log(f"FAILED  {run.name}: {run.run_dir} {run.detail}; delete it or choose another [sweep] out")
        else:
            queue.append(run)
    threads = None if gpus or parallel == 1 else max(1, (os.cpu_count() or 1) // parallel)
    free_gpus: list[str | None] = list(gpus[:parallel]) if gpus else [None] * parallel
    running: list[_Running] = []
    total, started = len(queue), 0
    if not queue:
        return outcome
    progress = SweepProgress(queue, log)
    try:
        while queue or running:
            while queue and free_gpus:
                gpu = free_gpus.pop(0)
                job = _start(queue.pop(0), gpu, threads)
                running.append(job)
                started += 1
                progress.say(f"[{started}/{total}] {'resume' if job.run.state == 'resume' else 'start'} {job.run.name} "
                             f"({job.run.detail}{f', GPU {gpu}' if gpu is not None else ''}) -> "
                             f"{job.run.run_dir / RUN_LOG}")
                progress.started(job.run)
            time.sleep(poll_s)
            progress.update()
            for job in [j for j in running if j.proc.poll() is not None]:
                running.remove(job)
                free_gpus.append(job.gpu)
                trained = _report_finished(job, outcome, progress.say)
                progress.finished(job.run, trained)
    finally:
        progress.close()
        for job in running:  # interrupted: stop the children too, they keep their checkpoints
            job.proc.terminate()
        for job in running:
            job.proc.wait()
    return outcome


def _report_finished(job: _Running, outcome: SweepOutcome, log: Callable[[str], None]) -> bool:
    """Log how a run ended and record it in ``outcome``; True if it trained to the end."""
    run, rc = job.run, job.proc.returncode
    secs = time.monotonic() - job.started
    final = _read_final_step(run.run_dir)
    if rc == 0 and final is not None and final >= run.steps:
        val = (json.loads((run.run_dir / FINAL_FILE).read_text()).get("val") or {}).get("denoise")
        outcome.finished.append(run.name)
        log(f"done    {run.name} in {secs:.0f} s" + (f": val denoise {val:.4f}" if val is not None else ""))
        return True
    outcome.failed.append(run.name)
    why = f"exit status {rc}" if rc else f"exited without writing {FINAL_FILE}"
    tail = log_tail(run.run_dir / RUN_LOG, job.log_offset)
    log(f"FAILED  {run.name} ({why}) after {secs:.0f} s; last lines of {run.run_dir / RUN_LOG}:\n"
        + "\n".join(f"    | {line}" for line in tail.splitlines()))
    return False
