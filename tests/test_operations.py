"""Operator events on a cache and a run: concurrent and retried encodes, damaged files, partial caches,
non-finite values, repair, killed processes, crafted files, busy run directories, full disks."""

from __future__ import annotations

import errno
import itertools
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import zarr
from typer.testing import CliRunner

from cache_schema import CacheError, CacheReader, FastReader, read_manifest, verify_cache
from cache_schema.format.layout import PARTS_DIR, RECORDS_DIR
from pipeline.cli import app
from stages.core.errors import UsageError
from stages.core.files.checkpoint import load_checkpoint
from stages.encode.run import run_encode
from stages.train.loop import run_train

from .encode_helpers import ROOT, cli_args, env, repa, tar_keys, tiny_config
from .test_train import tiny_train, train_cli_args

MARKER = "pwned"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    from stages.demo.data import write_demo_shards

    return write_demo_shards(tmp_path_factory.mktemp("ops-data"), num_shards=6, samples_per_shard=8, seed=7)


def pattern(paths: list[Path]) -> str:
    return "::".join(str(p) for p in paths)


def gated(paths: list[Path], gate: Path) -> str:
    """The shards as pipe: sources, the last of which waits until ``gate`` exists: the job stays alive,
    holding its claim on that shard, for as long as the test needs."""
    *first, last = paths
    return "::".join([f"pipe:cat {p}" for p in first]
                     + [f"pipe:while [ ! -e {gate} ]; do sleep 0.05; done; cat {last}"])


def config(models, source: str, cache: Path, **kw):
    return tiny_config(models, source, cache, **{"text_encoder": None, "batch_size": 4, "shard_size": 4, **kw})


def encode_cmd(cfg, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "encode", *cli_args(cfg), *extra]


def all_keys_once(cache: Path, shards: list[Path]) -> None:
    keys = CacheReader(cache).keys.tolist()
    assert sorted(keys) == sorted(tar_keys(shards)) and len(keys) == len(set(keys))
    verify_cache(cache)


def wait_for(predicate, timeout: float = 120, proc=None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode})")
        time.sleep(0.05)
    raise AssertionError("timed out")


def one_line_error(r) -> str:
    """The error line of a failed `repa` (a subprocess result or an in-process CliRunner result)."""
    code = r.returncode if hasattr(r, "returncode") else r.exit_code
    assert code == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert getattr(r, "exception", None) is None or isinstance(r.exception, SystemExit), r.exception
    return r.stderr.strip().splitlines()[-1]


def cli(*args: str):
    """`repa ARGS` in this process: the same code path as the command line, without a new interpreter."""
    return CliRunner().invoke(app, [str(a) for a in args])


