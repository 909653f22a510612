"""Caches on S3-compatible object storage (a moto server): push, read, train, crashes, races, damage."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time

import boto3
import numpy as np
import pytest

from cache_schema import CacheError, FastReader, read_manifest
from cache_schema.writing.push import push_cache
from tests.encode_helpers import ROOT, assert_ranks_let_go_of_the_process_group, env, repa, two_nodes
from tests.test_train import tiny_train, train_cli_args

BUCKET = "repa-test"
_prefixes = itertools.count()


def fresh_prefix() -> str:
    return f"s3://{BUCKET}/cache-{os.getpid()}-{next(_prefixes)}"


def objects(url: str) -> dict[str, int]:
    prefix = url[len(f"s3://{BUCKET}/"):] + "/"
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"][len(prefix):]: o["Size"] for page in pages for o in page.get("Contents", [])}


def assert_reads_identical(local, remote, exact: bool = True) -> None:
    """Every field of every sample, in a shuffled order, byte for byte; captions' tokens too. ``exact=False``
    for two encodes batched differently (a rerun after a kill): features then agree to fp16 rounding, since
    CPU kernels may sum in another order for another batch."""
    a, b = FastReader(local), FastReader(remote)
    assert len(a) == len(b) > 0 and a.part_names == b.part_names
    ids = np.random.default_rng(0).permutation(len(a))
    for name, f in a.fields.items():
        if not f.per_sample or name == "text_offsets":
            continue
        x, y = a.read(name, ids), b.read(name, ids)
        if f.dtype == "str":
            assert x.tolist() == y.tolist(), name
        elif exact or f.dtype not in ("float16", "float32"):
            assert x.tobytes() == y.tobytes(), name
        else:
            np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=1e-2, atol=1e-3, err_msg=name)
    if a.has_text:
        (ta, sa, la), (tb, sb, lb) = a.read_text(ids, padded=True), b.read_text(ids, padded=True)
        assert np.array_equal(la, lb) and la.sum() > 0
        assert ta.tobytes() == tb.tobytes() if exact else np.allclose(ta.astype(np.float32), tb.astype(np.float32),
                                                                       rtol=1e-2, atol=1e-3)
        assert (sa is None) == (sb is None) and (sa is None or sa.tobytes() == sb.tobytes())


@pytest.fixture(scope="module")
def pushed(s3_endpoint, train_cache) -> str:
    url = fresh_prefix()
    result = push_cache(train_cache, url)
    assert len(result.uploaded) == len(read_manifest(train_cache).parts) and result.bytes > 0
    return url


def test_fast_reader_over_s3_is_bit_identical_and_a_second_push_skips_every_part(pushed, train_cache):
    assert_reads_identical(train_cache, pushed)
    assert "similarity" in FastReader(pushed).fields and FastReader(pushed).has_text
    again = push_cache(train_cache, pushed)
    assert again.uploaded == [] and len(again.skipped) == len(read_manifest(train_cache).parts)


def test_cache_info_on_s3_matches_the_local_cache(pushed, train_cache):
    remote, local = repa("cache", "info", pushed), repa("cache", "info", str(train_cache))
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout and "96" in remote.stdout


def test_two_nodes_of_two_processes_train_from_s3_without_a_shared_cache(pushed, tmp_path):
    """Nodes with no shared disk: 4 ranks of two launchers read the cache from the object store."""
    import torch

    from stages.core.files.checkpoint import latest_checkpoint

    cfg = tiny_train(pushed, tmp_path / "run", steps=4, ckpt_every=4, val_every=4)
    node0, node1 = two_nodes(["train", *train_cli_args(cfg)], port=29583)
    assert node0.returncode == 0 and node1.returncode == 0, (node0.stderr + node1.stderr)[-3000:]
    assert "batch 8 = 4 proc x 1 accum x 2" in node0.stdout + node0.stderr
    ckpt = torch.load(latest_checkpoint(tmp_path / "run"), weights_only=True)
    assert ckpt["step"] == 4 and ckpt["cache"].startswith("s3:")
    for node in (node0, node1):
        assert_ranks_let_go_of_the_process_group(node)


def _push_process(cache, url: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "cache", "push", str(cache), url, *extra],
                            env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_push_killed_mid_upload_then_rerun_gives_a_complete_cache(s3_endpoint, train_cache):
    url = fresh_prefix()
    parts = read_manifest(train_cache).part_names()
    proc = _push_process(train_cache, url, "--threads", "1", "--max-rate", "1")  # ~4 MiB at 1 MiB/s
    deadline = time.time() + 60
    while time.time() < deadline and sum(k.startswith("parts/") for k in objects(url)) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    there = objects(url)
    committed = [k for k in there if k.startswith("records/")]
    assert any(k.startswith("parts/") for k in there) and len(committed) < len(parts)
    # What was cut short is invisible: readers see the committed parts only.
    assert len(read_manifest(url).parts) == len(committed)
    rerun = repa("cache", "push", str(train_cache), url)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(read_manifest(url).part_names()) == sorted(parts)
    assert_reads_identical(train_cache, url)


def test_two_pushes_at_once_end_with_one_consistent_cache(s3_endpoint, train_cache):
    url = fresh_prefix()
    procs = [_push_process(train_cache, url, "--threads", "2", "--max-rate", "2") for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    uploaded = sum(int(out.split("pushed ")[1].split(" ")[0]) for out, _ in outs)
    assert uploaded == len(read_manifest(train_cache).parts)  # each part committed by exactly one of them
    assert_reads_identical(train_cache, url)


def test_a_manifest_of_another_cache_is_never_replaced(s3_endpoint, train_cache):
    url = fresh_prefix()
    boto3.client("s3").put_object(Bucket=BUCKET, Key=url.split("/", 3)[3] + "/manifest.json",
                                  Body=b'{"fingerprint": "0123456789abcdef"}')
    r = repa("cache", "push", str(train_cache), url)
    assert r.returncode == 2 and "0123456789abcdef" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert set(objects(url)) == {"manifest.json"}


def _damaged_copy(train_cache, change) -> tuple[str, str]:
    """A pushed copy whose first part has one chunk of ``dino`` changed by ``change(client, key)``."""
    url = fresh_prefix()
    push_cache(train_cache, url)
    part = read_manifest(url).part_names()[0]
    chunk = next(k for k in sorted(objects(url)) if k.startswith(f"parts/{part}.zarr/dino/c"))
    change(boto3.client("s3"), url.split("/", 3)[3] + "/" + chunk)
    return url, part


@pytest.mark.parametrize("how", ["missing", "flipped"])
def test_a_damaged_object_is_an_error_naming_the_part(s3_endpoint, train_cache, how):
    def change(s3, key):
        if how == "missing":
            s3.delete_object(Bucket=BUCKET, Key=key)
        else:
            data = bytearray(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
            data[len(data) // 2] ^= 0xFF
            s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))

    url, part = _damaged_copy(train_cache, change)
    reader = FastReader(url)
    with pytest.raises(CacheError, match=f"part {part}") as e:
        reader.read("dino", np.arange(len(reader)))
    assert "\n" not in str(e.value)


def test_an_s3_url_given_as_a_path_still_names_the_bucket_and_prefix():
    from pathlib import Path

    from cache_schema.storage.object_store import S3Path, cache_root, kvstore_spec

    # A command-line option typed as a path collapses s3:// to s3:/.
    root = cache_root(Path("s3://repa-test/some/cache"))
    assert root == S3Path("repa-test", "some/cache") and str(root) == "s3://repa-test/some/cache"
    assert kvstore_spec(root / "parts" / "a.zarr" / "dino")["path"] == "some/cache/parts/a.zarr/dino/"
    assert cache_root("relative/dir") == Path("relative/dir")


def test_code_that_writes_in_place_refuses_an_s3_location_and_creates_nothing(tmp_path, monkeypatch):
    from pathlib import Path

    from cache_schema.format.manifest import PartRecord, write_record
    from cache_schema.storage.object_store import local_path

    assert local_path(tmp_path / "cache") == tmp_path / "cache"
    monkeypatch.chdir(tmp_path)
    rec = PartRecord("part-000000", "shard-0.tar", 1)
    for location in ("s3://repa-test/cache", Path("s3://repa-test/cache")):
        with pytest.raises(CacheError, match=r"^s3://repa-test/cache/records/part-000000\.json: object storage is "
                                             r"not written in place.*repa cache push"):
            write_record(location, rec)
    assert not (tmp_path / "s3:").exists()


def test_commands_that_need_a_local_cache_refuse_s3_in_one_line(pushed, tiny_models, labelled_shards):
    from tests.encode_helpers import cli_args, tiny_config

    # encode writes to object storage, but never rewrites what is there (see tests/test_s3_encode.py)
    encode = repa("encode", *cli_args(tiny_config(tiny_models, str(labelled_shards[0]), pushed)), "--overwrite")
    verify = repa("cache", "verify", pushed)
    for r in (encode, verify):
        assert r.returncode == 2 and "s3://" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (ROOT / "s3:").exists()  # the URL as a relative local path (run from ROOT)
