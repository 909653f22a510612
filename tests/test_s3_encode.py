"""`repa encode --cache s3://...`: parts built locally, uploaded, committed by a conditional record;
killed and concurrent encodes, and claims on object storage (a moto server)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

import boto3
import numpy as np
import pytest

from cache_schema import FastReader, read_manifest
from cache_schema.storage.object_store import S3Path
from cache_schema.writing.claims import Owner
from cache_schema.writing.s3_claims import S3Claims
from stages.encode.run import run_encode

from .encode_helpers import ROOT, env, tar_keys
from .test_object_store import BUCKET, assert_reads_identical, fresh_prefix, objects
from .test_operations import config, encode_cmd, gated, pattern, shards, wait_for  # noqa: F401 - fixture

shards = shards  # the module-scoped fixture of 6 shards x 8 samples


def keys_once(url: str, paths) -> None:
    reader = FastReader(url)
    keys = reader.read("key", np.arange(len(reader))).tolist()
    assert sorted(keys) == sorted(tar_keys(paths)) and len(keys) == len(set(keys))


def test_an_encode_to_s3_reads_back_identical_to_the_same_encode_to_a_local_dir(s3_endpoint, tiny_models, shards,
                                                                                  tmp_path):
    url = fresh_prefix()
    source = pattern(shards[:3])
    full = {"text_encoder": str(tiny_models["text"])}  # every kind of field: latents, tokens, text, captions
    run_encode(config(tiny_models, source, tmp_path / "local", **full))
    summary = run_encode(config(tiny_models, source, url, staging_dir=tmp_path / "staging", **full))
    assert summary.encoded == 24 and summary.parts == 3
    assert_reads_identical(tmp_path / "local", url)
    keys_once(url, shards[:3])
    assert read_manifest(url).complete and not any(k.startswith("claims/") for k in objects(url))
    assert list((tmp_path / "staging").iterdir()) == []  # the staging copies are gone


def test_an_encode_to_s3_killed_then_rerun_holds_every_sample_once(s3_endpoint, tiny_models, shards, tmp_path):
    url, gate = fresh_prefix(), tmp_path / "go"
    cfg = config(tiny_models, gated(shards, gate), url)
    proc = subprocess.Popen(encode_cmd(cfg, "--staging-dir", str(tmp_path / "staging")), env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any(k.startswith("records/") for k in objects(url)), proc=proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    there = objects(url)
    records = [k for k in there if k.startswith("records/")]
    assert 1 <= len(records) < len(shards) and len(read_manifest(url).parts) == len(records)
    gate.touch()
    rerun = subprocess.run(encode_cmd(cfg, "--staging-dir", str(tmp_path / "staging")), env=env(), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"encoded {48 - 8 * len(records)} samples" in rerun.stdout  # committed parts were not encoded again
    keys_once(url, shards)
    run_encode(config(tiny_models, gated(shards, gate), tmp_path / "local"))
    assert_reads_identical(tmp_path / "local", url, exact=False)  # the rerun batched the rest differently


def test_two_encodes_into_one_s3_cache_commit_each_part_once(s3_endpoint, tiny_models, shards, tmp_path):
    url = fresh_prefix()
    cfg = config(tiny_models, pattern(shards), url)
    procs = [subprocess.Popen(encode_cmd(cfg), env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    encoded = [int(out.split("encoded ", 1)[1].split()[0]) for out, _ in outs]
    parts = [int(out.split(" into ", 1)[1].split()[0]) for out, _ in outs]
    assert sum(encoded) == 48 and sum(parts) == len(shards)  # no part was committed by both
    assert len([k for k in objects(url) if k.startswith("records/")]) == len(shards)
    keys_once(url, shards)
    manifest = read_manifest(url)
    assert manifest.complete and len(manifest.sources) == len(shards)


def _plant_claim(url: str, part: str, renewed: float) -> None:
    body = {"owner": "elsewhere-1-abc", "host": "another-host", "pid": 1, "started": renewed, "renewed": renewed}
    boto3.client("s3").put_object(Bucket=BUCKET, Key=f"{url.split('/', 3)[3]}/claims/{part}.json",
                                  Body=json.dumps(body).encode())


def test_a_stale_claim_on_s3_is_taken_over_once_and_a_live_one_is_not(s3_endpoint):
    url = fresh_prefix()
    _plant_claim(url, "stale", time.time() - 100)
    _plant_claim(url, "live", time.time())
    root, me, other = S3Path.parse(url), Owner.here(), Owner("rival", socket.gethostname(), 0)
    mine = S3Claims(root)
    got, held = mine.claim(["stale", "live"], me, lease_s=30)
    assert got == ["stale"] and held["live"]["owner"] == "elsewhere-1-abc"
    # A second taker that read the same stale claim loses: If-Match on the stale etag no longer holds.
    rival = S3Claims(root)
    assert rival.claim(["stale"], other, lease_s=30) == ([], {"stale": pytest.approx(rival._read("stale")[0])})
    assert mine.owns("stale", me) and mine.renew(["stale"], me) == []
    # Once this owner's heartbeat is older than the lease, the rival takes it; this owner's renewal then fails.
    time.sleep(1.1)
    assert rival.claim(["stale"], other, lease_s=1)[0] == ["stale"]
    assert mine.renew(["stale"], me) == ["stale"] and not mine.owns("stale", me) and rival.owns("stale", other)
    mine.release("stale", me)  # not its claim any more: left alone
    # Two takers that read the same stale claim: If-Match on its etag lets exactly one of them write.
    from cache_schema.storage.object_store import put_if_match

    _, etag = rival._read("stale")
    key = root / "claims" / "stale.json"
    assert [put_if_match(key, b"{}", etag) is not None for _ in range(2)] == [True, False]
    _plant_claim(url, "stale", time.time())
    assert rival.claim(["stale"], other, lease_s=30)[0] == []
    _plant_claim(url, "mine", time.time())
    assert S3Claims(root).claim(["mine"], me, lease_s=30)[0] == []
    got, _ = rival.claim(["fresh"], other, lease_s=30)
    rival.release("fresh", other)
    assert got == ["fresh"] and not any(k.startswith("claims/fresh") for k in objects(url))


def test_flags_that_rewrite_parts_are_refused_on_s3_in_one_line(s3_endpoint, tiny_models, shards):
    from .encode_helpers import repa
    from .test_operations import cli_args

    for flag in (["--overwrite"], ["--repair"], ["--redo", "x"],
                 ["--add-target", "extra", "--target-model", str(tiny_models["dino"])]):
        r = repa("encode", *cli_args(config(tiny_models, pattern(shards[:1]), fresh_prefix())), *flag)
        assert r.returncode == 2 and flag[0] in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
