"""Stage one end to end on tiny encoders: contents, resume, multi-process, bad input, errors, dry run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import zarr

from cache_schema import CacheError, CacheReader, read_manifest, verify_cache
from cache_schema.format.layout import PARTS_DIR
from stages.core.encoders.features import dino_preprocess
from stages.core.encoders.images import Prepared, prepare_sample
from stages.core.encoders.load import EncoderLoadError
from stages.core.encoders.tars import SourceError
from stages.encode.run import run_encode

from .encode_helpers import (
    ROOT,
    assert_ranks_let_go_of_the_process_group,
    cli_args,
    env,
    jpeg,
    repa,
    tar_keys,
    tiny_config,
    two_nodes,
    write_bad_corpus,
)
from .test_operations import gated, wait_for


def _pattern(shards) -> str:
    return str(Path(shards[0]).parent / f"cc12m-train-{{0000..{len(shards) - 1:04d}}}.tar")


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory, tiny_models, demo_shards):
    cache = tmp_path_factory.mktemp("enc") / "cache"
    summary = run_encode(tiny_config(tiny_models, _pattern(demo_shards), cache))
    return cache, summary


def test_demo_encodes_every_sample_with_the_right_contents(demo_cache, demo_shards, tiny_models):
    cache, summary = demo_cache
    keys = tar_keys(demo_shards)
    reader = CacheReader(cache)
    assert summary.encoded == len(keys) == len(reader) == 72
    assert sorted(reader.keys.tolist()) == sorted(keys)
    assert verify_cache(cache) == 72
    man = reader.manifest
    assert man.latent["channels"] == 4 and man.latent["size"] == 8 and man.latent["scaling_factor"] == 0.18215
    assert man.dino["tokens"] == 16 and man.dino["grid"] == [4, 4]  # 64 px -> 56 px DINO input -> 4x4 patches
    assert man.text["dim"] == read_manifest(cache).fields["text"]["shape"][0]
    assert len(man.latent["mean"]) == 4 and all(s > 0 for s in man.latent["std"])

    # one sample recomputed by hand from the tar with the same encoders
    from diffusers import AutoencoderKL
    from transformers import AutoModel, AutoTokenizer, T5EncoderModel

    raw = next(iter(wds.WebDataset(str(demo_shards[1]), shardshuffle=False)))
    prep = prepare_sample(raw, 64, 10**9, draft=False)
    assert isinstance(prep, Prepared)
    idx = reader.keys.tolist().index(raw["__key__"])
    got = reader.sample(idx)
    assert got["caption"] == raw["txt"].decode().strip() and got["source"] == str(demo_shards[1])
    x = torch.from_numpy(prep.image.copy()).permute(2, 0, 1)[None]
    with torch.no_grad():
        dist = AutoencoderKL.from_pretrained(tiny_models["vae"]).encode(x.float() / 127.5 - 1).latent_dist
        dino_model = AutoModel.from_pretrained(tiny_models["dino"])
        table = dino_model.embeddings.position_embeddings.data  # resampled once with antialias, as official REPA
        side = int((table.shape[1] - 1) ** 0.5)
        grid = torch.nn.functional.interpolate(table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2), size=(4, 4),
                                               mode="bicubic", antialias=True, align_corners=False)
        dino_model.embeddings.position_embeddings.data = torch.cat([table[:, :1], grid.flatten(2).transpose(1, 2)], 1)
        dino = dino_model(pixel_values=dino_preprocess(x, 64)).last_hidden_state[:, 1:]
        tok = AutoTokenizer.from_pretrained(tiny_models["text"])(got["caption"], max_length=16, truncation=True,
                                                                 return_tensors="pt")
        text = T5EncoderModel.from_pretrained(tiny_models["text"])(**tok).last_hidden_state[0]
    np.testing.assert_allclose(got["moments"], torch.cat([dist.mean, dist.std], 1)[0].numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(got["dino"].astype(np.float32), dino[0].numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(got["text"].astype(np.float32), text.numpy(), atol=2e-3, rtol=2e-3)


def test_cache_is_plain_zarr_readable_without_the_project_reader(demo_cache):
    cache, _ = demo_cache
    part = json.loads(sorted((cache / "records").glob("*.json"))[0].read_text())  # plain JSON, one per part
    g = zarr.open_group(str(cache / PARTS_DIR / f"{part['name']}.zarr"), mode="r")
    n = part["num_samples"]
    assert g["moments"].shape == (n, 8, 8, 8) and g["moments"].dtype == np.float16
    assert g["dino"].shape[:2] == (n, 16) and g["key"].shape == (n,)
    offs = g["text_offsets"][:]
    assert offs[0] == 0 and offs[-1] == g["text"].shape[0] == part["num_text_tokens"]
    assert g.attrs["part"]["source"] == part["source"] and part["complete"] is True


def test_rerun_skips_committed_parts(demo_cache, tiny_models, demo_shards):
    cache, _ = demo_cache
    before = read_manifest(cache)
    again = run_encode(tiny_config(tiny_models, _pattern(demo_shards), cache))
    assert again.encoded == 0 and again.parts == 0
    assert read_manifest(cache).parts == before.parts


def test_int8_features_are_close_to_fp16(demo_cache, tiny_models, demo_shards, tmp_path):
    cache, _ = demo_cache
    run_encode(tiny_config(tiny_models, str(demo_shards[0]), tmp_path / "int8", feature_codec="int8"))
    q, ref = CacheReader(tmp_path / "int8"), CacheReader(cache)
    assert q.manifest.fields["dino"]["dtype"] == "int8"
    ref_index = {k: i for i, k in enumerate(ref.keys.tolist())}
    cos = []
    for i in range(len(q)):
        a, b = q.sample(i), ref.sample(ref_index[q.keys[i]])
        for x, y in ((a["dino"], b["dino"]), (a["text"], b["text"])):
            x, y = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32))
            cos.append(torch.nn.functional.cosine_similarity(x, y, dim=-1))
    assert torch.cat(cos).min() >= 0.999
    assert q.manifest.bytes_per_sample()["dino"] < 0.6 * ref.manifest.bytes_per_sample()["dino"]


def test_bad_input_is_skipped_with_reasons_and_nothing_else_is_lost(tmp_path, tiny_models):
    shards, expected, kept = write_bad_corpus(tmp_path / "bad")
    cfg = tiny_config(tiny_models, str(tmp_path / "bad" / "bad-{0000..0001}.tar"), tmp_path / "c", max_pixels=500 * 500)
    summary = run_encode(cfg)
    reader = CacheReader(tmp_path / "c")
    assert sorted(reader.keys.tolist()) == sorted(kept)
    man = reader.manifest
    by_key = {s["key"]: s["reason"].split(":")[0] for s in man.skipped if s["key"]}
    assert by_key == expected
    breaks = [s for s in man.skipped if s["key"] is None]
    assert len(breaks) == 1
    assert breaks[0]["reason"].startswith("truncated-tar") and breaks[0]["source"] == str(shards[1])
    assert summary.skipped["truncated-tar"] == 1 and summary.skipped["decode-error"] == 1
    captions = {reader.sample(i)["key"]: reader.sample(i)["caption"] for i in range(len(reader))}
    assert captions["a008"] == "sixteen bit" and captions["a010"] == "unicode caption \u00e9\u4e2d"
    assert verify_cache(tmp_path / "c") == len(kept)


def _write_repeating_keys(out: Path) -> list[Path]:
    """Three shards whose keys repeat: within the first (not next to each other), and across shards."""
    rng = np.random.default_rng(3)
    keys = [["a0", "a1", "a2", "a1", "a3"], ["b0", "a2", "b1"], ["c0", "a0"]]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, shard in enumerate(keys):
        paths.append(out / f"dup-{n:04d}.tar")
        with wds.TarWriter(str(paths[-1])) as w:
            for i, key in enumerate(shard):
                w.write({"__key__": key, "jpg": jpeg(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)),
                         "txt": f"{key} copy in shard {n} at {i}".encode()})
    return paths


def _skips(cache: Path) -> dict[tuple[str, str], str]:
    return {(s["key"], Path(s["source"]).name): s["reason"].split(":")[0] for s in read_manifest(cache).skipped}


def test_repeated_keys_are_stored_once_and_recorded_as_duplicate_key(tmp_path, tiny_models):
    shards = _write_repeating_keys(tmp_path / "data")
    cfg = tiny_config(tiny_models, "::".join(map(str, shards[:2])), tmp_path / "c")
    summary = run_encode(cfg)
    reader = CacheReader(cfg.cache)
    assert sorted(reader.keys.tolist()) == ["a0", "a1", "a2", "a3", "b0", "b1"]
    captions = {reader.sample(i)["key"]: reader.sample(i)["caption"] for i in range(len(reader))}
    assert captions["a1"] == "a1 copy in shard 0 at 1" and captions["a2"] == "a2 copy in shard 0 at 2"  # the first
    assert _skips(cfg.cache) == {("a1", "dup-0000.tar"): "duplicate-key", ("a2", "dup-0001.tar"): "duplicate-key"}
    assert summary.skipped["duplicate-key"] == 2
    assert verify_cache(cfg.cache) == 6  # encode and verify agree
    info = repa("cache", "info", str(cfg.cache))
    assert info.returncode == 0 and "duplicate-key=2" in info.stdout, info.stdout
    # a later encode into the same cache knows the keys committed before it
    run_encode(tiny_config(tiny_models, "::".join(map(str, shards)), cfg.cache))
    assert sorted(CacheReader(cfg.cache).keys.tolist()) == ["a0", "a1", "a2", "a3", "b0", "b1", "c0"]
    assert _skips(cfg.cache)[("a0", "dup-0002.tar")] == "duplicate-key"
    assert verify_cache(cfg.cache) == 7


@pytest.mark.parametrize("fix", ["named", "repair"])
def test_a_duplicate_that_verify_finds_is_removed_by_the_command_it_advises(tmp_path, tiny_models, monkeypatch, fix):
    from stages.encode.duplicates import SeenKeys

    shards = _write_repeating_keys(tmp_path / "data")
    cfg = tiny_config(tiny_models, "::".join(map(str, shards[:2])), tmp_path / "c")
    with monkeypatch.context() as m:  # as when two processes each stored a copy, unaware of the other
        m.setattr(SeenKeys, "holder", lambda self, key, part: None)
        run_encode(cfg)
    r = repa("cache", "verify", str(cfg.cache))
    assert r.returncode == 1 and "--repair" in r.stdout
    first, second = read_manifest(cfg.cache).part_names()
    assert f"key 'a1' stored twice in the part; the cache holds a sample twice: rerun the encode command with " \
           f"--redo {first}," in r.stderr and f"key 'a2' also stored in part {first}" in r.stderr, r.stderr[-2000:]
    named = re.findall(r"with --redo (\S+),", r.stderr)
    assert named == [first, second]  # dup-0001's part holds a2 after dup-0000's
    rerun = cli_args(cfg) + ([a for n in named for a in ("--redo", n)] if fix == "named" else ["--repair"])
    done = repa("encode", *rerun)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(CacheReader(cfg.cache).keys.tolist()) == ["a0", "a1", "a2", "a3", "b0", "b1"]
    assert verify_cache(cfg.cache) == 6


def test_fingerprint_mismatch_is_refused_and_the_cache_kept(demo_cache, tiny_models, demo_shards):
    cache, _ = demo_cache
    n = read_manifest(cache).num_samples
    with pytest.raises(CacheError, match=r"feature_codec: \"fp16\" -> \"int8\".*--overwrite"):
        run_encode(tiny_config(tiny_models, _pattern(demo_shards), cache, feature_codec="int8"))
    assert verify_cache(cache) == n


def test_dry_run_loads_no_model_and_writes_nothing(tmp_path, tiny_models, demo_shards, monkeypatch):
    from diffusers import AutoencoderKL
    from transformers import AutoModel, T5EncoderModel

    def boom(*a, **k):
        raise AssertionError("a model was loaded during --dry-run")

    for cls in (AutoencoderKL, AutoModel, T5EncoderModel):
        monkeypatch.setattr(cls, "from_pretrained", boom)
    cfg = tiny_config(tiny_models, _pattern(demo_shards), tmp_path / "never", dry_run=True)
    lines = run_encode(cfg).lines
    text = "\n".join(lines)
    assert "~72" in text and "3 to encode" in text and "dino" in text and "GiB" in text
    assert not (tmp_path / "never").exists()


def test_source_matching_nothing_fails_before_any_work(tmp_path, tiny_models):
    cfg = tiny_config(tiny_models, str(tmp_path / "none-{0000..0003}.tar"), tmp_path / "c")
    with pytest.raises(SourceError, match="matches no existing file"):
        run_encode(cfg)
    assert not (tmp_path / "c").exists()


def test_model_that_cannot_load_fails_before_any_work(tmp_path, tiny_models, demo_shards):
    cfg = tiny_config(tiny_models, str(demo_shards[0]), tmp_path / "c", dino=str(tmp_path / "no-such-model"))
    with pytest.raises(EncoderLoadError, match="cannot load DINOv2 .*no-such-model"):
        run_encode(cfg)
    assert not (tmp_path / "c").exists()


def test_cli_errors_are_one_line_with_nonzero_exit(tmp_path, tiny_models, demo_shards):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = tiny_config(tiny_models, str(demo_shards[0]), blocker)
    r = repa("encode", *cli_args(cfg))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: --cache") and "Traceback" not in r.stderr
    r = repa("encode", *cli_args(cfg), "--resolution", "100")
    assert r.returncode == 2 and "multiple of 16" in r.stderr


def _keys_and_moments(cache: Path) -> dict[str, np.ndarray]:
    r = CacheReader(cache)
    return {r.sample(i)["key"]: r.sample(i)["moments"] for i in range(len(r))}


def test_two_nodes_of_two_processes_produce_the_same_samples_as_one(demo_cache, tiny_models, demo_shards, tmp_path):
    cache, _ = demo_cache
    cfg = tiny_config(tiny_models, _pattern(demo_shards), tmp_path / "four")
    for r in two_nodes(["encode", *cli_args(cfg)], port=29531):
        assert r.returncode == 0, r.stderr[-3000:]
        assert_ranks_let_go_of_the_process_group(r)  # else a rank may still abort at exit, after its work
    man = read_manifest(tmp_path / "four")
    writers = {p["writer"].split("-")[-2] for p in man.parts}  # the pid in each part's temporary name
    # 3 shards over 4 ranks: ranks 0-2 write one each (by global rank), rank 3 has none and ends cleanly
    assert len(demo_shards) == len(man.parts) == len(writers) == 3
    one, four = _keys_and_moments(cache), _keys_and_moments(tmp_path / "four")
    assert sorted(one) == sorted(four)  # no shard twice, none left out
    for k in one:
        np.testing.assert_allclose(one[k].astype(np.float32), four[k].astype(np.float32), atol=1e-3)
    assert verify_cache(tmp_path / "four") == 72


def test_kill_9_mid_encode_then_rerun_gives_every_sample_once(tmp_path, tiny_models):
    from stages.demo.data import write_demo_shards

    shards = write_demo_shards(tmp_path / "data", num_shards=8, samples_per_shard=12, seed=1)
    gate = tmp_path / "go"  # the last shard waits for it: the job cannot finish before it is killed
    cfg = tiny_config(tiny_models, gated([Path(p) for p in shards], gate), tmp_path / "c", batch_size=4)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "encode", *cli_args(cfg)], env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    records = tmp_path / "c" / "records"
    wait_for(lambda: len(list(records.glob("*.json"))) >= 2, timeout=240, proc=proc)
    assert proc.poll() is None, "the encode ended before it could be killed"
    time.sleep(0.3)  # land somewhere inside the next part
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(read_manifest(tmp_path / "c").parts)
    assert 2 <= committed < 8
    gate.touch()
    run_encode(cfg)  # the rerun
    reader = CacheReader(tmp_path / "c")
    assert sorted(reader.keys.tolist()) == sorted(tar_keys(shards))
    assert verify_cache(tmp_path / "c") == 96
    assert not [p for p in (tmp_path / "c" / PARTS_DIR).iterdir() if p.name.startswith(".tmp-")]


def test_flux_style_vae_registers_dino_and_clip_text(tmp_path, tiny_models, demo_shards):
    """16-channel VAE with a shift factor, DINOv2 with register tokens (dropped), CLIP text encoder."""
    cfg = tiny_config(tiny_models, str(demo_shards[0]), tmp_path / "c", vae=str(tiny_models["vae-flux"]),
                      dino=str(tiny_models["dino-reg"]), text_encoder=str(tiny_models["clip-text"]))
    run_encode(cfg)
    reader = CacheReader(tmp_path / "c")
    man = reader.manifest
    assert man.latent["channels"] == 16 and man.latent["shift_factor"] == pytest.approx(0.1159)
    assert man.latent["scaling_factor"] == pytest.approx(0.3611)
    assert man.dino["registers"] == 4 and man.dino["tokens"] == 16  # 1 CLS + 4 registers dropped
    assert man.text["kind"] == "clip"
    s = reader.sample(0)
    assert s["moments"].shape == (32, 8, 8) and s["dino"].shape == (16, man.dino["dim"])
    assert s["text"].shape[0] >= 2  # start and end tokens at least, no padding stored


def test_max_samples_stops_early_and_marks_the_part_incomplete(tmp_path, tiny_models, demo_shards):
    summary = run_encode(tiny_config(tiny_models, _pattern(demo_shards), tmp_path / "c", max_samples=10))
    man = read_manifest(tmp_path / "c")
    assert summary.encoded == man.num_samples == 10
    cut = [s for s in man.skipped if s["reason"].startswith("sample-limit")]
    assert len(cut) == 1 and cut[0]["index"] == 10
    g = zarr.open_group(str(tmp_path / "c" / PARTS_DIR / f"{man.parts[0]['name']}.zarr"), mode="r")
    assert g.attrs["part"]["complete"] is False and man.parts[0]["complete"] is False
    assert not man.complete and "cut short" in man.completeness()


def test_pipe_urls_are_read_through_webdataset(tmp_path, tiny_models, demo_shards):
    summary = run_encode(tiny_config(tiny_models, f"pipe:cat {demo_shards[2]}", tmp_path / "c"))
    reader = CacheReader(tmp_path / "c")
    assert summary.encoded == len(reader) == 24
    assert reader.parts[0]["source"] == f"pipe:cat {demo_shards[2]}"
    assert reader.parts[0]["name"].startswith("cc12m-train-0002-")
