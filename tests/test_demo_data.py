"""The synthetic CC12M-style shards: layout, metadata, captions that match pixels, determinism."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.demo.data import (
    CLASS_NAMES,
    COLOURS,
    caption_words,
    make_sample,
    write_demo_shards,
)

NUM_SHARDS, PER_SHARD = 2, 12


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes}, read with plain tarfile so the raw layout is what is checked."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tf:
        for member in tf.getmembers():
            key, ext = member.name.split(".", 1)
            samples[key][ext] = tf.extractfile(member).read()
    return dict(samples)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> list[Path]:
    return write_demo_shards(tmp_path_factory.mktemp("demo"), NUM_SHARDS, PER_SHARD, seed=0, labels=True)


def test_shards_use_cc12m_names_and_img2dataset_keys(labelled):
    assert [p.name for p in labelled] == ["cc12m-train-0000.tar", "cc12m-train-0001.tar"]
    for shard, path in enumerate(labelled):
        assert list(read_shard(path)) == [f"{shard:05d}{i:04d}" for i in range(PER_SHARD)]


def test_custom_prefix_names_the_shards(tmp_path):
    paths = write_demo_shards(tmp_path, num_shards=1, samples_per_shard=1, prefix="imagenet-val")
    assert [p.name for p in paths] == ["imagenet-val-0000.tar"]


def test_each_sample_has_jpg_txt_json_and_cls_when_labelled(labelled, tmp_path):
    for key, sample in read_shard(labelled[0]).items():
        assert set(sample) == {"jpg", "txt", "json", "cls"}
        meta = json.loads(sample["json"])
        assert meta["key"] == key
        assert meta["caption"] == sample["txt"].decode("utf-8")
        assert meta["status"] == "success" and meta["error_message"] is None
        shape = meta["shapes"][0]
        assert CLASS_NAMES[int(sample["cls"].decode("ascii"))] == f"{shape['colour']} {shape['shape']}"
    unlabelled = write_demo_shards(tmp_path, num_shards=1, samples_per_shard=2, labels=False)
    assert all(set(s) == {"jpg", "txt", "json"} for s in read_shard(unlabelled[0]).values())


def test_images_decode_as_jpeg_with_the_size_in_the_metadata(labelled):
    for sample in read_shard(labelled[1]).values():
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.mode == "RGB"
        meta = json.loads(sample["json"])
        assert image.size == (meta["width"], meta["height"]) == (meta["original_width"], meta["original_height"])


def nearest_colour(rgb: np.ndarray) -> str:
    return min(COLOURS, key=lambda name: float(np.sum((rgb - np.array(COLOURS[name])) ** 2)))


def test_captions_name_the_colour_and_shape_drawn_at_each_shape_centre(labelled):
    checked = 0
    for path in labelled:
        for sample in read_shard(path).values():
            pixels = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=np.float32)
            caption = sample["txt"].decode("utf-8")
            for shape in json.loads(sample["json"])["shapes"]:
                x, y = shape["centre"]
                assert nearest_colour(pixels[y - 1 : y + 2, x - 1 : x + 2].mean(axis=(0, 1))) == shape["colour"]
                assert f"{shape['size']} {shape['colour']} {shape['shape']}" in caption
                checked += 1
    assert checked > NUM_SHARDS * PER_SHARD  # some samples carry two shapes


def test_captions_vary_and_use_only_the_published_words():
    captions = [make_sample(0, 0, i)[1] for i in range(64)]
    assert len(set(captions)) > 48
    used = {w for c in captions for w in re.findall(r"[a-z]+", c)}
    assert used <= set(caption_words())


def test_image_sizes_vary_beyond_square_and_above_512():
    sizes = [make_sample(0, 0, i)[0].size for i in range(100)]
    assert any(w != h for w, h in sizes)
    assert any(max(w, h) > 512 for w, h in sizes)
    assert min(min(w, h) for w, h in sizes) >= 160


def test_same_seed_writes_identical_bytes_and_another_seed_differs(labelled, tmp_path):
    again = write_demo_shards(tmp_path / "again", NUM_SHARDS, PER_SHARD, seed=0, labels=True)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in labelled]
    other = write_demo_shards(tmp_path / "other", 1, PER_SHARD, seed=1, labels=True)
    captions = lambda path: [s["txt"] for s in read_shard(path).values()]  # noqa: E731
    assert captions(other[0]) != captions(labelled[0])
