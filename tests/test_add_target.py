"""`repa encode --add-target`: a new alignment target beside an existing cache, nothing else touched."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cache_schema import CacheReader, FastReader, read_manifest, verify_cache
from cache_schema.format.layout import PARTS_DIR, RECORDS_DIR
from cache_schema.format.manifest import read_records, target_dir
from stages.core.errors import UsageError
from stages.encode.run import run_encode

from .encode_helpers import ROOT, assert_same_features, cli_args, env, repa, tiny_config
from .test_operations import one_line_error, wait_for


def _pattern(shards) -> str:
    return str(Path(shards[0]).parent / f"cc12m-train-{{0000..{len(shards) - 1:04d}}}.tar")


def _hashes(cache: Path) -> dict[str, str]:
    """sha256 of every file of the cache's own parts and records."""
    out = {}
    for sub in (PARTS_DIR, RECORDS_DIR):
        for path in sorted((cache / sub).rglob("*")):
            if path.is_file():
                out[str(path.relative_to(cache))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _add(cfg, name: str, model, **kw):
    return run_encode(tiny_config({"vae": cfg.vae, "dino": cfg.dino, "text": cfg.text_encoder}, cfg.source, cfg.cache,
                                  add_target=name, target_model=str(model), **kw))


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_models, demo_shards):
    """A demo cache (two input shards) and its config."""
    cfg = tiny_config(tiny_models, _pattern(demo_shards[:2]), tmp_path_factory.mktemp("add") / "cache")
    run_encode(cfg)
    return cfg


def test_adding_targets_leaves_every_stored_array_byte_identical(base, tiny_models, tmp_path):
    before, manifest = _hashes(base.cache), read_manifest(base.cache)
    summary = _add(base, "dino-reg", tiny_models["dino-reg"], class_tokens=True)
    _add(base, "siglip", tiny_models["siglip"])
    assert summary.encoded == manifest.num_samples == 48
    assert _hashes(base.cache) == before
    after = read_manifest(base.cache)
    assert after.fingerprint == manifest.fingerprint and after.fields == manifest.fields
    assert after.target_names() == ["dino", "dino-reg", "siglip"]
    entry = after.targets["dino-reg"]
    assert entry["settings"]["model"]["class"] == "Dinov2WithRegistersModel" and entry["settings"]["model"]["weights"]
    assert entry["grid"] == [4, 4] and entry["class_tokens"] == 5 and "imagenet" in entry["settings"]["preprocess"]
    assert after.targets["siglip"]["settings"]["model"]["class"] == "SiglipVisionModel"
    # the cache's own reader and checks see the cache as before; the added target's files are checked too
    assert len(CacheReader(base.cache)) == 48 and verify_cache(base.cache) == 48
    # same samples, same order, same crop: the added target equals a first encode with that model
    ref = tiny_config(tiny_models, str(Path(base.source).parent / "cc12m-train-0000.tar"), tmp_path / "ref",
                      dino=str(tiny_models["dino-reg"]), class_tokens=True)
    run_encode(ref)
    ref_reader, reader = FastReader(ref.cache), FastReader(base.cache)
    position = {k: i for i, k in enumerate(reader.keys.tolist())}
    ids = np.array([position[k] for k in ref_reader.keys.tolist()])
    reader.require_targets(["dino-reg", "siglip"])
    assert_same_features(reader.read("dino-reg", ids), ref_reader.read("dino", np.arange(len(ids))))
    assert_same_features(reader.read("dino-reg_cls", ids), ref_reader.read("dino_cls", np.arange(len(ids))))
    siglip = reader.read("siglip", np.arange(48))
    assert siglip.shape == (48, 16, 32) and np.isfinite(siglip).all() and np.abs(siglip).max() > 0


def test_rerunning_an_added_target_does_nothing_and_other_settings_are_refused(base, tiny_models):
    _add(base, "again", tiny_models["dino"])
    records = {r["name"]: r["writer"] for r in read_records(target_dir(base.cache, "again"))}
    assert _add(base, "again", tiny_models["dino"]).encoded == 0
    assert {r["name"]: r["writer"] for r in read_records(target_dir(base.cache, "again"))} == records
    with pytest.raises(Exception, match="other settings"):
        _add(base, "again", tiny_models["dino-reg"])
    with pytest.raises(UsageError, match="already has a field"):
        _add(base, "text", tiny_models["dino"])