# -- several writers ------------------------------------------------------------------------------
def test_jobs_on_the_same_or_disjoint_shards_encode_each_sample_once(tiny_models, shards, tmp_path):
    same = config(tiny_models, pattern(shards), tmp_path / "same")  # two jobs, one list: the claims share it out
    halves = [config(tiny_models, pattern(shards[:3]), tmp_path / "halves"),
              config(tiny_models, pattern(shards[3:]), tmp_path / "halves")]
    outs = []
    for pair in ((same, same), halves):  # each pair at once; two pairs at once would only crowd two cores
        procs = [subprocess.Popen(encode_cmd(c), env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for c in pair]
        outs += [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    encoded = [int(o[0].split("encoded ", 1)[1].split()[0]) for o in outs]
    assert encoded[0] + encoded[1] == 48  # no sample was encoded by both jobs
    for cache in ("same", "halves"):
        all_keys_once(tmp_path / cache, shards)
        assert read_manifest(tmp_path / cache).complete


def test_a_retry_or_an_overwrite_while_a_job_runs_leaves_its_work_alone(tiny_models, shards, tmp_path):
    cfg = config(tiny_models, gated(shards[:4], tmp_path / "go"), tmp_path / "c")
    first = subprocess.Popen(encode_cmd(cfg), env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    wait_for(lambda: list((tmp_path / "c" / RECORDS_DIR).glob("*.json")), proc=first)
    retry = subprocess.Popen(encode_cmd(cfg), env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    overwrite = subprocess.Popen(encode_cmd(cfg, "--overwrite"), env=env(), cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    out, err = retry.communicate(timeout=300)
    assert retry.returncode == 0, err[-2000:]
    assert "being encoded by other processes" in err and "encoded 0 samples" in out
    _, err = overwrite.communicate(timeout=300)
    line = one_line_error(subprocess.CompletedProcess(overwrite.args, overwrite.returncode, "", err))
    assert "--overwrite refused" in line and "being written" in line
    (tmp_path / "go").touch()
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    all_keys_once(tmp_path / "c", shards[:4])


# -- damaged files are found, named, and never read as zeros --------------------------------------
@pytest.fixture()
def cache(tiny_models, shards, tmp_path) -> Path:
    run_encode(config(tiny_models, pattern(shards[:2]), tmp_path / "c", text_encoder=str(tiny_models["text"]),
                      max_text_tokens=8))
    return tmp_path / "c"


def shard_file(cache: Path, array: str = "dino") -> tuple[str, Path]:
    name = read_manifest(cache).part_names()[0]
    return name, cache / PARTS_DIR / f"{name}.zarr" / array / "c" / "1" / "0" / "0"


DAMAGES = {
    "missing": lambda f: f.unlink(),
    "zero-length": lambda f: f.write_bytes(b""),
    "truncated": lambda f: f.write_bytes(f.read_bytes()[:-100]),
    "garbage": lambda f: f.write_bytes(np.random.default_rng(0).bytes(f.stat().st_size)),
    "bit-rot": lambda f: f.write_bytes(_flip(f.read_bytes(), 1000)),
}


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:]


@pytest.mark.parametrize("damage", DAMAGES)
def test_verify_finds_every_kind_of_damage_and_names_the_part_and_file(cache, damage):
    name, path = shard_file(cache)
    DAMAGES[damage](path)
    with pytest.raises(CacheError) as e:
        verify_cache(cache)
    assert f"part {name}" in str(e.value) and "dino" in str(e.value) and "--repair" in str(e.value)
    if damage in ("missing", "zero-length", "truncated"):
        assert "dino/c/1/0/0" in str(e.value)
        quick = cli("cache", "verify", "--quick", cache)  # sizes alone find these
        assert quick.exit_code == 1 and f"BAD {name}" in quick.stderr and "1 bad part(s)" in quick.stdout
        assert re.search(r"verify: 100%.*\| (\d+)/\1 \[.*part/s", quick.stderr)  # progress with rate and ETA


def test_quick_verify_reads_the_small_arrays_but_not_the_feature_shards(cache):
    name = read_manifest(cache).part_names()[0]
    DAMAGES["bit-rot"](shard_file(cache)[1])  # a feature shard: same size, one bit flipped
    assert cli("cache", "verify", "--quick", cache).exit_code == 0
    key_chunk = cache / PARTS_DIR / f"{name}.zarr" / "key" / "c" / "0"
    DAMAGES["bit-rot"](key_chunk)  # keys: a few bytes per sample, read by the quick check too
    quick = cli("cache", "verify", "--quick", cache)
    assert quick.exit_code == 1 and f"BAD {name}" in quick.stderr and "key" in quick.stderr


@pytest.mark.parametrize("damage", ["missing", "garbage", "bit-rot"])
def test_the_training_reader_never_serves_damaged_data(cache, damage):
    name, path = shard_file(cache)
    reader = FastReader(cache)
    reader.read("dino", np.arange(len(reader)))  # opens every store while the files are sound
    DAMAGES[damage](path)  # e.g. `encode --overwrite` or a bad copy while a training runs
    with pytest.raises(CacheError, match=f"part {name}"):
        reader.read("dino", np.arange(len(reader)))


def test_training_on_a_damaged_part_stops_with_one_line(cache, tmp_path):
    _, path = shard_file(cache)
    DAMAGES["garbage"](path)
    r = cli("train", *train_cli_args(tiny_train(cache, tmp_path / "run", steps=6, val_fraction=0.2)))
    assert "cannot be read" in one_line_error(r)


def test_damage_found_in_a_loader_worker_is_the_workers_own_one_line(cache, tmp_path):
    name, path = shard_file(cache)
    DAMAGES["bit-rot"](path)
    cfg = tiny_train(cache, tmp_path / "run", steps=6, val_fraction=0.2, num_workers=1)
    r = repa("train", *train_cli_args(cfg))
    line = one_line_error(r)  # exit status 2, no traceback
    assert line.startswith("error: ") and f"part {name}" in line and "dino" in line, line
    assert "DataLoader worker" not in r.stderr, r.stderr[-2000:]


def test_garbage_keys_and_a_manifest_of_the_wrong_shape_are_one_line_errors(cache, tmp_path):
    name = read_manifest(cache).part_names()[0]
    key_chunk = cache / PARTS_DIR / f"{name}.zarr" / "key" / "c" / "0"
    key_chunk.write_bytes(np.random.default_rng(1).bytes(key_chunk.stat().st_size))
    line = one_line_error(cli("train", *train_cli_args(tiny_train(cache, tmp_path / "run", steps=2))))
    assert f"part {name}" in line and "key" in line
    (cache / "manifest.json").write_text(json.dumps({"schema_version": 2, "settings": []}))
    for args in (["cache", "info", str(cache)], ["train", *train_cli_args(tiny_train(cache, tmp_path / "r2"))]):
        assert "not a cache manifest" in one_line_error(cli(*args))


# -- partial caches -------------------------------------------------------------------------------
def test_a_partial_cache_is_refused_unless_allowed_and_a_run_keeps_its_parts(tiny_models, shards, tmp_path):
    cache = tmp_path / "c"
    run_encode(config(tiny_models, pattern(shards), cache, max_samples=20))  # a trial: parts missing or cut short
    assert not read_manifest(cache).complete
    with pytest.raises(UsageError, match="incomplete: .*--allow-partial"):
        run_train(tiny_train(cache, tmp_path / "run", cond="none", steps=2, val_fraction=0.2))
    run_train(tiny_train(cache, tmp_path / "run", cond="none", steps=2, val_fraction=0.2, allow_partial=True))
    trained = json.loads((tmp_path / "run" / "config.json").read_text())["train_samples"]
    run_encode(config(tiny_models, pattern(shards), cache))  # the encode finishes; the cache grows
    assert read_manifest(cache).complete and read_manifest(cache).num_samples == 48
    run_train(tiny_train(cache, tmp_path / "run", cond="none", steps=4, val_fraction=0.2, allow_partial=True,
                         resume=True))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train_samples"] == trained


# -- finite or refused ------------------------------------------------------------------------------
def test_non_finite_features_are_skipped_and_recorded(tiny_models, shards, tmp_path, monkeypatch):
    from stages.core.encoders.features import FeatureEncoders

    vae = FeatureEncoders._vae_moments

    def overflowing(self, images):  # the sample whose pixels sum highest overflows fp16, as a real VAE might
        moments = vae(self, images)
        worst = images.flatten(1).float().sum(1).argmax()
        moments[worst] = float("inf")
        return moments

    monkeypatch.setattr(FeatureEncoders, "_vae_moments", overflowing)
    summary = run_encode(config(tiny_models, pattern(shards[:2]), tmp_path / "c"))
    man = read_manifest(tmp_path / "c")
    bad = [s for s in man.skipped if s["reason"].startswith("non-finite")]
    assert len(bad) == 4 and summary.skipped["non-finite"] == 4  # one per batch of 4, 16 samples
    assert all(s["reason"] == "non-finite: moments features" and s["key"] for s in bad)
    assert man.num_samples == 12 and all(np.isfinite(man.latent["mean"]))
    verify_cache(tmp_path / "c")

    monkeypatch.setattr(FeatureEncoders, "_vae_moments", lambda self, images: vae(self, images) * float("inf"))
    with pytest.raises(UsageError, match="every sample of a batch of 8 gave non-finite moments .* --dtype bf16"):
        run_encode(config(tiny_models, pattern(shards[2:3]), tmp_path / "c2", batch_size=8))


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(train_cache, tmp_path):
    import shutil

    from stages.core.data.split import split_ids
    from stages.train.data import EpochBatchSampler

    cache = tmp_path / "cache"
    shutil.copytree(train_cache, cache)
    reader = CacheReader(cache)
    train_ids, _ = split_ids(reader.keys, 0.1)
    step_six = list(itertools.islice(EpochBatchSampler(train_ids, 8, seed=0), 6))[-1]
    part, row = reader.locate(int(step_six[0]))  # one sample, first read at step 6: one bad value in the cache
    moments = zarr.open_group(str(cache / PARTS_DIR / f"{reader.parts[part]['name']}.zarr"), mode="r+")["moments"]
    moments[row] = np.full(moments.shape[1:], np.inf, dtype=np.float16)
    cfg = tiny_train(cache, tmp_path / "run", steps=30, ckpt_every=2, log_every=1, val_every=100, keep_checkpoints=2)
    with pytest.raises(UsageError, match="non-finite .* the last good checkpoint is"):
        run_train(cfg)
    from stages.core.files.checkpoint import list_checkpoints, load_checkpoint

    kept = list_checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["step-0000002.pt", "step-0000004.pt"]
    for path in kept:
        ckpt = load_checkpoint(path)
        assert all(torch.isfinite(t).all() for part in ("model", "ema") for t in ckpt[part].values())
    assert not (tmp_path / "run" / "final.json").exists()


# -- repair instead of start over -----------------------------------------------------------------
def test_a_trial_then_a_rerun_completes_every_part(tiny_models, shards, tmp_path):
    cfg = config(tiny_models, pattern(shards), tmp_path / "c")
    run_encode(config(tiny_models, pattern(shards), tmp_path / "c", max_samples=12))
    assert read_manifest(tmp_path / "c").incomplete_parts()
    run_encode(cfg)
    man = read_manifest(tmp_path / "c")
    assert man.complete and not man.incomplete_parts() and not man.skipped
    all_keys_once(tmp_path / "c", shards)


def test_one_shard_by_two_spellings_is_one_part(tiny_models, shards, tmp_path, monkeypatch):
    monkeypatch.chdir(shards[0].parent)
    run_encode(config(tiny_models, str(shards[0]), tmp_path / "c"))
    again = run_encode(config(tiny_models, shards[0].name, tmp_path / "c"))  # relative this time
    assert again.encoded == 0 and read_manifest(tmp_path / "c").num_samples == 8
    with pytest.raises(UsageError, match="same input shard twice"):
        run_encode(config(tiny_models, f"{shards[0]}::{shards[0].name}", tmp_path / "c"))


def test_damaged_named_and_rotten_parts_are_redone_and_nothing_else(tiny_models, shards, tmp_path):
    cfg = config(tiny_models, pattern(shards[:3]), tmp_path / "c")
    run_encode(cfg)
    parts = read_manifest(tmp_path / "c").part_names()
    before = {p["name"]: p["committed"] + p["writer"] for p in read_manifest(tmp_path / "c").parts}

    def rewritten() -> set[str]:
        now = {p["name"]: p["committed"] + p["writer"] for p in read_manifest(tmp_path / "c").parts}
        changed = {n for n in now if now[n] != before[n]}
        before.update(now)
        return changed

    (tmp_path / "c" / PARTS_DIR / f"{parts[0]}.zarr" / "moments" / "c" / "0" / "0" / "0" / "0").unlink()
    assert run_encode(cfg).parts == 1 and rewritten() == {parts[0]}  # a plain rerun notices a missing file
    run_encode(config(tiny_models, cfg.source, cfg.cache, redo=[parts[1]]))
    assert rewritten() == {parts[1]}
    path = tmp_path / "c" / PARTS_DIR / f"{parts[2]}.zarr" / "dino" / "c" / "0" / "0" / "0"
    path.write_bytes(_flip(path.read_bytes(), 100))  # same size: only a full check sees it
    assert run_encode(cfg).parts == 0
    assert run_encode(config(tiny_models, cfg.source, cfg.cache, repair=True)).parts == 1
    assert rewritten() == {parts[2]}
    all_keys_once(tmp_path / "c", shards[:3])


def test_a_cut_short_record_is_named_by_readers_and_encoded_again_by_repair_or_a_rerun(tiny_models, shards, tmp_path):
    cfg = config(tiny_models, pattern(shards[:2]), tmp_path / "c")
    run_encode(cfg)
    name = read_manifest(cfg.cache).part_names()[0]
    record = tmp_path / "c" / RECORDS_DIR / f"{name}.json"
    for again in (["--repair"], []):
        record.write_bytes(record.read_bytes()[:40])  # e.g. a copy cut off, or a disk that filled
        for reader in (cli("cache", "verify", cfg.cache),
                       cli("train", *train_cli_args(tiny_train(cfg.cache, tmp_path / "run", steps=2)))):
            line = one_line_error(reader)
            assert f"{name}.json" in line and "rerun the encode command" in line, line
        r = cli("encode", *cli_args(cfg), *again)  # the command the message names
        assert r.exit_code == 0, r.stderr[-2000:]
        assert "encoded 8 samples into 1 part(s)" in r.stdout and f"redo {name}: its record cannot be read" in r.stderr
        all_keys_once(cfg.cache, shards[:2])


# -- no orphans -----------------------------------------------------------------------------------
def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def workers(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.name() in ("pt_data_worker", "python", "python3"):
                out.append(p)
        except psutil.NoSuchProcess:  # a short-lived `cat` of a pipe: source
            pass
    return out


def assert_all_gone(procs: list[psutil.Process], timeout: float = 20) -> None:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"


def test_killing_an_encode_with_kill_9_or_sigterm_leaves_no_process_behind(tiny_models, shards, tmp_path):
    procs = {}
    for sig in (signal.SIGKILL, signal.SIGTERM):
        cfg = config(tiny_models, gated(shards, tmp_path / "never"), tmp_path / f"c{int(sig)}", num_workers=2)
        procs[sig] = subprocess.Popen(encode_cmd(cfg), env=env(), cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL)
    for sig, proc in procs.items():
        wait_for(lambda pid=proc.pid: len(workers(descendants(pid))) >= 2, proc=proc)  # both decode workers
        children = descendants(proc.pid)
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
        assert_all_gone(children)
        assert proc.stdout.read() == b""  # the pipe closed: nobody holds the caller's stdout open


def test_killing_a_training_leaves_no_process_behind(train_cache, tmp_path):
    cfg = tiny_train(train_cache, tmp_path / "run", steps=100000, num_workers=1, val_every=100000, ckpt_every=100000)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train", *train_cli_args(cfg)], env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (tmp_path / "run" / "metrics.jsonl").exists() and len(descendants(proc.pid)) >= 2, proc=proc)
    children = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert_all_gone(children)


def test_killing_the_launcher_of_a_two_process_sample_ends_both_ranks(train_cache, tmp_path):
    run_train(tiny_train(train_cache, tmp_path / "run", cond="class", steps=2, val_every=2), log=lambda m: None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           "-m", "pipeline", "sample", "--run-dir", str(tmp_path / "run"), "--num-samples", "4000", "--steps", "50",
           "--batch-size", "1", "--out", str(tmp_path / "s")]
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: len(list((tmp_path / "s").glob("*.png"))) >= 2, timeout=180, proc=proc)
    ranks = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    assert_all_gone(ranks)


# -- no code from data ----------------------------------------------------------------------------
class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_checkpoints_and_previews_do_not_run_code(train_cache, tmp_path):
    run_train(tiny_train(train_cache, tmp_path / "run", steps=2, val_every=2, preview_every=2), log=lambda m: None)
    marker = tmp_path / MARKER
    evil = tmp_path / "evil.pt"
    torch.save({"step": 1, "model": Payload(marker)}, evil)
    (tmp_path / "run" / "previews" / "step-0000002.pt").write_bytes(evil.read_bytes())
    attempts = [
        ["sample", "--run-dir", str(tmp_path / "run"), "--checkpoint", str(evil), "--out", str(tmp_path / "s")],
        ["train", *train_cli_args(tiny_train(train_cache, tmp_path / "run", steps=4)), "--resume-from", str(evil)],
        ["decode-previews", str(tmp_path / "run")],
    ]
    for args in attempts:
        line = one_line_error(cli(*args))
        assert "not a loadable" in line, line
        assert not marker.exists(), f"`repa {args[0]}` ran code stored in a file"


def test_a_caches_recorded_pipe_command_is_never_run(train_cache, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(train_cache, cache)
    marker = tmp_path / MARKER
    for record in (cache / RECORDS_DIR).glob("*.json"):  # what a malicious cache could record
        rec = json.loads(record.read_text())
        rec["source"] = rec["source_id"] = f"pipe:touch {marker}; cat /dev/null"
        record.write_text(json.dumps(rec))
    run_train(tiny_train(cache, tmp_path / "run", steps=2, val_every=2), log=lambda m: None)
    r = cli("evaluate", "--run-dir", tmp_path / "run", "--make-reference", tmp_path / "ref.npz")
    assert "run only when given here" in one_line_error(r)
    assert not marker.exists()


# -- one training per run directory ---------------------------------------------------------------
def test_a_second_training_on_a_busy_run_dir_is_refused_and_a_killed_one_does_not_block(train_cache, tmp_path):
    cfg = tiny_train(train_cache, tmp_path / "run", steps=100000, val_every=100000, ckpt_every=5)
    first = subprocess.Popen([sys.executable, "-m", "pipeline", "train", *train_cli_args(cfg)], env=env(), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: list((tmp_path / "run" / "checkpoints").glob("*.pt")), proc=first)
    line = one_line_error(cli("train", *train_cli_args(cfg), "--resume"))
    assert "is in use by process" in line
    first.kill()
    first.wait()
    from stages.core.files.checkpoint import checkpoint_step, latest_checkpoint

    reached = checkpoint_step(latest_checkpoint(tmp_path / "run"))
    r = cli("train", *train_cli_args(tiny_train(train_cache, tmp_path / "run", steps=reached + 2, val_every=100000,
                                                ckpt_every=5)), "--resume")
    assert r.exit_code == 0 and "resumed from" in r.stderr, r.stderr[-2000:]


# -- a full disk and other machine troubles are one line ------------------------------------------
def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "/full/disk/file")


def test_a_full_disk_is_a_one_line_error_and_keeps_committed_work(tiny_models, shards, train_cache, tmp_path,
                                                                  monkeypatch):
    cfg = config(tiny_models, pattern(shards[:2]), tmp_path / "c")
    run_encode(config(tiny_models, pattern(shards[:1]), tmp_path / "c"))
    monkeypatch.setattr("cache_schema.writing.writer.fsync_tree", _no_space)
    assert "no space left" in one_line_error(cli("encode", *cli_args(cfg)))
    assert read_manifest(tmp_path / "c").num_samples == 8  # the committed part is kept
    monkeypatch.setattr("torch.save", _no_space)
    line = one_line_error(cli("train", *train_cli_args(tiny_train(train_cache, tmp_path / "run", steps=3))))
    assert "No space left on device" in line and "free space" in line


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_leaves_no_temporary_file(train_cache, tmp_path,
                                                                                      monkeypatch):
    real_save, calls = torch.save, []

    def full_disk_on_the_second(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"half a checkpoint")  # torch reports a full disk as a RuntimeError, not an OSError
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    monkeypatch.setattr("torch.save", full_disk_on_the_second)
    run = tmp_path / "run"
    line = one_line_error(cli("train", *train_cli_args(tiny_train(train_cache, run, steps=6, ckpt_every=3))))
    assert len(calls) == 2
    assert "step-0000006.pt" in line and "file write failed" in line and "kept" in line, line
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000003.pt"]  # no hidden .tmp file left
    monkeypatch.setattr("torch.save", real_save)
    assert load_checkpoint(ckpts / "step-0000003.pt")["step"] == 3


def test_a_failed_preview_write_is_one_line_and_leaves_no_half_preview(train_cache, tmp_path, monkeypatch):
    real_save = torch.save

    def full_disk_on_the_second_preview(obj, f, *args, **kwargs):
        if "step-0000004.pt" in str(f) and "previews" in str(f):
            Path(f).write_bytes(b"half a preview")
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr("torch.save", full_disk_on_the_second_preview)
    run = tmp_path / "run"
    cfg = tiny_train(train_cache, run, steps=6, ckpt_every=2, val_every=2, preview_every=2)
    line = one_line_error(cli("train", *train_cli_args(cfg)))
    assert "previews/step-0000004.pt: preview not written" in line and "file write failed" in line, line
    assert sorted(p.name for p in (run / "previews").iterdir()) == ["step-0000002.pt"]  # no half or hidden file
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002.pt"]
    monkeypatch.setattr("torch.save", real_save)
    assert torch.load(run / "previews" / "step-0000002.pt", weights_only=True)["step"] == 2


def test_an_unwritable_sample_folder_is_a_one_line_error(train_cache, tmp_path):
    run_train(tiny_train(train_cache, tmp_path / "run", cond="class", steps=2, val_every=2), log=lambda m: None)
    (tmp_path / "file").write_text("x")
    line = one_line_error(cli("sample", "--run-dir", tmp_path / "run", "--out", tmp_path / "file" / "s"))
    assert line.startswith("error: --out") and "not writable" in line


def test_pickle_payload_helper_really_runs_code(tmp_path):
    """The crafted files above would have run a command had they been loaded with pickle."""
    pickle.loads(pickle.dumps(Payload(tmp_path / MARKER)))
    assert (tmp_path / MARKER).exists()
