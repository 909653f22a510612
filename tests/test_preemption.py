"""A scheduler's signals: training stops after the step in flight with a checkpoint of it and the same
command resumes it exactly; a second signal stops at once; encode stops in one line; trackers that
cannot start are refused before the run directory is touched, and a resumed run logs each step once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages.core.errors import UsageError
from stages.core.files.checkpoint import checkpoint_step, list_checkpoints
from stages.train.loop import run_train
from stages.train.metrics import read_metrics

from .encode_helpers import ROOT, env
from .test_operations import assert_all_gone, config, descendants, encode_cmd, gated, one_line_error, wait_for, workers
from .test_train import tiny_train, train_cli_args

TIMING = ("img_per_s", "gpu_mem_gib")


def train_cmd(cfg) -> list[str]:
    return [sys.executable, "-m", "pipeline", "train", *train_cli_args(cfg)]


def trained_steps(run: Path) -> int:
    steps = [r["step"] for r in read_metrics(run) if r["kind"] == "train"] if (run / "metrics.jsonl").exists() else []
    return max(steps, default=0)


def last_line(stderr: str) -> str:
    return stderr.strip().replace("\r", "\n").splitlines()[-1]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_sigterm_checkpoints_the_step_in_flight_and_the_same_command_resumes_bit_identically(train_cache, tmp_path):
    # No periodic checkpoint before the last step: whatever is kept after the signal, the stop wrote.
    common = dict(steps=60, ckpt_every=1000, val_every=25, log_every=3, num_workers=1, keep_checkpoints=0)
    straight = subprocess.Popen(train_cmd(tiny_train(train_cache, tmp_path / "straight", **common)), env=env(),
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cmd = train_cmd(tiny_train(train_cache, tmp_path / "stopped", **common))
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: trained_steps(tmp_path / "stopped") >= 6, timeout=300, proc=proc)
    helpers = descendants(proc.pid)
    assert workers(helpers), "no loader worker to watch"
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err + out and "trained to step" not in out, err[-3000:]
    (ckpt,) = list_checkpoints(tmp_path / "stopped")
    stopped_at = checkpoint_step(ckpt)
    assert 6 <= stopped_at < 60
    assert last_line(err) == (f"SIGTERM: stopped after step {stopped_at} of 60, checkpoint {ckpt} written; "
                              "rerun the same command to resume from it")
    assert_all_gone(helpers)  # loader workers (and the forkserver) ended with it
    assert not (tmp_path / "stopped" / "final.json").exists()

    r = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=600)  # the same command
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ckpt} at step {stopped_at}" in r.stderr
    _, straight_err = straight.communicate(timeout=600)
    assert straight.returncode == 0, straight_err[-3000:]
    a = torch.load(list_checkpoints(tmp_path / "straight")[-1], weights_only=True)
    b = torch.load(list_checkpoints(tmp_path / "stopped")[-1], weights_only=True)
    assert a["step"] == b["step"] == 60
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after the stop and resume"
    for k, state in a["optimizer"]["state"].items():
        assert all(torch.equal(state[n], b["optimizer"]["state"][k][n]) for n in state)
    # every logged number, the window that spans the stop included, as without the interruption
    assert without_timing(read_metrics(tmp_path / "stopped")) == without_timing(read_metrics(tmp_path / "straight"))

    # run again once finished: says so, changes nothing, exits 0
    before = (tmp_path / "stopped" / "metrics.jsonl").read_bytes()
    again = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "is already trained to step 60 (--steps 60); nothing to do" in last_line(again.stderr)
    assert (tmp_path / "stopped" / "metrics.jsonl").read_bytes() == before


def test_a_second_signal_stops_at_once_with_the_checkpoints_written_so_far(train_cache, tmp_path):
    cfg = tiny_train(train_cache, tmp_path / "run", steps=100000, ckpt_every=4, val_every=100000, log_every=1,
                     num_workers=1)
    proc = subprocess.Popen(train_cmd(cfg), env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    wait_for(lambda: trained_steps(tmp_path / "run") >= 5, timeout=300, proc=proc)
    helpers = descendants(proc.pid)
    # Both arrive together, no step boundary between them. Which one the process takes first is the kernel's
    # choice among its threads; the one taken second stops it.
    os.kill(proc.pid, signal.SIGSTOP)
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err[-3000:]
    first, second = ("SIGTERM", "SIGINT") if last_line(err).startswith("SIGINT after") else ("SIGINT", "SIGTERM")
    assert proc.returncode == 128 + signal.Signals[second], err[-3000:]
    newest = list_checkpoints(tmp_path / "run")[-1]
    assert checkpoint_step(newest) % 4 == 0  # a periodic one: the stop did not wait for a step to end
    assert last_line(err) == (f"{second} after {first}: stopped at once, the steps since the newest checkpoint are "
                              f"lost; the newest checkpoint is {newest}; rerun the same command to resume from it")
    assert_all_gone(helpers)


CUT_HANDOVER = """
import os, socket, sys, time
from multiprocessing import resource_sharer
if sys.argv[1] == "helper":
    from stages.core.runtime.processes import leave_stop_signals_to
    leave_stop_signals_to(os.getppid())
