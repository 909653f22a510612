"""`repa data pack`: image folders as webdataset shards with ImageFolder's labels, bytes kept, resumable."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app


def _image(path: Path, seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (70 + seed, 90, 3), dtype=np.uint8)).save(buf, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path) -> dict[str, tuple[int, bytes]]:
    """An ILSVRC-like train/ tree, folders made out of sorted order; key -> (ImageFolder label, bytes)."""
    root = tmp_path / "train"
    files = {"n03/n03_2.JPEG": 2, "n03/n03_1.jpg": 2, "n01/n01_5.JPEG": 0, "n02/sub/n02_9.png": 1, "n01/n01_0.jpeg": 0}
    out = {}
    for i, (rel, label) in enumerate(files.items()):
        out[Path(rel).stem] = (label, _image(root / rel, i, "PNG" if rel.endswith("png") else "JPEG"))
    (root / "n02" / "notes.txt").write_text("not an image")
    return out


def _read(pattern: str) -> list[dict]:
    return list(wds.WebDataset(pattern, shardshuffle=False))


def test_a_class_tree_packs_in_imagefolder_order_with_its_labels_and_bytes(tmp_path, tree):
    r = CliRunner().invoke(app, ["data", "pack", str(tmp_path / "train"), "--out", str(tmp_path / "shards"),
                                 "--shard-size", "2", "--prefix", "imagenet-train"])
    assert r.exit_code == 0, r.output
    pattern = str(tmp_path / "shards" / "imagenet-train-{000000..000002}.tar")
    assert f"--source '{pattern}'" in r.output and "skipped 1 other files" in r.output
    samples = _read(pattern)
    # sorted class folders, then sorted paths within each (torchvision's ImageFolder)
    assert [s["__key__"] for s in samples] == ["n01_0", "n01_5", "n02_9", "n03_1", "n03_2"]
    for s in samples:
        label, data = tree[s["__key__"]]
        assert int(s["cls"]) == label
        assert s.get("jpg", s.get("png")) == data  # the original bytes, not re-encoded
        assert json.loads(s["json"])["class"] == f"n0{label + 1}"
    assert json.loads(samples[2]["json"])["path"] == "n02/sub/n02_9.png"


def test_a_flat_folder_packs_with_a_label_list_and_class_names(tmp_path, tree):
    val = tmp_path / "val"
    data = {name: _image(val / f"{name}.JPEG", 10 + i) for i, name in enumerate(["v_3", "v_1", "v_2"])}
    labels = tmp_path / "labels.csv"
    labels.write_text("ImageId,PredictionString\nv_1,n03 1 2 3 4\nv_2,0\nv_3.JPEG n02\n")
    r = CliRunner().invoke(app, ["data", "pack", str(val), "--out", str(tmp_path / "val-shards"),
                                 "--labels", str(labels), "--classes", str(tmp_path / "train")])
    assert r.exit_code == 0, r.output
    samples = _read(str(tmp_path / "val-shards" / "val-000000.tar"))
    assert [(s["__key__"], int(s["cls"])) for s in samples] == [("v_1", 2), ("v_2", 0), ("v_3", 1)]
    assert all(s["jpg"] == data[s["__key__"]] for s in samples)


def test_a_rerun_writes_only_missing_shards_and_other_inputs_are_refused(tmp_path, tree):
    args = ["data", "pack", str(tmp_path / "train"), "--out", str(tmp_path / "shards"), "--shard-size", "2"]
    assert CliRunner().invoke(app, args).exit_code == 0
    shards = sorted((tmp_path / "shards").glob("train-*.tar"))
    before = {p.name: p.read_bytes() for p in shards}
    shards[1].unlink()
    (tmp_path / "shards" / ".train-000001.tar.tmp-999").write_bytes(b"half a shard from a killed run")
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and "(1 written now, 2 already there)" in r.output, r.output
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "shards").glob("train-*.tar"))} == before

    r = CliRunner().invoke(app, [*args[:-1], "3"])
    assert r.exit_code == 2 and "packed from other files or settings" in r.output
    assert "Traceback" not in r.output


def test_bad_inputs_end_in_one_line(tmp_path, tree):
    runner = CliRunner()
    _image(tmp_path / "train" / "n04" / "n01_0.jpg", 20)  # the same key as n01/n01_0.jpeg
    r = runner.invoke(app, ["data", "pack", str(tmp_path / "train"), "--out", str(tmp_path / "o1")])
    assert r.exit_code == 2 and "would share the sample key 'n01_0'" in r.output

    flat = tmp_path / "flat"
    _image(flat / "a.jpg", 1)
    _image(flat / "b.jpg", 2)
    (tmp_path / "l.txt").write_text("a 3\n")
    r = runner.invoke(app, ["data", "pack", str(flat), "--out", str(tmp_path / "o2"),
                            "--labels", str(tmp_path / "l.txt")])
    assert r.exit_code == 2 and "no label for 1 image(s)" in r.output and "b.jpg" in r.output
    (tmp_path / "l.txt").write_text("a 3\nb n99\n")
    r = runner.invoke(app, ["data", "pack", str(flat), "--out", str(tmp_path / "o2"),
                            "--labels", str(tmp_path / "l.txt")])
    assert r.exit_code == 2 and "l.txt:2" in r.output
    assert not (tmp_path / "o2").exists() or not list((tmp_path / "o2").glob("*.tar"))


def test_packed_shards_encode_with_their_labels(tmp_path, tree, tiny_models):
    from cache_schema import CacheReader

    runner = CliRunner()
    r = runner.invoke(app, ["data", "pack", str(tmp_path / "train"), "--out", str(tmp_path / "shards"),
                            "--shard-size", "3"])
    assert r.exit_code == 0, r.output
    pattern = r.output.split("--source '")[1].split("'")[0]
    r = runner.invoke(app, ["encode", "--source", pattern, "--cache", str(tmp_path / "cache"), "--resolution", "64",
                            "--vae", str(tiny_models["vae"]), "--dino", str(tiny_models["dino"]),
                            "--text-encoder", "none", "--num-workers", "0", "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    reader = CacheReader(tmp_path / "cache")
    labels = {str(reader.keys[i]): int(reader.sample(i)["label"]) for i in range(len(reader))}
    assert labels == {k: label for k, (label, _) in tree.items()}
