"""The demo's DINOv2, fitted to the demo images: its patch tokens carry each patch's object (shape, colour, size,
position) as the generator drew it, and the encode stage uses it at the demo grid as is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from stages.demo.data import COLOUR_NAMES, SHAPES
from stages.demo.fit_dino import TARGETS, demo_patches, fit_demo_dino, patch_labels


def _object_patch_accuracy(model, data, target: str) -> float:
    """A linear probe on the frozen tokens of the patches that show an object: fitted on the first half of them,
    scored on the second (what the tokens carry, not what a probe can memorise)."""
    from stages.core.encoders.features import dino_preprocess

    with torch.no_grad():
        tokens = model(pixel_values=dino_preprocess(torch.from_numpy(data.images).permute(0, 3, 1, 2), 64))
        tokens = tokens.last_hidden_state[:, 1:].flatten(0, 1)
    y = torch.from_numpy(data.labels[target]).flatten()
    x, y = tokens[y > 0], y[y > 0]
    half = len(y) // 2
    probe = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(probe(x[:half]), y[:half])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float((probe(x[half:]).argmax(1) == y[half:]).float().mean())


def test_patch_labels_follow_the_drawn_shapes(demo_shards):
    every = wds.WebDataset([str(p) for p in demo_shards], shardshuffle=False)
    sample = next(s for s in every
                  if len(json.loads(s["json"])["shapes"]) == 1 and json.loads(s["json"])["shapes"][0]["size"] == "large"
                  and json.loads(s["json"])["shapes"][0]["position"] == "centre"
                  and json.loads(s["json"])["shapes"][0]["shape"] in ("circle", "square"))
    meta = json.loads(sample["json"])
    labels = patch_labels(meta, 64, 4)
    shape = meta["shapes"][0]
    # a large disc or square in the centre covers the four middle patches and none of the corners
    assert (labels["shape"][1:3, 1:3] == 1 + SHAPES.index(shape["shape"])).all()
    assert (labels["colour"][1:3, 1:3] == 1 + COLOUR_NAMES.index(shape["colour"])).all()
    assert labels["shape"][0, 0] == labels["shape"][3, 3] == 0


def test_the_fitted_dino_carries_the_objects_and_encodes_at_the_demo_grid(tmp_path, tiny_models):
    from transformers import Dinov2Model

    from stages.core.encoders.load import ModelSource, load_dino, resample_position_embedding
    from stages.demo.data import write_demo_shards

    shards = write_demo_shards(tmp_path / "data", num_shards=2, samples_per_shard=256, seed=1)
    dino = tmp_path / "dino"
    shutil.copytree(tiny_models["dino"], dino)
    losses = fit_demo_dino(dino, str(shards[0]), 64, steps=150, batch_size=64)
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])

    held_out = demo_patches([str(shards[1])], 64, 4, 256)
    random = Dinov2Model.from_pretrained(tiny_models["dino"]).eval()
    resample_position_embedding(random, [4, 4])
    fitted = load_dino(ModelSource(str(dino)), torch.float32, torch.device("cpu"), pos_embed_grid=[4, 4])
    assert fitted.embeddings.position_embeddings.shape == (1, 17, 32)  # saved at the grid, used as is
    gains = {t: _object_patch_accuracy(fitted, held_out, t) - _object_patch_accuracy(random, held_out, t)
             for t in TARGETS}
    assert gains["shape"] > 0.06 and gains["colour"] > 0.08 and sum(gains.values()) > 0.2, gains


def test_the_demo_sweeps_hold_out_at_least_256_samples():
    from pipeline.sweep import load_sweep
    from stages.core.data.split import split_ids
    from stages.demo.data import write_demo_shards

    # the keys `repa data demo` writes with its defaults (4 shards of 256)
    defaults = write_demo_shards.__defaults__
    shards, per_shard = defaults[0], defaults[1]
    keys = [f"{s:05d}{i:04d}" for s in range(shards) for i in range(per_shard)]
    root = Path(__file__).resolve().parent.parent / "configs"
    for name in ("sweep-demo", "sweep-methods", "sweep-targets"):
        _, val = split_ids(keys, load_sweep(root / f"{name}.toml").base["val_fraction"])
        assert len(val) >= 256, name
