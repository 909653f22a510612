"""`repa data fetch` against a local Hub-compatible server: the real huggingface_hub code, another endpoint."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys

import huggingface_hub.constants
import numpy as np
import pytest

from stages.core.encoders.tars import expand_source
from stages.demo.data import write_demo_shards
from stages.fetch.config import FetchConfig
from stages.fetch.hub import FetchError
from stages.fetch.patterns import brace_patterns
from stages.fetch.run import run_fetch

from .encode_helpers import ROOT, env
from .local_hub import LocalHub

REPO = "pixparse/cc12m-wds"


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory):
    """A folder laid out like the Hub repository: train and validation shards and a README."""
    root = tmp_path_factory.mktemp("hub") / "cc12m-wds"
    write_demo_shards(root, num_shards=3, samples_per_shard=4)
    write_demo_shards(root, num_shards=1, samples_per_shard=4, prefix="cc12m-validation")
    (root / "README.md").write_text("a dataset card\n")
    return root


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub allowed to make requests (the test session sets HF_HUB_OFFLINE=1)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


def _shards(root):
    return sorted(p.name for p in root.glob("*.tar"))


def test_fetch_downloads_every_shard_checked_and_prints_the_encode_command(repo_dir, tmp_path):
    out = tmp_path / "cc12m"
    with LocalHub({REPO: repo_dir}) as hub:
        r = subprocess.run([sys.executable, "-m", "pipeline", "data", "fetch", "--endpoint", hub.url, "--out", str(out),
                            "--workers", "2"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                           env={**env(), "HF_HUB_OFFLINE": "0"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert _shards(out) == _shards(repo_dir) and not (out / "README.md").exists()  # default: every *.tar
    for name in _shards(repo_dir):
        assert (out / name).read_bytes() == (repo_dir / name).read_bytes()
    assert "B/s" in r.stderr  # one progress bar in bytes, with rate and ETA
    commands = [line.strip() for line in r.stdout.splitlines() if line.strip().startswith("make encode SOURCE=")]
    assert commands == [f"make encode SOURCE='{out}/cc12m-train-{{0000..0002}}.tar'",
                        f"make encode SOURCE='{out}/cc12m-validation-0000.tar'"]
    named = [u for c in commands for u in expand_source(c.split("=", 1)[1].strip("'"))]
    assert sorted(os.path.basename(u) for u in named) == _shards(repo_dir)


def test_a_rerun_fetches_nothing_and_a_damaged_copy_is_fetched_again(repo_dir, tmp_path, online):
    out = tmp_path / "out"
    with LocalHub({REPO: repo_dir}) as hub:
        first = run_fetch(FetchConfig(out=out, endpoint=hub.url, include=["cc12m-train-*"], workers=3))
        assert first.fetched == [f"cc12m-train-000{i}.tar" for i in range(3)]  # listing order, however they finish
        hub.requests.clear()
        again = run_fetch(FetchConfig(out=out, endpoint=hub.url, include=["cc12m-train-*"]))
        assert again.fetched == [] and len(again.present) == 3
        assert all("/resolve/" not in path for _, path, _ in hub.requests)  # listed, nothing downloaded
        damaged = out / "cc12m-train-0001.tar"
        data = bytearray(damaged.read_bytes())
        data[1000] ^= 0xFF
        damaged.write_bytes(bytes(data))
        third = run_fetch(FetchConfig(out=out, endpoint=hub.url, include=["cc12m-train-*"]))
    assert third.fetched == ["cc12m-train-0001.tar"]
    assert damaged.read_bytes() == (repo_dir / "cc12m-train-0001.tar").read_bytes()


def test_a_file_whose_checksum_fails_is_deleted_and_named(repo_dir, tmp_path, online):
    out = tmp_path / "out"
    with LocalHub({REPO: repo_dir}) as hub:
        hub.corrupt.add("cc12m-train-0002.tar")  # the listed sha256 is not the content's
        with pytest.raises(FetchError, match="1 file.* failed their check .*cc12m-train-0002.tar: sha256"):
            run_fetch(FetchConfig(out=out, endpoint=hub.url))
    assert not (out / "cc12m-train-0002.tar").exists()
    assert (out / "cc12m-train-0000.tar").read_bytes() == (repo_dir / "cc12m-train-0000.tar").read_bytes()


def test_a_broken_transfer_resumes_with_a_range_request(tmp_path, online):
    root = tmp_path / "repo"
    root.mkdir()
    big = np.random.default_rng(0).integers(0, 256, 11 * 2**20, dtype=np.uint8).tobytes()  # > one 10 MiB chunk
    (root / "big-0000.tar").write_bytes(big)
    with LocalHub({"someone/big": root}) as hub:
        hub.cut_after["big-0000.tar"] = 10 * 2**20 + 12345
        run_fetch(FetchConfig(repo="someone/big", out=tmp_path / "out", endpoint=hub.url))
        ranges = [rng for method, path, rng in hub.requests if method == "GET" and path.endswith("big-0000.tar")]
    assert ranges[0] is None and ranges[1] == f"bytes={10 * 2**20}-"  # the second GET asks only for the rest
    assert hashlib.sha256((tmp_path / "out" / "big-0000.tar").read_bytes()).digest() == hashlib.sha256(big).digest()


def test_missing_auth_missing_repo_and_no_network_are_one_line_errors(repo_dir, tmp_path, online):
    with LocalHub({REPO: repo_dir}) as hub:
        hub.gated.add(REPO)
        with pytest.raises(FetchError, match=f"{REPO} is gated: accept its terms .* `hf auth login` or set HF_TOKEN"):
            run_fetch(FetchConfig(out=tmp_path / "a", endpoint=hub.url))
        with pytest.raises(FetchError, match="--repo nobody/nothing: not found .* or private"):
            run_fetch(FetchConfig(repo="nobody/nothing", out=tmp_path / "b", endpoint=hub.url))
        hub.gated.clear()
        with pytest.raises(FetchError, match="--include \\*.parquet: matches no file"):
            run_fetch(FetchConfig(out=tmp_path / "c", endpoint=hub.url, include=["*.parquet"]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: connections are refused
        with pytest.raises(FetchError, match=f"cannot reach {closed}"):
            run_fetch(FetchConfig(out=tmp_path / "d", endpoint=closed))
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_not_enough_disk_is_refused_before_downloading(repo_dir, tmp_path, online, monkeypatch):
    import shutil

    from stages.fetch import run

    monkeypatch.setattr(run.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with LocalHub({REPO: repo_dir}) as hub:
        with pytest.raises(FetchError, match="need 0.00 GiB and only 0.00 GiB are free; free space or choose another"):
            run_fetch(FetchConfig(out=tmp_path / "out", endpoint=hub.url))
        assert all("/resolve/" not in path for _, path, _ in hub.requests)


def test_brace_patterns_cover_exactly_the_files():
    paths = [f"d/x-{i:04d}.tar" for i in (*range(5), 7, 8, 11)] + ["d/y-0000.tar", "d/notes.tar"]
    patterns = brace_patterns(paths)
    assert patterns == ["d/x-{0000..0004}.tar::d/x-{0007..0008}.tar::d/x-0011.tar", "d/y-0000.tar", "d/notes.tar"]
    from braceexpand import braceexpand

    assert sorted(u for p in patterns for piece in p.split("::") for u in braceexpand(piece)) == sorted(paths)


def test_imagenet_from_timm_fetches_as_cc12m_does_gated_first_then_shards_ready_to_encode(tmp_path, online):
    """timm/imagenet-1k-wds (gated) in its file naming: the login line, then after access the shards and one
    brace pattern per split, which names exactly what was fetched."""
    repo, root = "timm/imagenet-1k-wds", tmp_path / "hub"
    write_demo_shards(root, num_shards=3, samples_per_shard=2, labels=True, prefix="imagenet1k-train")
    write_demo_shards(root, num_shards=2, samples_per_shard=2, labels=True, prefix="imagenet1k-validation")
    with LocalHub({repo: root}) as hub:
        hub.gated.add(repo)
        with pytest.raises(FetchError, match=f"{repo} is gated: accept its terms .* `hf auth login` or set HF_TOKEN"):
            run_fetch(FetchConfig(repo=repo, out=tmp_path / "gated", endpoint=hub.url))
        assert not (tmp_path / "gated").exists()
        hub.gated.clear()
        out = tmp_path / "imagenet-wds"
        summary = run_fetch(FetchConfig(repo=repo, out=out, endpoint=hub.url), log=lambda m: None)
    assert _shards(out) == _shards(root)
    patterns = [line.split("=", 1)[1].strip("'") for line in summary.lines if "make encode SOURCE=" in line]
    assert patterns == [f"{out}/imagenet1k-train-{{0000..0002}}.tar", f"{out}/imagenet1k-validation-{{0000..0001}}.tar"]
    assert sorted(os.path.basename(u) for p in patterns for u in expand_source(p)) == _shards(root)