def test_add_target_refuses_moved_or_changed_sources_and_finds_them_by_content(tiny_models, demo_shards, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(demo_shards[0], data / "cc12m-train-0000.tar")
    cfg = tiny_config(tiny_models, str(data / "cc12m-train-0000.tar"), tmp_path / "c")
    run_encode(cfg)
    moved = tmp_path / "moved.tar"
    os.rename(data / "cc12m-train-0000.tar", moved)
    no_source = tiny_config(tiny_models, "", cfg.cache)
    with pytest.raises(UsageError, match="is gone; pass --source"):
        _add(no_source, "t", tiny_models["dino-reg"])
    shutil.copy(demo_shards[1], data / "cc12m-train-0000.tar")  # same name, other content
    with pytest.raises(UsageError, match="changed since"):
        _add(no_source, "t", tiny_models["dino-reg"])
    with pytest.raises(UsageError, match="no shard of --source"):
        _add(cfg, "t", tiny_models["dino-reg"])
    moved_cfg = tiny_config(tiny_models, str(moved), cfg.cache)
    assert _add(moved_cfg, "t", tiny_models["dino-reg"]).encoded == 24


def test_add_target_never_runs_a_command_the_cache_records(base, tiny_models, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(base.cache, cache)
    marker = tmp_path / "ran"
    for record in (cache / RECORDS_DIR).glob("*.json"):  # what a shared cache's records could hold
        rec = json.loads(record.read_text())
        rec["source"] = f"pipe:touch {marker}; cat /dev/null"
        rec["source_id"] = f"url:{rec['source']}"  # as encode records a command it was given
        record.write_text(json.dumps(rec))
    no_source = tiny_config(tiny_models, "", cache)
    r = repa("encode", *cli_args(no_source)[2:], "--add-target", "t", "--target-model", str(tiny_models["dino-reg"]))
    assert not marker.exists()
    line = one_line_error(r)
    assert "a command or URL the cache records" in line and "pass --source 'pipe:touch" in line, line


def test_a_cut_short_target_record_is_named_by_verify_and_redone_by_rerunning_add_target(base, tiny_models, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(base.cache, cache)
    cfg = tiny_config(tiny_models, base.source, cache)
    _add(cfg, "cut", tiny_models["dino-reg"])
    record = next((target_dir(cache, "cut") / RECORDS_DIR).glob("*.json"))
    record.write_bytes(record.read_bytes()[:30])
    with pytest.raises(Exception, match="--add-target cut") as e:
        verify_cache(cache)
    assert record.name in str(e.value)
    assert _add(cfg, "cut", tiny_models["dino-reg"]).encoded == 24  # that one part again, nothing else
    assert verify_cache(cache) == 48


def test_kill_9_during_add_target_then_rerun_gives_every_sample_exactly_once(tmp_path, tiny_models):
    from stages.demo.data import write_demo_shards

    write_demo_shards(tmp_path / "data", num_shards=8, samples_per_shard=12, seed=2)
    cfg = tiny_config(tiny_models, str(tmp_path / "data" / "cc12m-train-{0000..0007}.tar"), tmp_path / "c",
                      text_encoder=None)
    run_encode(cfg)
    before = _hashes(cfg.cache)
    args = cli_args(cfg)
    args[args.index("--batch-size") + 1] = "1"  # a slow run, to be killed in the middle
    cmd = [sys.executable, "-m", "pipeline", "encode", *args, "--add-target", "big", "--target-model",
           str(tiny_models["dino-reg"])]
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    records = target_dir(cfg.cache, "big") / RECORDS_DIR
    wait_for(lambda: len(list(records.glob("*.json"))) >= 2, timeout=240, proc=proc)
    assert proc.poll() is None, "the add-target run finished before it could be killed; make the job longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= len(read_records(target_dir(cfg.cache, "big"))) < 8
    with pytest.raises(Exception, match="target big of part"):
        FastReader(cfg.cache).require_targets(["big"])
    _add(cfg, "big", tiny_models["dino-reg"])  # the rerun
    reader = FastReader(cfg.cache)
    reader.require_targets(["big"])
    keys = reader.keys.tolist()
    assert len(keys) == len(set(keys)) == 96
    for part in read_manifest(cfg.cache).parts:
        rec = next(r for r in read_records(target_dir(cfg.cache, "big")) if r["name"] == part["name"])
        assert rec["num_samples"] == part["num_samples"] and rec["base"]["writer"] == part["writer"]
    assert np.isfinite(reader.read("big", np.arange(96))).all()
    assert not [p for p in (target_dir(cfg.cache, "big") / PARTS_DIR).iterdir() if p.name.startswith(".tmp-")]
    assert _hashes(cfg.cache) == before


def test_verify_checks_the_files_and_keys_of_added_targets(base, tiny_models, tmp_path):
    _add(base, "checked", tiny_models["dino-reg"])
    copy = tmp_path / "copy"
    shutil.copytree(base.cache, copy)
    assert verify_cache(copy) == 48
    shard = next(p for p in (target_dir(copy, "checked") / PARTS_DIR).rglob("c/*") if p.is_file())
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(Exception, match="truncated or replaced.*targets/checked/records.*--add-target checked"):
        verify_cache(copy)
