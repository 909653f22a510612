"""The cache contract: round trip of every field for both codecs, atomic commits, fingerprints, verify."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import Crc32cCodec

from cache_schema import (
    CacheError,
    CacheReader,
    PartWriter,
    cache_fields,
    dequantize_int8_numpy,
    new_manifest,
    quantize_int8_numpy,
    read_manifest,
    start_encode,
    verify_cache,
)
from cache_schema.format.layout import PARTS_DIR, RECORDS_DIR, TMP_PREFIX
from cache_schema.operations.verify import (
    find_problems,
)
from cache_schema.writing.claims import Owner, claim
from cache_schema.writing.writer import settle_part
from stages.core.data.codec import dequantize_int8, quantize_int8

from .test_operations import wait_for

C, S, T, D, DT = 4, 8, 16, 12, 10  # latent channels, latent size, dino tokens, dino dim, text dim


def _manifest(codec: str, text: bool = True, **overrides):
    settings = dict(
        resolution=64, crop="adm-center", vae={"class": "AutoencoderKL", "weights": "v1"},
        dino={"class": "Dinov2Model", "weights": "d1"}, dino_preprocess="recipe",
        text_encoder={"class": "T5EncoderModel", "weights": "t1"} if text else None,
        max_text_tokens=16 if text else None, dtype="fp32", feature_codec=codec, shard_size=4,
    )
    settings.update(overrides)
    fields = cache_fields(C, S, T, D, DT if text else None, codec)
    latent = dict(channels=C, size=S, downsample=8, scaling_factor=0.18215, shift_factor=0.0, mean=None, std=None)
    return new_manifest(settings, latent, dict(dim=D, tokens=T, grid=[4, 4], registers=0),
                        dict(dim=DT, kind="t5", max_tokens=16) if text else None, fields,
                        {"vae": {"id": "some/vae"}, "dino": {"id": "some/dino"}})


def _rows(rng, n: int, start: int, codec: str, text: bool = True) -> tuple[dict, dict]:
    """Rows for the writer and the float16 truth they should read back as."""
    dino = torch.from_numpy(rng.standard_normal((n, T, D)).astype(np.float32))
    lengths = [int(x) for x in rng.integers(0, 6, n)]  # zero-length captions included
    texts = [torch.from_numpy(rng.standard_normal((k, DT)).astype(np.float32)) for k in lengths]
    rows = dict(
        key=[f"s{start + i:05d}" for i in range(n)], source_index=np.arange(start, start + n),
        caption=[f"caption ü {start + i}" if i % 3 else "" for i in range(n)], label=np.arange(n) % 5 - 1,
        moments=rng.standard_normal((n, 2 * C, S, S)).astype(np.float16),
    )
    truth = {"dino": dino.half().numpy(), "text": [t.half().numpy() for t in texts]}
    if codec == "int8":
        q, s = quantize_int8(dino)
        rows.update(dino=q.numpy(), dino_scale=s.numpy())
        truth["dino"] = dequantize_int8(q, s, torch.float16).numpy()
        if text:
            pairs = [quantize_int8(t) for t in texts]
            rows.update(text=[p[0].numpy() for p in pairs], text_scale=[p[1].numpy() for p in pairs])
            truth["text"] = [dequantize_int8(q, s, torch.float16).numpy() for q, s in pairs]
    else:
        rows["dino"] = truth["dino"]
        if text:
            rows["text"] = truth["text"]
    return rows, truth


def _write_part(cache: Path, manifest, name: str, rng, batches=(3, 5, 2), start=0, codec="fp16", text=True):
    w = PartWriter(cache, name, f"/data/{name}.tar", _fields(manifest), shard_size=4)
    truths, rows_all = [], []
    for n in batches:
        rows, truth = _rows(rng, n, start, codec, text)
        w.append(rows)
        rows_all.append(rows)
        truths.append(truth)
        start += n
    w.skip("broken-key", 99, "decode-error: test")
    w.commit()
    return rows_all, truths


def _fields(manifest):
    from cache_schema import field_from_json

    return {n: field_from_json(n, s) for n, s in manifest.fields.items()}


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_every_field_round_trips(tmp_path, codec):
    m = _manifest(codec)
    start_encode(tmp_path, m, overwrite=False)
    rng = np.random.default_rng(0)
    rows_all, truths = _write_part(tmp_path, m, "part-a", rng, codec=codec)
    reader = CacheReader(tmp_path)
    assert len(reader) == 10
    i = 0
    for rows, truth in zip(rows_all, truths, strict=True):
        for j in range(len(rows["key"])):
            s = reader.sample(i)
            assert s["key"] == rows["key"][j] and s["caption"] == rows["caption"][j]
            assert s["label"] == rows["label"][j] and s["source_index"] == rows["source_index"][j]
            assert s["source"] == "/data/part-a.tar"
            np.testing.assert_array_equal(s["moments"], rows["moments"][j])
            np.testing.assert_array_equal(s["dino"], truth["dino"][j])
            np.testing.assert_array_equal(s["text"], truth["text"][j])
            i += 1
    man = read_manifest(tmp_path)
    assert man.skipped == [{"key": "broken-key", "source": "/data/part-a.tar", "index": 99,
                            "reason": "decode-error: test"}]
    # latent statistics are those of the posterior means over every stored sample
    means = np.concatenate([r["moments"][:, :C].astype(np.float64) for r in rows_all])
    np.testing.assert_allclose(man.latent["mean"], means.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(man.latent["std"], means.std(axis=(0, 2, 3)), rtol=1e-6)
    assert verify_cache(tmp_path) == 10


def test_layout_is_sharded_one_sample_per_chunk_uncompressed(tmp_path):
    m = _manifest("fp16")
    start_encode(tmp_path, m, overwrite=False)
    _write_part(tmp_path, m, "p", np.random.default_rng(1))
    arr = zarr.open_group(str(tmp_path / PARTS_DIR / "p.zarr"), mode="r")["dino"]
    assert arr.chunks == (1, T, D) and arr.shards == (4, T, D) and arr.compressors == (Crc32cCodec(),)  # no compression
    shard_files = sorted(os.listdir(tmp_path / PARTS_DIR / "p.zarr" / "dino" / "c"))
    assert shard_files == ["0", "1", "2"]  # 10 samples in shards of 4, each written once


def test_int8_codec_is_close_to_fp16():
    x = torch.randn(64, 256, 32) * torch.linspace(0.1, 20.0, 32)  # channels of very different scale
    q, s = quantize_int8(x)
    y = dequantize_int8(q, s)
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    assert q.dtype == torch.int8 and s.dtype == torch.float16
    assert cos.min() > 0.999
    assert torch.equal(dequantize_int8(*quantize_int8(torch.zeros(3, 4))), torch.zeros(3, 4))


def test_torch_codec_is_bit_identical_to_the_contracts_numpy_reference():
    x = torch.randn(16, 40, 24) * torch.linspace(0.01, 50.0, 24)
    q, s = quantize_int8(x)
    q_ref, s_ref = quantize_int8_numpy(x.numpy())
    assert np.array_equal(q.numpy(), q_ref) and np.array_equal(s.numpy(), s_ref)
    assert np.array_equal(dequantize_int8(q, s, torch.float16).numpy(), dequantize_int8_numpy(q_ref, s_ref))


def test_uncommitted_parts_are_invisible_and_cleaned_up_by_the_next_claimer(tmp_path):
    m = _manifest("fp16")
    start_encode(tmp_path, m, overwrite=False)
    first, second = Owner.here(), Owner.here()
    assert claim(tmp_path, ["half"], first)[0] == ["half"]
    w = PartWriter(tmp_path, "half", "/data/half.tar", _fields(m), shard_size=4, owner=first)
    w.append(_rows(np.random.default_rng(2), 5, 0, "fp16")[0])  # flushed one shard, not committed
    assert w.tmp_path.name.startswith(TMP_PREFIX) and w.tmp_path.exists()
    assert len(CacheReader(tmp_path)) == 0
    assert claim(tmp_path, ["half"], second)[0] == []  # a live claim is respected
    assert claim(tmp_path, ["half"], second, lease_s=0.0)[0] == ["half"]  # a stale one is taken over
    assert settle_part(tmp_path, "half", second) is None and not w.tmp_path.exists()
    with pytest.raises(CacheError, match="another process took over its claim"):
        w.commit()
    assert len(CacheReader(tmp_path)) == 0


def test_a_part_published_without_its_record_is_restored_by_the_next_claimer(tmp_path):
    m = _manifest("fp16")
    start_encode(tmp_path, m, overwrite=False)
    _write_part(tmp_path, m, "p", np.random.default_rng(3))
    (tmp_path / RECORDS_DIR / "p.json").unlink()  # a crash between the rename and the record
    assert read_manifest(tmp_path).num_samples == 0
    with pytest.raises(CacheError, match="part p is on disk but has no record"):
        verify_cache(tmp_path)
    owner = Owner.here()
    claim(tmp_path, ["p"], owner)
    assert settle_part(tmp_path, "p", owner).num_samples == 10
    assert read_manifest(tmp_path).num_samples == 10 and len(read_manifest(tmp_path).skipped) == 1
    assert verify_cache(tmp_path) == 10


def test_fingerprint_mismatch_is_refused_naming_the_fields(tmp_path):
    start_encode(tmp_path, _manifest("fp16"), overwrite=False)
    other = _manifest("int8", resolution=128)
    with pytest.raises(CacheError) as e:
        start_encode(tmp_path, other, overwrite=False)
    assert "resolution: 64 -> 128" in str(e.value) and "feature_codec" in str(e.value)
    assert "--overwrite" in str(e.value)
    start_encode(tmp_path, other, overwrite=True)
    assert read_manifest(tmp_path).fingerprint == other.fingerprint


def test_shard_size_and_encoder_location_do_not_change_the_fingerprint():
    a, b = _manifest("fp16"), _manifest("fp16", shard_size=1024)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != _manifest("fp16", dino={"class": "Dinov2Model", "weights": "other"}).fingerprint


def test_verify_names_the_bad_part(tmp_path):
    m = _manifest("fp16")
    start_encode(tmp_path, m, overwrite=False)
    rng = np.random.default_rng(4)
    _write_part(tmp_path, m, "good", rng)
    _write_part(tmp_path, m, "bad", rng, start=100)
    g = zarr.open_group(str(tmp_path / PARTS_DIR / "bad.zarr"), mode="r+")
    g["moments"][3] = np.full((2 * C, S, S), np.nan, dtype=np.float16)
    with pytest.raises(CacheError, match="part bad .*moments holds non-finite"):
        verify_cache(tmp_path)


def test_verify_catches_duplicate_keys_across_parts(tmp_path):
    m = _manifest("fp16", text=False)
    start_encode(tmp_path, m, overwrite=False)
    rng = np.random.default_rng(5)
    _write_part(tmp_path, m, "one", rng, text=False)
    _write_part(tmp_path, m, "two", rng, text=False)  # same keys s00000...
    with pytest.raises(CacheError, match="key 's00000' also stored in part one"):
        verify_cache(tmp_path)


def test_parallel_verify_finds_what_the_serial_one_finds(tmp_path, monkeypatch):
    m = _manifest("fp16", text=False)
    start_encode(tmp_path, m, overwrite=False)
    rng = np.random.default_rng(6)
    for name, start in (("a", 0), ("b", 100), ("c", 0), ("d", 200)):  # c repeats a's keys
        _write_part(tmp_path, m, name, rng, start=start, text=False)
    g = zarr.open_group(str(tmp_path / PARTS_DIR / "b.zarr"), mode="r+")
    g["moments"][1] = np.full((2 * C, S, S), np.inf, dtype=np.float16)
    seen = []
    serial = find_problems(tmp_path, workers=1)
    parallel = find_problems(tmp_path, workers=2, progress=lambda name, problem: seen.append(name))
    assert parallel == serial and list(serial) == ["b", "c"]
    assert "non-finite" in serial["b"] and "also stored in part a" in serial["c"]
    assert {"a", "b", "c", "d"} <= set(seen)
    # parts may finish in any order: the later part in the cache is still the one named as the copy
    import cache_schema.operations.verify as verify

    monkeypatch.setattr(verify, "as_completed", lambda futures: list(futures)[::-1])
    assert find_problems(tmp_path, workers=2) == serial


def test_missing_cache_and_unwritable_dir_give_clear_errors(tmp_path):
    with pytest.raises(CacheError, match="no such cache directory"):
        CacheReader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="no manifest"):
        CacheReader(tmp_path / "empty")


def test_claims_of_live_owners_hold_and_dead_or_silent_ones_are_taken_over(tmp_path):
    import socket
    import subprocess
    import sys

    from cache_schema.writing.claims import Heartbeat, LocalClaims

    me = Owner.here()
    elsewhere = Owner("far-1-abc", "far-away-host", 1)
    assert claim(tmp_path, ["a", "b"], elsewhere)[0] == ["a", "b"]
    got, held = claim(tmp_path, ["a", "b"], me, lease_s=300)
    assert got == [] and held["a"]["host"] == "far-away-host"  # another host's live heartbeat is respected
    path = tmp_path / "claims" / "a.json"
    old = json.loads(path.read_text())
    path.write_text(json.dumps({**old, "renewed": time.time() - 400}))  # silent for longer than the lease
    assert claim(tmp_path, ["a", "b"], me, lease_s=300)[0] == ["a"]

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ghost = Owner(f"{socket.gethostname()}-x", socket.gethostname(), int(dead.stdout))
    assert claim(tmp_path, ["c"], ghost)[0] == ["c"]
    assert claim(tmp_path, ["c"], me, lease_s=300)[0] == ["c"]  # a dead process of this host: at once

    beat = Heartbeat(LocalClaims(tmp_path), me, interval=0.05)
    beat.add(["a", "c"])
    before = json.loads(path.read_text())["renewed"]
    wait_for(lambda: json.loads(path.read_text())["renewed"] > before, timeout=10)
    claim(tmp_path, ["c"], elsewhere, lease_s=0.0)  # someone takes "c" over after a stall
    wait_for(lambda: beat.lost, timeout=10)  # a loaded machine may delay the next beat: wait for it, not a guess
    beat.stop()
    assert beat.lost == {"c"} and beat.parts == {"a"}


def test_atomic_writes_give_the_files_the_umask_allows_not_0600(tmp_path):
    import stat

    from cache_schema.storage.fsutil import atomic_write_json

    for umask, mode in ((0o027, 0o640), (0o002, 0o664), (0o077, 0o600)):
        old = os.umask(umask)
        try:
            atomic_write_json(tmp_path / f"{umask:o}.json", {"a": 1})
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / f"{umask:o}.json").stat().st_mode) == mode, oct(umask)
