"""The training data path: validation split, resumable epoch sampler, batch dataset, loader, device transfer."""

from __future__ import annotations

import hashlib
import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_schema.reading.fast_reader import FastReader
from stages.core.data.codec import features_to_device as to_device
from stages.core.data.split import split_cache, split_ids, unit_hashes
from stages.train.data import CacheBatchDataset, EpochBatchSampler, make_loader
from tests.test_fast_reader import DINO_DIM, DINO_TOKENS, TEXT_DIM, write_cache


@pytest.fixture(scope="module")
def int8_cache(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("int8-cache")
    return root, write_cache(root, "int8", parts=(("a", 10), ("b", 14)))


def take(sampler: EpochBatchSampler, n: int) -> list[np.ndarray]:
    return list(itertools.islice(sampler, n))


# -- split ------------------------------------------------------------------------------------------
def test_split_is_stable_disjoint_covering_and_roughly_the_asked_fraction():
    keys = np.array([f"img-{i:05d}" for i in range(4000)])
    train, val = split_ids(keys, 0.1)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(keys)))
    assert 300 < len(val) < 500
    again = split_ids(keys, 0.1)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    assert not np.array_equal(split_ids(keys, 0.1, salt="other")[1], val)
    assert len(split_ids(keys, 0.0)[1]) == 0


def test_split_hash_is_the_documented_function_of_each_key():
    # blake2b-64 of "val\0key" as an exact integer over 2**64: the split every run so far was made with
    rng = np.random.default_rng(0)
    keys = [f"k{i}" for i in range(2000)] + ["".join(map(chr, rng.integers(33, 0x2FFF, 12))) for _ in range(2000)]
    want = [int.from_bytes(hashlib.blake2b(f"val\0{k}".encode(), digest_size=8).digest(), "little") / 2.0**64
            for k in keys]
    got = unit_hashes(np.array(keys, dtype=np.dtypes.StringDType()), "val")
    assert got.tolist() == want


@pytest.mark.parametrize("workers", [1, 2])
def test_cache_split_hashed_in_workers_equals_the_split_of_its_keys(tmp_path, workers):
    write_cache(tmp_path / "c", "fp16", text=False, parts=(("a", 30), ("empty", 0), ("b", 25), ("c", 40)))
    reader = FastReader(tmp_path / "c")
    train, val = split_cache(reader, 0.2, workers=workers)
    want_train, want_val = split_ids(reader.keys, 0.2)
    assert np.array_equal(train, want_train) and np.array_equal(val, want_val) and 0 < len(val) < 95


def test_split_depends_on_keys_not_on_part_order(tmp_path):
    write_cache(tmp_path / "ab", "fp16", text=False, parts=(("a", 30), ("b", 30)))
    keys_ab = FastReader(tmp_path / "ab").keys.tolist()
    keys_ba = keys_ab[30:] + keys_ab[:30]  # the same samples with the parts in the other order
    val_ab = {keys_ab[i] for i in split_ids(np.array(keys_ab), 0.2)[1]}
    val_ba = {keys_ba[i] for i in split_ids(np.array(keys_ba), 0.2)[1]}
    assert val_ab == val_ba and 0 < len(val_ab) < 60


def test_split_of_a_tiny_cache_leaves_neither_side_empty():
    for fraction in (1e-9, 0.5, 0.999999):
        train, val = split_ids(np.array(["x", "y"]), fraction)
        assert len(train) == 1 and len(val) == 1
    with pytest.raises(ValueError, match="val_fraction"):
        split_ids(np.array(["x"]), 1.0)


# -- sampler ----------------------------------------------------------------------------------------
def test_sampler_is_deterministic_per_seed_and_epoch_and_reshuffles_every_epoch():
    ids = np.arange(100, 160)
    a = take(EpochBatchSampler(ids, 10, seed=3), 12)
    assert all(np.array_equal(x, y) for x, y in zip(a, take(EpochBatchSampler(ids, 10, seed=3), 12), strict=True))
    epochs = [np.concatenate(a[:6]), np.concatenate(a[6:])]
    assert all(np.array_equal(np.sort(e), ids) for e in epochs)  # each epoch is a permutation of ids
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(np.concatenate(take(EpochBatchSampler(ids, 10, seed=4), 6)), epochs[0])


