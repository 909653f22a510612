"""`repa sweep` and `repa report`: grid expansion, launching, skipping, resuming, failures, the comparison."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import ConfigError
from pipeline.sweep import (
    MANAGED_KEYS,
    RUN_CONFIG,
    RUN_LOG,
    expand_grid,
    load_sweep,
    resolve_gpus,
    to_toml,
)
from stages.train.metrics import read_metrics

from .test_train import tiny_train

LOG_HEADER = "\n=== "  # the line the sweep writes to train.log before each attempt


def write_sweep(path: Path, cache: Path, out: Path, grid: dict, name: str | None = None, **train) -> Path:
    """A sweep file whose [train] table is the tiny training setup of test_train."""
    cfg = tiny_train(cache, out, **{"steps": 4, "val_every": 2, "ckpt_every": 2, **train})
    base = {k: v for k, v in cfg.to_json().items() if v is not None and k not in MANAGED_KEYS}
    base["model"] = "none"
    sweep = {"out": str(out), **({"name": name} if name else {})}
    path.write_text(to_toml(base, "train") + to_toml(sweep, "sweep") + to_toml(grid, "sweep.grid"))
    return path


def repa(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


# -- planning ---------------------------------------------------------------------------------------
def test_grid_expands_to_the_cartesian_product_with_safe_names(tmp_path):
    grid = {"repa_lambda": [0.0, 0.5, 1.0], "align_layer": [1, 2], "model": ["SiT-B/2"]}
    spec = load_sweep(write_sweep(tmp_path / "s.toml", tmp_path / "cache", tmp_path / "out", grid, name="abl"))
    runs = expand_grid(spec)
    assert len(runs) == 6
    assert runs[0].name == "abl-repa_lambda=0.0,align_layer=1,model=SiT-B-2"
    assert runs[-1].name == "abl-repa_lambda=1.0,align_layer=2,model=SiT-B-2"
    assert len({r.run_dir for r in runs}) == 6 and all(r.run_dir.parent == tmp_path / "out" for r in runs)
    lam_align = [(r.train["repa_lambda"], r.train["align_layer"]) for r in runs]
    assert lam_align == [(lam, a) for lam in (0.0, 0.5, 1.0) for a in (1, 2)]
    assert all(r.train["width"] == 32 and r.train["steps"] == 4 and r.train["run_dir"] == str(r.run_dir) for r in runs)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace("[sweep.grid]\n", "[sweep.grid]\nrepa_lamda = [0.1]\n"),
     "unknown key 'repa_lamda' in \\[sweep\\] grid"),
    (lambda s: s.replace("[train]\n", "[train]\nlearning_rate = 0.1\n"), "unknown key 'learning_rate' in \\[train\\]"),
    (lambda s: s.replace("[sweep]\n", "[sweep]\nouts = 'x'\n"), "unknown key 'outs' in \\[sweep\\]"),
    (lambda s: s.replace("[sweep.grid]\n", "[sweep.grid]\nrun_dir = ['a']\n"),
     "sets 'run_dir', which the sweep manages"),
    (lambda s: s.replace("lr = [0.001, 0.002]", "lr = 0.001"), "grid.lr must be a non-empty list"),
    (lambda s: s.replace("lr = [0.001, 0.002]", "model = ['a/b', 'a-b']"), "both map to run name 'model=a-b'"),
])
def test_bad_sweep_files_name_the_key(tmp_path, edit, message):
    path = write_sweep(tmp_path / "s.toml", tmp_path / "cache", tmp_path / "out", {"lr": [0.001, 0.002]})
    path.write_text(edit(path.read_text()))
    with pytest.raises(ConfigError, match=message):
        expand_grid(load_sweep(path))
    r = repa("sweep", path, "--dry-run")
    assert r.exit_code == 2 and r.stderr.startswith("error: sweep file")


def test_run_config_toml_round_trips():
    table = {"cache": 'c/"odd" dir', "lr": 5e-05, "steps": 4, "compile": False, "adam_betas": [0.9, 0.95],
             "model": "none"}
    assert tomllib.loads(to_toml(table, "train"))["train"] == table


# -- launching --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_sweep(train_cache, tmp_path_factory):
    """A 2-run sweep trained two at a time, one per (named) GPU: (sweep file, output dir, CLI result).

    Ids of GPUs that do not exist leave the runs on the CPU, where the tests run anyway.
    """
    tmp = tmp_path_factory.mktemp("sweep")
    path = write_sweep(tmp / "s.toml", train_cache, tmp / "runs", {"repa_lambda": [0.0, 0.5]})
    return path, tmp / "runs", repa("sweep", path, "--gpus", "7,8")


def test_sweep_trains_every_run_into_its_own_directory(finished_sweep):
    _, out, result = finished_sweep
    assert result.exit_code == 0, result.output
    runs = sorted(p.name for p in out.iterdir())
    assert runs == ["repa_lambda=0.0", "repa_lambda=0.5"]
    for name, lam in (("repa_lambda=0.0", 0.0), ("repa_lambda=0.5", 0.5)):
        run = out / name
        assert json.loads((run / "final.json").read_text())["step"] == 4
        saved = tomllib.loads((run / RUN_CONFIG).read_text())["train"]
        assert saved["repa_lambda"] == lam and saved["run_dir"] == str(run)
        assert json.loads((run / "config.json").read_text())["config"]["repa_lambda"] == lam  # trained with it
        assert "trained to step 4" in (run / RUN_LOG).read_text()
    assert "2 trained, 0 already finished, 0 failed" in result.stdout
    gpus = {(out / n / RUN_LOG).read_text().split("CUDA_VISIBLE_DEVICES=")[1][0] for n in runs}
    assert gpus == {"7", "8"}  # each run on its own GPU
    # progress: the whole sweep (2 runs x 4 steps) and each run, with rate and ETA
    assert "sweep (2/2 runs done): 100%" in result.stderr and "8/8 [" in result.stderr
    assert re.search(r"repa_lambda=0\.5: +\d+%.*\| \d/4 \[\d\d:\d\d<\d\d:\d\d, +[\d.?]+(s/step|step/s)", result.stderr)


def test_gpu_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert resolve_gpus("auto") == ["2", "3"] and resolve_gpus("0, 1") == ["0", "1"] and resolve_gpus("none") == []
    path = write_sweep(tmp_path / "s.toml", tmp_path / "cache", tmp_path / "out", {"lr": [0.001, 0.002, 0.003]})
    r = repa("sweep", path, "--parallel", "3")
    assert r.exit_code == 2 and "--parallel 3: only 2 GPU(s) (2,3) and each run gets its own" in r.stderr
    assert not (tmp_path / "out").exists()


def test_rerun_skips_finished_runs(finished_sweep):
    path, out, _ = finished_sweep
    r = repa("sweep", path)
    assert r.exit_code == 0, r.output
    assert "0 trained, 2 already finished" in r.stdout and r.stderr.count("skip ") == 2
    assert all((out / n / RUN_LOG).read_text().count(LOG_HEADER) == 1 for n in ("repa_lambda=0.0", "repa_lambda=0.5"))


def test_dry_run_starts_nothing(finished_sweep, tmp_path):
    path, out, _ = finished_sweep
    fresh = tmp_path / "s.toml"
    fresh.write_text(path.read_text().replace(str(out), str(tmp_path / "new-runs")))
    r = repa("sweep", fresh, "--dry-run")
    assert r.exit_code == 0 and r.stdout.count("new      repa_lambda=") == 2
    assert not (tmp_path / "new-runs").exists()
    r = repa("sweep", path, "--dry-run")
    assert r.stdout.count("done     repa_lambda=") == 2


def test_changed_settings_are_refused_not_skipped(finished_sweep, tmp_path):
    path, out, _ = finished_sweep
    changed = tmp_path / "s.toml"
    changed.write_text(path.read_text().replace("lr = 0.001", "lr = 0.002"))
    r = repa("sweep", changed)
    assert r.exit_code == 1 and "2 failed" in r.stdout
    assert "holds a run with other settings (lr: 0.001 -> 0.002)" in r.stderr


def test_raising_steps_resumes_from_the_checkpoints(finished_sweep, tmp_path):
    path, out, _ = finished_sweep
    shutil.copytree(out / "repa_lambda=0.5", tmp_path / "runs" / "repa_lambda=0.5")
    longer = tmp_path / "s.toml"
    longer.write_text(path.read_text().replace(str(out), str(tmp_path / "runs")).replace("steps = 4", "steps = 6")
                      .replace("repa_lambda = [0.0, 0.5]", "repa_lambda = [0.5]"))
    r = repa("sweep", longer)
    assert r.exit_code == 0, r.output
    run = tmp_path / "runs" / "repa_lambda=0.5"
    log = (run / RUN_LOG).read_text()
    assert "--resume" in log.split(LOG_HEADER)[-1] and "resumed from" in log
    assert "| 4/6 [" in r.stderr and "sweep (1/1 runs done): 100%" in r.stderr  # the bar starts at the checkpoint
    assert json.loads((run / "final.json").read_text())["step"] == 6
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "val"] == [0, 2, 4, 6]


def test_a_failing_run_is_reported_and_the_others_finish(train_cache, tmp_path):
    path = write_sweep(tmp_path / "s.toml", train_cache, tmp_path / "runs", {"align_layer": [9, 2]}, steps=2)
    r = repa("sweep", path)  # one at a time: the good run starts only after the bad one failed
    assert r.exit_code == 1
    assert "1 trained, 0 already finished, 1 failed (align_layer=9)" in r.stdout
    assert "FAILED  align_layer=9 (exit status 2)" in r.stderr and "| error: --align-layer" in r.stderr
    assert json.loads((tmp_path / "runs" / "align_layer=2" / "final.json").read_text())["step"] == 2


# -- report -----------------------------------------------------------------------------------------
def final_val(run: Path) -> float:
    return [r for r in read_metrics(run) if r["kind"] == "val"][-1]["denoise"]


def test_report_shows_each_runs_final_loss_sorted_and_plots(finished_sweep, tmp_path):
    _, out, _ = finished_sweep
    runs = [out / "repa_lambda=0.0", out / "repa_lambda=0.5"]
    r = repa("report", *runs, "--plot", tmp_path / "r.png")
    assert r.exit_code == 0, r.output
    rows = [line for line in r.stdout.splitlines() if line.startswith("repa_lambda=")]
    expected = sorted(runs, key=final_val)
    assert [row.split()[0] for row in rows] == [p.name for p in expected]
    for row, run in zip(rows, expected, strict=True):
        assert f"{final_val(run):.4f}" in row.split()
    assert "settings that differ: repa_lambda" in r.stdout
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads(repa("report", *runs, "--json", "--plot", tmp_path / "r.png").stdout)
    assert [d["final_val"] for d in data] == [final_val(p) for p in expected]
    assert all(d["steps"] == 4 and d["finished"] and len(d["final_bins"]) == 10 for d in data)
    assert {d["run"]: d["settings"] for d in data} == {"repa_lambda=0.0": {"repa_lambda": 0.0},
                                                       "repa_lambda=0.5": {"repa_lambda": 0.5}}
    assert next(d for d in data if d["run"] == "repa_lambda=0.0")["repa_cos"] is None  # no REPA, no cosine


def test_report_expands_a_sweep_directory_and_plots_into_it(finished_sweep):
    _, out, _ = finished_sweep
    data = json.loads(repa("report", out, "--json").stdout)
    assert sorted(d["run"] for d in data) == ["repa_lambda=0.0", "repa_lambda=0.5"]
    assert (out / "report.png").stat().st_size > 1000


def test_report_shows_the_newest_evaluation(finished_sweep, tmp_path):
    _, out, _ = finished_sweep
    run = tmp_path / "evaluated"
    shutil.copytree(out / "repa_lambda=0.5", run)
    evals = [{"step": 2, "fid": 99.0, "is_mean": 1.5}, {"step": 4, "fid": 12.25, "is_mean": 7.25, "clip_score": 0.3125}]
    (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals)
                                    + '{"step": 6, "fid"')  # cut short by a kill
    r = repa("report", run, out / "repa_lambda=0.0", "--plot", tmp_path / "r.png")
    header, _, *rows = r.stdout.splitlines()
    assert header.split()[-5:] == ["FID", "IS", "CLIP", "eval", "step"]
    row = next(line for line in rows if line.startswith("evaluated")).split()
    assert row[-4:] == ["12.25", "7.25", "0.3125", "4"]
    other = next(line for line in rows if line.startswith("repa_lambda=0.0")).split()
    assert other[-4:] == ["-", "-", "-", "-"]


def test_report_of_a_directory_without_runs_is_a_usage_error(tmp_path):
    r = repa("report", tmp_path)
    assert r.exit_code == 2 and "not a run directory" in r.stderr


def test_report_colours_and_dashes_stand_for_the_settings_that_differ():
    from stages.train.report import RunReport, RunStyles

    reports = [RunReport(run=f"{lam},{w}", path=Path("."), config={"repa_lambda": lam, "width": w, "lr": 1e-3})
               for lam in (0.0, 0.5, 1.0) for w in (64, 128)]
    look = RunStyles.of(reports, ["repa_lambda", "width"])
    assert look.axes == ["repa_lambda", "width"] and look.values["repa_lambda"] == ["0.0", "0.5", "1.0"]
    for a, sa in zip(reports, look.styles, strict=True):
        for b, sb in zip(reports, look.styles, strict=True):
            assert (sa["color"] == sb["color"]) == (a.config["repa_lambda"] == b.config["repa_lambda"])
            assert (sa["ls"] == sb["ls"]) == (a.config["width"] == b.config["width"])
    assert [label for label, _ in look.legend] == ["repa_lambda = 0.0", "repa_lambda = 0.5", "repa_lambda = 1.0",
                                                   "width = 64", "width = 128"]


def test_final_losses_are_joined_by_a_line_over_numbers_never_between_named_methods():
    from stages.train.report import RunReport, ordered_axis

    def runs(key, values):
        return [RunReport(run=str(v), path=Path("."), config={key: v}) for v in values]

    assert ordered_axis(runs("repa_lambda", [0.0, 0.5, 1]), "repa_lambda")
    assert not ordered_axis(runs("method", ["sit", "repa", "dispersive"]), "method")
    assert not ordered_axis(runs("flip", [True, False]), "flip") and not ordered_axis(runs("x", [1]), None)


def test_a_report_is_written_beside_its_runs_not_in_the_working_directory(finished_sweep, tmp_path, monkeypatch):
    _, out, _ = finished_sweep
    monkeypatch.chdir(tmp_path)
    one = out / "repa_lambda=0.5"
    r = repa("report", one)
    assert r.exit_code == 0, r.output
    assert (one / "report.png").stat().st_size > 1000 and not (tmp_path / "report.png").exists()
    (out / "report.png").unlink(missing_ok=True)
    r = repa("report", one, out / "repa_lambda=0.0")
    assert r.exit_code == 0 and f"wrote {out.resolve() / 'report.png'}" in r.output
    assert not (tmp_path / "report.png").exists()