r, w = os.pipe()
handover = resource_sharer.DupFd(r)  # the sharer thread a tensor's file descriptor is handed over by
address, _ = handover._id
s = socket.socket(socket.AF_UNIX); s.connect(address); s.close()  # the receiver stopped mid-handshake
time.sleep(0.5)
"""


@pytest.mark.parametrize("role", ["plain", "helper"])
def test_a_loader_worker_stays_quiet_when_the_stopped_process_cuts_a_tensor_handover(role):
    """The stop at once can land while the training process takes a batch's file descriptors from a worker;
    the worker's sharer thread then sees the connection reset, which is the stop, not a worker error."""
    r = subprocess.run([sys.executable, "-c", CUT_HANDOVER, role], env=env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    # a plain process reports the cut connection; a loader worker does not
    assert ("Traceback" in r.stderr) == (role == "plain"), r.stderr[-2000:]


def test_ranks_stop_at_the_same_step_when_only_one_receives_the_signal(train_cache, tmp_path):
    """Two ranks started as srun starts them (one process each, the rendezvous in the environment); the
    scheduler's signal reaches rank 1 only."""
    cfg = tiny_train(train_cache, tmp_path / "run", steps=100000, ckpt_every=100000, val_every=100000, log_every=1,
                     num_workers=1)
    ranks = [subprocess.Popen(train_cmd(cfg), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29577"}) for r in range(2)]
    wait_for(lambda: trained_steps(tmp_path / "run") >= 4, timeout=300, proc=ranks[0])
    helpers = descendants(ranks[0].pid) + descendants(ranks[1].pid)
    os.kill(ranks[1].pid, signal.SIGTERM)
    try:
        errs = [r.communicate(timeout=120)[1] for r in ranks]
    finally:  # a rank that hangs is the failure; it is not left to run on
        for r in ranks:
            r.kill()
    assert [r.returncode for r in ranks] == [128 + signal.SIGTERM] * 2, [e[-2000:] for e in errs]
    assert not any("Traceback" in e for e in errs), [e[-2000:] for e in errs]
    (ckpt,) = list_checkpoints(tmp_path / "run")
    assert last_line(errs[0]).startswith(f"SIGTERM: stopped after step {checkpoint_step(ckpt)} of 100000")
    assert "SIGTERM" not in errs[1]  # one line for the run, from rank 0
    assert_all_gone(helpers)


RANK_END = """
import atexit, sys, time
import pipeline.cli as cli

class HeldUntilTeardown:  # as a gloo process group that DDP's reducer holds is, torn down by the interpreter
    def __del__(self):
        time.sleep(600)  # its threads joined with the GIL held, one of them waiting for the GIL

held = HeldUntilTeardown()
real_app = cli.app

def app(**kw):
    atexit.register(lambda: print("handler ran", flush=True))  # as trackers and multiprocessing register theirs
    real_app(**kw)

cli.app = app
sys.argv = ["repa", "cache", "info", sys.argv[1]]
cli.main()
"""


@pytest.mark.parametrize("world", ["2", "1"])
def test_a_rank_of_several_ends_with_its_status_after_its_handlers_not_in_the_interpreters_teardown(tmp_path, world):
    """A rank's work done, its atexit handlers run and the process ends with the command's status; what only
    the interpreter's teardown would release is left to the end of the process (a single process is left to
    the interpreter: it holds no process group)."""
    args = [sys.executable, "-c", RANK_END, str(tmp_path / "no-cache")]
    rank_env = {**env(), "WORLD_SIZE": world, "RANK": "1"}
    if world == "1":  # the planted hang is real: the command has ended and its handlers ran, the process has not
        with pytest.raises(subprocess.TimeoutExpired) as hung:
            subprocess.run(args, env=rank_env, cwd=ROOT, capture_output=True, text=True, timeout=15)
        out, err = (o.decode() if isinstance(o, bytes) else o or "" for o in (hung.value.stdout, hung.value.stderr))
        assert out.strip() == "handler ran" and f"error: {tmp_path / 'no-cache'}" in err, out + err
        return
    r = subprocess.run(args, env=rank_env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout.strip() == "handler ran", (r.stdout + r.stderr)[-2000:]
    assert last_line(r.stderr).startswith(f"error: {tmp_path / 'no-cache'}"), r.stderr[-2000:]


def _ranks(cfg, world: int, port: int) -> list[subprocess.Popen]:
    """``world`` training processes started as srun starts them (one process each, the rendezvous in the
    environment), or one plain process."""
    if world == 1:
        return [subprocess.Popen(train_cmd(cfg), env=env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)]
    return [subprocess.Popen(train_cmd(cfg), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in range(world)]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_run_stopped_by_sigterm_resumes_on_another_number_of_processes(train_cache, tmp_path, before, after):
    """Stopped by the scheduler's signal on ``before`` processes, the same command resumed on ``after`` ends where
    one uninterrupted process does, up to summation order (the constant schedule: what the steps see does not
    depend on when the stop came)."""
    from .test_train import final_val

    kw = dict(steps=14, ckpt_every=100000, val_every=14, log_every=1, keep_checkpoints=0, cond_dropout=0.3, lr=1e-2,
              num_workers=1)
    straight = subprocess.run(train_cmd(tiny_train(train_cache, tmp_path / "straight", **kw)), env=env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    cfg = tiny_train(train_cache, tmp_path / "run", **kw)
    ranks = _ranks(cfg, before, 29593 + before)
    wait_for(lambda: trained_steps(tmp_path / "run") >= 4, timeout=300, proc=ranks[0])
    os.kill(ranks[0].pid, signal.SIGTERM)
    errs = [r.communicate(timeout=180)[1] for r in ranks]
    assert [r.returncode for r in ranks] == [128 + signal.SIGTERM] * before, [e[-2000:] for e in errs]
    (ckpt,) = list_checkpoints(tmp_path / "run")
    assert 4 <= checkpoint_step(ckpt) < 14

    ranks = _ranks(cfg, after, 29597 + after)  # the same command, on another number of processes
    errs = [r.communicate(timeout=600)[1] for r in ranks]
    assert [r.returncode for r in ranks] == [0] * after, [e[-2000:] for e in errs]
    assert f"resumed from {ckpt} at step {checkpoint_step(ckpt)}" in errs[0]
    assert ("batch 8 = 1 proc x 2 accum x 4" if after == 1 else "batch 8 = 2 proc x 1 accum x 4") in errs[0]
    want = final_val(tmp_path / "straight")
    assert final_val(tmp_path / "run") == pytest.approx(want, rel=1e-3)


def test_stop_signals_are_configurable_and_checked(train_cache, tmp_path):
    with pytest.raises(UsageError, match="--stop-signals TERM,KILL: SIGKILL cannot be caught"):
        run_train(tiny_train(train_cache, tmp_path / "run", stop_signals="TERM,KILL"))
    with pytest.raises(UsageError, match="--stop-signals bogus: 'bogus' is not a signal"):
        run_train(tiny_train(train_cache, tmp_path / "run", stop_signals="bogus"))
    # USR2 stops it; USR1 (not in the set) keeps its default action: the process dies of it, no checkpoint
    cfg = tiny_train(train_cache, tmp_path / "run", steps=100000, ckpt_every=100000, val_every=100000,
                     stop_signals="USR2")
    for sig, status in ((signal.SIGUSR2, 128 + signal.SIGUSR2), (signal.SIGUSR1, -signal.SIGUSR1)):
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        proc = subprocess.Popen(train_cmd(cfg), env=env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        wait_for(lambda: trained_steps(tmp_path / "run") >= 4, timeout=300, proc=proc)
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == status, err[-2000:]
        assert bool(list_checkpoints(tmp_path / "run")) == (sig == signal.SIGUSR2)


def test_sigterm_of_an_encode_keeps_committed_parts_in_one_line(tiny_models, tmp_path):
    from stages.demo.data import write_demo_shards

    shards = write_demo_shards(tmp_path / "data", num_shards=4, samples_per_shard=8, seed=3)
    cfg = config(tiny_models, gated(shards, tmp_path / "never"), tmp_path / "c", num_workers=2)
    proc = subprocess.Popen(encode_cmd(cfg), env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    records = tmp_path / "c" / "records"
    wait_for(lambda: list(records.glob("*.json")), timeout=300, proc=proc)
    helpers = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    for noise in ("Traceback", "leaked semaphore", "ConnectionResetError", "Error"):
        assert noise not in err, err[-3000:]
    assert last_line(err) == ("SIGTERM: stopped; committed parts are kept and the parts in progress are redone: "
                              "rerun the same command to continue")
    assert_all_gone(helpers)
    kept = len(list(records.glob("*.json")))
    (tmp_path / "never").touch()  # the last shard can be read now
    r = subprocess.run(encode_cmd(cfg), env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{kept} already committed, {4 - kept} to do" in r.stderr  # the claims were released: no wait
    assert len(list(records.glob("*.json"))) == 4


def test_sigterm_of_a_sample_is_one_line_and_the_line_tells_the_truth(train_cache, tmp_path):
    run_train(tiny_train(train_cache, tmp_path / "run", cond="class", steps=2, val_every=2), log=lambda m: None)
    cmd = [sys.executable, "-m", "pipeline", "sample", "--run-dir", str(tmp_path / "run"), "--num-samples", "4000",
           "--steps", "50", "--batch-size", "1", "--out", str(tmp_path / "s")]
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(list((tmp_path / "s").glob("*.png"))) >= 2, timeout=300, proc=proc)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err + out, err[-3000:]
    assert last_line(err) == ("SIGTERM: stopped; the images written so far are kept; rerun the same command with "
                              "--overwrite to draw them all")
    kept = len(list((tmp_path / "s").glob("*.png")))
    assert kept >= 2 and not list((tmp_path / "s").glob(".*tmp*"))
    again = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    # without it the rerun is refused, as the line says
    assert "pass --overwrite to replace it" in one_line_error(again)
    assert len(list((tmp_path / "s").glob("*.png"))) == kept


# -- trackers -------------------------------------------------------------------------------------
@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """wandb as on a machine where nobody ran `wandb login`: no key anywhere it looks."""
    home = tmp_path / "home"
    home.mkdir()
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "wandb-config"))
    monkeypatch.setenv("WANDB_DIR", str(home / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return home


def wandb_run(train_cache, run: Path, report_to: str = "wandb", extra=()) -> subprocess.CompletedProcess:
    cmd = train_cmd(tiny_train(train_cache, run, steps=2, val_every=2, report_to=report_to)) + list(extra)
    return subprocess.run(cmd, env={**os.environ, **env()}, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_wandb_without_a_login_or_a_server_is_refused_before_the_run_directory_exists(train_cache, tmp_path,
                                                                                     no_wandb_login, monkeypatch):
    run = tmp_path / "runs" / "a"
    r = wandb_run(train_cache, run, "all")
    line = one_line_error(r)
    assert "--report-to all: not logged in to wandb; run `wandb login`" in line and "WANDB_MODE=offline" in line
    assert "--report-to tensorboard" in line
    assert not (tmp_path / "runs").exists()

    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")  # a key, but no server there
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_HTTP_TIMEOUT", "5")
    monkeypatch.setenv("REPA_WANDB_CHECK_SECONDS", "10")  # wandb itself retries for minutes
    line = one_line_error(wandb_run(train_cache, run))
    assert line.startswith("error: --report-to wandb: wandb cannot verify the login") and "WANDB_MODE=offline" in line
    assert not (tmp_path / "runs").exists()

    monkeypatch.setenv("WANDB_MODE", "offline")  # the fix the line gives works
    r = wandb_run(train_cache, run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((run / "wandb").glob("offline-run-*"))


def test_a_missing_wandb_is_refused_before_the_run_directory_exists(train_cache, tmp_path, monkeypatch):
    import stages.train.trackers as trackers

    monkeypatch.setattr(trackers, "wandb_installed", lambda: False)
    with pytest.raises(UsageError, match=r"wandb is not installed; pip install .* or use --report-to tensorboard"):
        run_train(tiny_train(train_cache, tmp_path / "runs" / "a", report_to="wandb"))
    assert not (tmp_path / "runs").exists()


def test_a_resumed_run_logs_each_step_once_in_one_tensorboard_folder_with_real_config_values(train_cache, tmp_path,
                                                                                            monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = tmp_path / "run"
    kw = dict(log_every=1, val_every=3, ckpt_every=3, report_to="tensorboard", num_workers=0)
    run_train(tiny_train(train_cache, run, steps=5, **kw), log=lambda m: None)  # logs steps 4 and 5 past step 3
    (run / "checkpoints" / "step-0000005.pt").unlink()  # as if it had been killed after step 5's log line
    (run / "final.json").unlink()
    run_train(tiny_train(train_cache, run, steps=8, **kw), log=lambda m: None)  # resumes from step 3

    assert [p for p in (run / "tb").iterdir() if p.is_dir()] == []  # no subfolder per start
    events = EventAccumulator(str(run / "tb")).Reload()
    steps = [e.step for e in events.Scalars("train/denoise")]
    assert steps == list(range(1, 9))  # 4 and 5 once, from the resumed run
    straight = tmp_path / "straight"
    run_train(tiny_train(train_cache, straight, steps=8, **kw), log=lambda m: None)
    expected = EventAccumulator(str(straight / "tb")).Reload()
    assert [e.value for e in events.Scalars("train/denoise")] == [e.value for e in expected.Scalars("train/denoise")]

    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    config = json.loads((run / "config.json").read_text())
    assert hparams["parameters"].number_value == config["parameters"] > 0
    assert hparams["cache_fingerprint"].string_value == config["cache_fingerprint"]
    assert hparams["lr"].number_value == 1e-3
    assert "run_name" not in hparams and "None" not in [v.string_value for v in hparams.values()]