def test_ranks_get_disjoint_equal_shares_covering_the_epoch():
    ids = np.arange(60)
    shares = [np.concatenate(take(EpochBatchSampler(ids, 5, seed=0, rank=r, world_size=3), 4)) for r in range(3)]
    assert all(len(s) == 20 for s in shares)
    assert np.array_equal(np.sort(np.concatenate(shares)), ids)
    uneven = [EpochBatchSampler(np.arange(62), 5, seed=0, rank=r, world_size=3).epoch_ids(1) for r in range(3)]
    assert all(len(s) == 20 for s in uneven) and len(set(np.concatenate(uneven).tolist())) == 60


def test_drop_last_decides_whether_the_short_batch_is_served():
    ids = np.arange(22)
    full = EpochBatchSampler(ids, 5, seed=0, drop_last=True)
    assert full.batches_per_epoch == 4 and [len(b) for b in take(full, 5)] == [5, 5, 5, 5, 5]
    short = EpochBatchSampler(ids, 5, seed=0, drop_last=False)
    assert short.batches_per_epoch == 5 and [len(b) for b in take(short, 6)] == [5, 5, 5, 5, 2, 5]
    assert np.array_equal(np.sort(np.concatenate(take(short, 5))), ids)


def test_resuming_from_a_position_continues_the_uninterrupted_sequence_exactly():
    ids, kw = np.arange(47), dict(batch_size=4, seed=9, rank=1, world_size=2, drop_last=False)
    uninterrupted = take(EpochBatchSampler(ids, **kw), 20)  # 6 batches per epoch: crosses 3 epochs
    first = EpochBatchSampler(ids, **kw)
    for consumed in (0, 5, 6, 7, 13):
        resumed = EpochBatchSampler(ids, start=first.position_after(consumed), **kw)
        continuation = take(resumed, 20 - consumed)
        assert all(np.array_equal(x, y) for x, y in zip(continuation, uninterrupted[consumed:], strict=True))
    later = EpochBatchSampler(ids, start=(2, 1), **kw)
    assert later.position_after(4) == (2, 5) and later.position_after(5) == (3, 0)


def test_a_batch_larger_than_the_share_of_a_process_is_refused_clearly():
    with pytest.raises(ValueError, match=r"batch 256 > 120 samples per process in the training split of /c"):
        EpochBatchSampler(np.arange(480), 256, seed=0, rank=0, world_size=4, name="the training split of /c")


# -- dataset, loader, device -------------------------------------------------------------------------
def test_batches_hold_the_asked_fields_with_padded_text_and_mask(int8_cache):
    root, _ = int8_cache
    reader = FastReader(root)
    ids = np.array([5, 0, 23, 10, 11])
    full = CacheBatchDataset(root, need_text=True).__getitems__(ids)
    assert set(full) == {"index", "moments", "dino", "dino_scale", "label", "text", "text_scale", "text_mask"}
    assert full["index"].tolist() == ids.tolist() and full["label"].dtype == torch.int64
    assert full["dino"].dtype == torch.int8 and full["dino"].shape == (5, DINO_TOKENS, DINO_DIM)
    lengths = reader.text_lengths(ids)
    assert 0 in lengths and full["text"].shape == (5, lengths.max(), TEXT_DIM)
    assert full["text_mask"].tolist() == [[j < n for j in range(lengths.max())] for n in lengths]
    tokens, scales, _ = reader.read_text(ids)
    assert torch.equal(full["text"][full["text_mask"]], torch.from_numpy(tokens))
    assert torch.equal(full["text_scale"][full["text_mask"]], torch.from_numpy(scales))
    assert not full["text"][~full["text_mask"]].any() and not full["text_scale"][~full["text_mask"]].any()

    lean = CacheBatchDataset(root, need_dino=False, need_label=False).__getitems__(ids)
    assert set(lean) == {"index", "moments"} and torch.equal(lean["moments"], full["moments"])


