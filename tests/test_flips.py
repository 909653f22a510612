"""Horizontal flips: `repa encode --flips` stores the features of the mirrored crop, `repa train --flip` reads
them for half the samples, deterministically and resumably."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from cache_schema import CacheReader, FastReader, fingerprint, read_manifest, verify_cache
from cache_schema.format.layout import flip_name
from cache_schema.operations.info import describe
from stages.core.encoders.features import NONFINITE_BITS, FeatureEncoders
from stages.core.encoders.images import prepare_sample
from stages.core.errors import UsageError
from stages.encode.run import encoder_spec, run_encode
from stages.train.data import CacheBatchDataset, EpochBatchSampler
from stages.train.loop import run_train

from .encode_helpers import assert_same_features, tiny_config
from .test_train import tiny_train

IMAGE_FIELDS = ("moments", "dino", "dino_scale", "dino_cls")


def _encoders(tiny_models, **kw) -> FeatureEncoders:
    spec = encoder_spec(tiny_config(tiny_models, "", Path("unused"), text_encoder=None, class_tokens=True, **kw))
    return FeatureEncoders(spec, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def flip_cache(tmp_path_factory, tiny_models, labelled_shards):
    """48 labelled samples encoded with --flips, int8 (so scales are flipped too) and DINOv2 class tokens."""
    cfg = tiny_config(tiny_models, str(labelled_shards[0]), tmp_path_factory.mktemp("flips") / "cache", flips=True,
                      text_encoder=None, feature_codec="int8", class_tokens=True, batch_size=16)
    run_encode(cfg)
    return cfg


# -- encode ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_flipped_features_are_those_of_the_mirrored_image(tiny_models, codec):
    enc = _encoders(tiny_models, flips=True)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8))
    seen = {"vae": [], "dino": []}
    vae, dino = enc._vae_fn, enc._dino_fn
    enc._vae_fn = lambda x: seen["vae"].append(x.clone()) or vae(x)
    enc._dino_fn = lambda x: seen["dino"].append(x.clone()) or dino(x)
    out = enc.encode(images, [""] * 3, codec)
    for name in ("vae", "dino"):  # the second pass sees exactly the first one's images, mirrored left-right
        plain, mirrored = seen[name]
        assert torch.equal(mirrored, plain.flip(3)) and not torch.equal(mirrored, plain)

    enc.spec.flips = False  # the same encoders on images mirrored by hand
    direct = enc.encode(torch.from_numpy(np.ascontiguousarray(np.flip(images.numpy(), axis=2))), [""] * 3, codec)
    names = [n for n in IMAGE_FIELDS if n in direct]
    assert len(names) == (4 if codec == "int8" else 3) and flip_name("dino") not in direct
    for name in names:
        torch.testing.assert_close(out[flip_name(name)], direct[name], rtol=1e-3, atol=1e-3)
        assert not torch.equal(out[flip_name(name)], out[name])
    assert not out["nonfinite"].any()


def test_a_non_finite_flipped_feature_skips_the_sample(tiny_models):
    enc = _encoders(tiny_models, flips=True)
    calls, vae = [], enc._vae_fn

    def vae_nan_when_flipped(x):
        calls.append(1)
        m = vae(x)
        return m.fill_(float("nan")) if len(calls) == 2 else m

    enc._vae_fn = vae_nan_when_flipped
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    out = enc.encode(images, ["", ""], "fp16")
    assert out["nonfinite"].tolist() == [NONFINITE_BITS["moments"]] * 2
    assert torch.isfinite(out["moments"].float()).all()


def test_the_cache_stores_the_mirrored_crop_and_says_so(flip_cache, tiny_models, labelled_shards):
    manifest = read_manifest(flip_cache.cache)
    assert manifest.flips and manifest.settings["flips"] is True
    for name in IMAGE_FIELDS:
        assert manifest.fields[flip_name(name)]["shape"] == manifest.fields[name]["shape"]
        assert manifest.fields[flip_name(name)]["dtype"] == manifest.fields[name]["dtype"]
    assert not {flip_name(n) for n in ("label", "caption", "key")} & set(manifest.fields)
    assert fingerprint({**manifest.settings, "flips": None}) != manifest.fingerprint
    assert any(line.startswith("flips        on") for line in describe(manifest))
    without = dataclasses.replace(manifest, settings={**manifest.settings, "flips": None})
    assert "flips        off" in describe(without)

    # stored rows: the features of the prepared crop mirrored by hand, through the same encoders
    reader = FastReader(flip_cache.cache)
    keys = reader.keys.tolist()
    enc = _encoders(tiny_models, feature_codec="int8")
    raws = [s for _, s in zip(range(4), wds.WebDataset(str(labelled_shards[0]), shardshuffle=False), strict=False)]
    crops = np.stack([np.flip(prepare_sample(r, 64, 10**9, draft=False).image, axis=1) for r in raws])
    direct = enc.encode(torch.from_numpy(np.ascontiguousarray(crops)), [""] * 4, "int8")
    ids = np.array([keys.index(r["__key__"]) for r in raws])
    for name in IMAGE_FIELDS:
        stored = reader.read(flip_name(name), ids)
        got = direct[name].float().numpy()
        if name == "dino":  # int8 codes: off by one step at most where rounding falls differently
            assert np.abs(stored.astype(np.int16) - got).max() <= 1
        else:
            np.testing.assert_allclose(stored.astype(np.float32), got, rtol=2e-3, atol=2e-3)

    # a reader that does not know the _flip fields reads the cache as before
    plain = CacheReader(flip_cache.cache)
    assert len(plain) == 48 and verify_cache(flip_cache.cache) == 48
    np.testing.assert_array_equal(plain.sample(int(ids[0]))["moments"], reader.read("moments", ids[:1])[0])


def test_an_added_target_stores_its_flipped_tokens_too(flip_cache, tiny_models):
    from .test_add_target import _add

    _add(flip_cache, "same", tiny_models["dino"], class_tokens=True)  # the cache's own DINOv2, added again
    entry = read_manifest(flip_cache.cache).targets["same"]
    assert entry["settings"]["flips"] is True
    assert {"same_flip", "same_scale_flip", "same_cls_flip"} <= set(entry["fields"])
    reader = FastReader(flip_cache.cache)
    reader.require_targets(["same"])
    ids = np.arange(48)
    for name in ("", "_scale", "_cls"):
        for suffix in ("", "_flip"):
            assert_same_features(reader.read(f"same{name}{suffix}", ids), reader.read(f"dino{name}{suffix}", ids))
    # a target "foo_flip" holds the field foo_flip, which a target "foo" would write its flipped tokens to
    from stages.encode.add_target import check_target_name

    manifest = read_manifest(flip_cache.cache)
    manifest.targets = {**manifest.targets, "foo_flip": {"fields": {"foo_flip": {}, "foo_flip_flip": {}}}}
    with pytest.raises(UsageError, match="already has a field"):
        check_target_name("foo", manifest)
    assert check_target_name("foo2", manifest) == "foo2"


# -- train -----------------------------------------------------------------------------------------
def test_sampler_flips_half_the_samples_as_a_function_of_seed_and_epoch():
    ids = np.arange(5, 4005)
    plain = EpochBatchSampler(ids, 100, seed=3)
    flip = EpochBatchSampler(ids, 100, seed=3, flip=True)
    a = flip.epoch_ids(0)
    heads = a < 0
    assert 0.46 < heads.mean() < 0.54
    np.testing.assert_array_equal(np.where(heads, ~a, a), plain.epoch_ids(0))  # the same order as without --flip
    np.testing.assert_array_equal(a, EpochBatchSampler(ids, 100, seed=3, flip=True).epoch_ids(0))
    assert (flip.epoch_ids(1) < 0).tolist() != heads.tolist()
    assert (EpochBatchSampler(ids, 100, seed=4, flip=True).epoch_ids(0) < 0).tolist() != heads.tolist()
    # two ranks of 50: each step's 100 of the one stream, split between them, coins included
    r0, r1 = (EpochBatchSampler(ids, 50, seed=3, rank=r, world_size=2, flip=True).epoch_ids(0) for r in (0, 1))
    np.testing.assert_array_equal(np.concatenate([r0.reshape(-1, 50), r1.reshape(-1, 50)], axis=1).reshape(-1), a)
    # resuming mid-epoch continues with the same batches, coins included
    straight = iter(flip)
    seen = [next(straight) for _ in range(57)]
    resumed = iter(EpochBatchSampler(ids, 100, seed=3, flip=True, start=flip.position_after(50)))
    for batch in seen[50:]:
        np.testing.assert_array_equal(next(resumed), batch)


def test_a_flipped_batch_holds_the_stored_flip_rows(flip_cache):
    dataset = CacheBatchDataset(flip_cache.cache, targets=["dino"], flips=True)
    reader = FastReader(flip_cache.cache)
    sampler = EpochBatchSampler(np.arange(48), 12, seed=0, flip=True)
    served = iter(sampler)
    batches = [next(served) for _ in range(4)]
    assert 0 < sum((b < 0).sum() for b in batches) < 48
    for ids in batches:
        batch = dataset.fetch(ids, lambda name, shape, dtype: torch.empty(shape, dtype=dtype))
        unflipped, flipped = ids[ids >= 0], ~ids[ids < 0]
        k = len(unflipped)
        np.testing.assert_array_equal(batch["index"].numpy(), np.concatenate([unflipped, flipped]))
        for name in ("moments", "dino", "dino_scale"):
            np.testing.assert_array_equal(batch[name].numpy()[:k], reader.read(name, unflipped))
            np.testing.assert_array_equal(batch[name].numpy()[k:], reader.read(flip_name(name), flipped))
        np.testing.assert_array_equal(batch["label"].numpy()[k:], reader.read("label", flipped))
    plain = dataset.__getitems__(np.arange(6))  # validation and previews pass plain ids: never flipped
    np.testing.assert_array_equal(plain["moments"].numpy(), reader.read("moments", np.arange(6)))
    with pytest.raises(IndexError):  # a flipped id where flips were not asked for
        CacheBatchDataset(flip_cache.cache).__getitems__(np.array([~3]))


def test_training_with_flip_resumes_bit_exactly(flip_cache, tmp_path):
    kw = dict(cond="class", steps=6, ckpt_every=3, val_every=6, log_every=3, flip=True, keep_checkpoints=0)
    run_train(tiny_train(flip_cache.cache, tmp_path / "straight", **kw))
    run_train(tiny_train(flip_cache.cache, tmp_path / "resumed", **{**kw, "steps": 3}))
    run_train(tiny_train(flip_cache.cache, tmp_path / "resumed", **kw, resume=True))
    a = torch.load(tmp_path / "straight" / "checkpoints" / "step-0000006.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "step-0000006.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    with pytest.raises(UsageError, match=r"settings differ \(flip: True -> False"):
        run_train(tiny_train(flip_cache.cache, tmp_path / "resumed", **{**kw, "steps": 9, "flip": False}, resume=True))


def test_flip_on_a_cache_without_flips_is_refused(tmp_path, tiny_models, labelled_shards):
    cfg = tiny_config(tiny_models, str(labelled_shards[1]), tmp_path / "plain", text_encoder=None, max_samples=16,
                      batch_size=16)
    run_encode(cfg)
    with pytest.raises(UsageError, match=rf"--flip: cache {cfg.cache} holds no features of flipped crops .*"
                                         r"re-encode it with `repa encode --flips`"):
        run_train(tiny_train(cfg.cache, tmp_path / "run", flip=True))
    with pytest.raises(UsageError, match="encoded without --flips"):
        run_encode(tiny_config(tiny_models, "", cfg.cache, add_target="t", target_model=str(tiny_models["dino"]),
                               flips=True))
