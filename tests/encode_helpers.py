"""Helpers for the encode tests: configs pointing at the tiny models, CLI subprocesses, tar surgery."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from stages.encode.config import EncodeConfig

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(models: dict, source: str, cache: Path, **kw) -> EncodeConfig:
    base = dict(
        source=source, cache=cache, resolution=64, vae=str(models["vae"]), dino=str(models["dino"]),
        text_encoder=str(models["text"]), max_text_tokens=16, batch_size=8, num_workers=0, shard_size=16,
    )
    base.update(kw)
    return EncodeConfig(**base)


def cli_args(cfg: EncodeConfig) -> list[str]:
    args = [
        "--source", cfg.source, "--cache", str(cfg.cache), "--resolution", str(cfg.resolution),
        "--vae", cfg.vae, "--dino", cfg.dino, "--text-encoder", cfg.text_encoder or "none",
        "--max-text-tokens", str(cfg.max_text_tokens), "--batch-size", str(cfg.batch_size),
        "--num-workers", str(cfg.num_workers), "--shard-size", str(cfg.shard_size),
        "--feature-codec", cfg.feature_codec,
    ]
    return args


def env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def repa(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=env(), timeout=timeout, cwd=ROOT,
        **kw
    )


IMPORT_PROBE = """
import json, runpy, sys
sys.argv = ["repa"] + json.loads(sys.argv[1])
try:
    runpy.run_module("pipeline", run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def cli_imports(args: list[str], timeout: float = 300) -> tuple[int, list[str], str]:
    """Run `repa ARGS` in a fresh interpreter: (exit code, every module it imported, stderr)."""
    import json

    r = subprocess.run([sys.executable, "-c", IMPORT_PROBE, json.dumps(args)], env=env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    report = json.loads(r.stdout.strip().splitlines()[-1])
    return report["code"], report["modules"], r.stderr


def tar_keys(paths) -> list[str]:
    keys = []
    for p in paths:
        keys += [s["__key__"] for s in wds.WebDataset(str(p), shardshuffle=False)]
    return keys


def jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_bad_corpus(out: Path) -> tuple[list[Path], dict[str, str], list[str]]:
    """Two shards mixing good and bad samples; the second tar is cut in the middle of a file.

    Returns (shards, expected skip reason per key, keys that must be encoded).
    """
    rng = np.random.default_rng(0)
    good = lambda: jpeg(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))  # noqa: E731
    cmyk = io.BytesIO()
    Image.new("CMYK", (80, 80), (0, 200, 200, 0)).save(cmyk, format="JPEG")
    gray16 = png(Image.fromarray(np.full((80, 80), 40000, dtype=np.uint16)))
    rgba = png(Image.new("RGBA", (80, 80), (255, 0, 0, 100)))
    samples = [
        ("a000", {"jpg": good(), "txt": b"fine"}, None),
        ("a001", {"jpg": b"\xff\xd8 this is not really a jpeg", "txt": b"x"}, "decode-error"),
        ("a002", {"jpg": good()[:300], "txt": b"x"}, "truncated-image"),
        ("a003", {"txt": b"caption without image", "json": b"{}"}, "missing-image"),
        ("a004", {"png": png(Image.new("RGB", (6, 40))), "txt": b"x"}, "too-small"),
        ("a005", {"png": png(Image.new("RGB", (600, 600))), "txt": b"x"}, "too-large"),
        ("a006", {"jpg": good(), "txt": b"\xc3\x28 broken utf-8"}, "bad-caption"),
        ("a007", {"jpg": cmyk.getvalue(), "txt": b"cmyk"}, None),
        ("a008", {"png": gray16, "json": b'{"caption": "sixteen bit"}'}, None),
        ("a009", {"png": rgba, "txt": b"alpha"}, None),
        ("a010", {"jpg": good(), "txt": "unicode caption \u00e9\u4e2d".encode()}, None),
    ]
    out.mkdir(parents=True, exist_ok=True)
    first = out / "bad-0000.tar"
    with wds.TarWriter(str(first)) as w:
        for key, content, _ in samples:
            w.write({"__key__": key, **content})
    second = out / "bad-0001.tar"
    with wds.TarWriter(str(second)) as w:
        for i in range(6):
            w.write({"__key__": f"b{i:03d}", "jpg": good(), "txt": f"caption {i}".encode()})
    data = second.read_bytes()
    cut = data.find(b"b004.jpg")  # the tar header of sample 4's image: cut inside its data
    second.write_bytes(data[: cut + 512 + 700])
    expected_skips = {k: r for k, _, r in samples if r}
    kept = [k for k, _, r in samples if r is None] + ["b000", "b001", "b002", "b003"]
    return [first, second], expected_skips, kept


def write_filter_corpus(out: Path) -> tuple[Path, dict[str, str], list[str]]:
    """One shard whose samples fail --keep 'aesthetic_score>3' or --min-size 100 in known ways, among ones that
    pass both. Returns (shard, the filter skip code expected per key, keys passing both filters)."""
    rng = np.random.default_rng(1)

    def image(w: int, h: int) -> bytes:
        return jpeg(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    def meta(**kw) -> bytes:
        return json.dumps({"caption": "ignored, txt wins", **kw}).encode()

    captions = ["a red circle", "a blue square on the left", "a green star", "a large yellow cross at the top",
                "a small black triangle", "a white star on a beige background"]
    passing = [(f"p{i:03d}", {"jpg": image(120 + 7 * i, 100 + 5 * i), "txt": c.encode(),
                              "json": meta(aesthetic_score=3.5 + i, nested={"score": 1})})
               for i, c in enumerate(captions)]
    failing = [
        ("k000", {"jpg": image(150, 150), "txt": b"a red circle", "json": meta(aesthetic_score=3)}, "filter-keep"),
        ("k001", {"jpg": image(150, 150), "txt": b"a red circle", "json": meta(other=7)}, "filter-keep"),
        ("k002", {"jpg": image(150, 150), "txt": b"a red circle", "json": meta(aesthetic_score="high")},
         "filter-keep"),
        ("k003", {"jpg": image(150, 150), "txt": b"a red circle"}, "filter-keep"),  # no json at all
        ("s000", {"jpg": image(99, 300), "txt": b"a tall image", "json": meta(aesthetic_score=9)}, "filter-min-size"),
        ("s001", {"png": png(Image.new("RGB", (300, 60))), "txt": b"wide", "json": meta(aesthetic_score=9)},
         "filter-min-size"),
    ]
    order = [passing[0], *(f[:2] for f in failing[:3]), *passing[1:4], *(f[:2] for f in failing[3:]), *passing[4:]]
    out.mkdir(parents=True, exist_ok=True)
    shard = out / "filter-0000.tar"
    with wds.TarWriter(str(shard)) as w:
        for key, content in order:
            w.write({"__key__": key, **content})
    return shard, {k: code for k, _, code in failing}, [k for k, _ in passing]


def two_nodes(args: list[str], port: int, timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """``python -m pipeline ARGS`` (through tests/rank_probe.py) as 2 nodes x 2 processes on this machine: two
    torchrun launchers with --nnodes 2 and their own --node-rank, meeting at a rendezvous on localhost (gloo),
    as on a cluster. Output goes to files: a launcher blocked on a full pipe would stall the other node too.
    Each result's ``rank_exits`` holds the exit reports of that node's ranks (rank_probe.py), one file each."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        outs = [(Path(tmp) / f"node{rank}.out", Path(tmp) / f"node{rank}.err") for rank in (0, 1)]
        probes = [Path(tmp) / f"node{rank}-ranks" for rank in (0, 1)]
        procs = []
        for rank, (out, err) in enumerate(outs):
            probes[rank].mkdir()
            with open(out, "w") as o, open(err, "w") as e:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                     "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                     str(ROOT / "tests" / "rank_probe.py"), *args],
                    stdout=o, stderr=e, text=True, env={**env(), "RANK_PROBE_DIR": str(probes[rank])}, cwd=ROOT))
        try:
            codes = [p.wait(timeout) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        results = []
        for p, code, (out, err), probe in zip(procs, codes, outs, probes, strict=True):
            result = subprocess.CompletedProcess(p.args, code, out.read_text(), err.read_text())
            result.rank_exits = [f.read_text() for f in sorted(probe.glob("rank-*.txt"))]
            results.append(result)
        return results


def assert_ranks_let_go_of_the_process_group(node: subprocess.CompletedProcess, ranks: int = 2) -> None:
    """Every rank of a ``two_nodes`` launch ended with its process group's threads gone (see rank_probe.py)."""
    assert node.rank_exits == ["rank exit: 0 gloo thread(s) alive\n"] * ranks, node.rank_exits


def assert_same_features(a, b) -> None:
    """Features of the same images encoded in two passes: the passes may batch them differently, and CPU
    kernels may then sum in another order, so fp16 values agree to rounding and int8 ones to one step."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    atol = 1 if a.dtype == np.int8 else 1e-3
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=1e-2, atol=atol)