def test_to_device_dequantises_int8_within_the_codec_tolerance(int8_cache):
    root, originals = int8_cache
    ids = np.arange(24)
    batch = to_device(CacheBatchDataset(root, need_text=True).__getitems__(ids), "cpu")
    assert "dino_scale" not in batch and "text_scale" not in batch
    assert batch["dino"].dtype == torch.float16 and batch["text"].dtype == torch.float16
    keys = FastReader(root).keys.tolist()
    want = torch.from_numpy(np.stack([originals["dino"][k] for k in keys]))
    # Rounding to the int8 grid is at most half a step (scale/2); fp16 output adds 2^-11 relative.
    step = want.abs().amax(dim=-1, keepdim=True) / 127
    assert ((batch["dino"].float() - want).abs() <= step / 2 + want.abs() * 2**-10).all()
    for row, key in enumerate(keys):
        n = len(originals["text"][key])
        err = (batch["text"][row, :n].float() - torch.from_numpy(originals["text"][key])).abs()
        assert (err <= torch.from_numpy(np.abs(originals["text"][key])).amax(-1, keepdim=True) / 254 + 1e-3).all()


def test_loader_workers_serve_the_sampler_order_and_kept_batches_stay_intact(int8_cache):
    root, _ = int8_cache
    dataset = CacheBatchDataset(root, need_text=True)
    sampler = EpochBatchSampler(np.arange(len(dataset)), 3, seed=1)
    expected = [dataset.__getitems__(ids) for ids in take(sampler, 20)]

    def same(got: dict, want: dict) -> bool:
        return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    for workers in (0, 2):
        with warnings.catch_warnings():  # pin_memory without an accelerator: torch warns, pins nothing
            warnings.simplefilter("ignore")
            loader = make_loader(dataset, sampler, num_workers=workers, pin_memory=True)
            kept = list(itertools.islice(loader, 20))  # kept: their shared buffers must not be refilled
        assert all(same(g, e) for g, e in zip(kept, expected, strict=True))
    assert 0 < loader.unrecycled_batches < 20  # batches beyond the slots had to use fresh memory

    loader = make_loader(dataset, sampler, num_workers=2)
    assert all(same(g, e) for g, e in zip(loader, expected, strict=False))  # each batch dropped before the next
    assert loader.unrecycled_batches == 0


def test_a_view_kept_from_a_batch_keeps_its_slot_from_being_refilled(int8_cache):
    root, _ = int8_cache
    dataset = CacheBatchDataset(root, need_text=True)
    sampler = EpochBatchSampler(np.arange(len(dataset)), 3, seed=2)
    expected = [dataset.__getitems__(ids)["moments"][1:] for ids in take(sampler, 12)]
    views = [batch["moments"][1:] for batch in itertools.islice(make_loader(dataset, sampler, num_workers=1), 12)]
    assert all(torch.equal(v, e) for v, e in zip(views, expected, strict=True))


def test_the_copy_out_fallback_serves_the_same_batches_and_frees_every_slot(int8_cache):
    from stages.train.data import storage_lifetime_is_observable

    assert storage_lifetime_is_observable()  # this torch: the fast path is the default
    root, _ = int8_cache
    dataset = CacheBatchDataset(root, need_text=True)
    sampler = EpochBatchSampler(np.arange(len(dataset)), 3, seed=3)
    expected = [dataset.__getitems__(ids) for ids in take(sampler, 16)]
    loader = make_loader(dataset, sampler, num_workers=2, copy_out=True)
    kept = list(itertools.islice(loader, 16))  # all kept, yet no worker ever runs out of slots
    assert all(torch.equal(g[k], e[k]) for g, e in zip(kept, expected, strict=True) for k in e)
    assert loader.unrecycled_batches == 0
