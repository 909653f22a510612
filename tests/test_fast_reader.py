"""FastReader (tensorstore) against CacheReader (zarr-python): bit-identical batches, ragged text,
and reads inside DataLoader worker processes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from cache_schema import (
    CacheError,
    CacheReader,
    PartWriter,
    cache_fields,
    new_manifest,
    start_encode,
)
from cache_schema.reading.fast_reader import FastReader
from stages.core.data.codec import quantize_int8

LATENT_CHANNELS, LATENT_SIZE, DINO_TOKENS, DINO_DIM, TEXT_DIM, MAX_TOKENS = 2, 4, 6, 8, 5, 4


def write_cache(root: Path, codec: str, text: bool = True, parts=(("a", 7), ("b", 5)), seed: int = 0) -> dict:
    """A tiny cache with its parts committed in the given order; returns the unquantised features.

    Keys are ``<part>-<i>``; sample i has ``i % 5`` caption tokens (so some have none) and label
    ``i % 7 - 1`` (so some have none). Features depend only on (seed, key), so two caches with the
    same parts in another order hold the same samples.
    """
    fields = cache_fields(LATENT_CHANNELS, LATENT_SIZE, DINO_TOKENS, DINO_DIM, TEXT_DIM if text else None, codec)
    settings = dict(
        resolution=32, crop="adm", vae={"id": "v"}, dino={"id": "d"}, dino_preprocess="x", dtype="fp32",
        text_encoder={"id": "t"} if text else None, max_text_tokens=MAX_TOKENS, feature_codec=codec, shard_size=4,
    )
    latent = dict(channels=LATENT_CHANNELS, size=LATENT_SIZE, scaling_factor=0.5, shift_factor=0.0, mean=None, std=None)
    text_info = dict(dim=TEXT_DIM, max_tokens=MAX_TOKENS) if text else None
    dino_info = dict(dim=DINO_DIM, tokens=DINO_TOKENS, grid=[2, 3])
    start_encode(root, new_manifest(settings, latent, dino_info, text_info, fields), False)
    originals: dict[str, dict[str, np.ndarray]] = {"dino": {}, "text": {}}
    for name, count in parts:
        writer = PartWriter(root, name, f"/data/{name}.tar", fields, shard_size=4)
        for start in range(0, count, 3):  # several appends per shard exercise the writer's buffering
            rows = []
            for i in range(start, min(start + 3, count)):
                row, dino, tokens = _sample(seed, name, i, codec, text)
                rows.append(row)
                originals["dino"][f"{name}-{i}"], originals["text"][f"{name}-{i}"] = dino, tokens
            ragged = ("text", "text_scale")
            writer.append({k: [r[k] for r in rows] if k in ragged else np.stack([r[k] for r in rows]) for k in rows[0]})
        writer.commit()
    return originals


def _sample(seed: int, part: str, i: int, codec: str, text: bool) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """One row for PartWriter.append, with the float32 DINO and text features it was quantised from."""
    key = f"{part}-{i}"
    rng = np.random.default_rng([seed, *key.encode()])
    dino = rng.standard_normal((DINO_TOKENS, DINO_DIM)).astype(np.float32)
    moments = rng.standard_normal((2 * LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)).astype(np.float16)
    row = dict(
        key=np.array(key), source_index=np.array(i), caption=np.array("" if i % 5 == 0 else f"caption {key}"),
        label=np.array(i % 7 - 1), moments=moments,
    )
    row.update(_encoded("dino", dino, codec))
    tokens = rng.standard_normal((i % 5, TEXT_DIM)).astype(np.float32) if text else None
    if text:
        row.update(_encoded("text", tokens, codec))
    return row, dino, tokens


def _encoded(name: str, x: np.ndarray, codec: str) -> dict[str, np.ndarray]:
    if codec == "fp16":
        return {name: x.astype(np.float16)}
    q, scale = quantize_int8(torch.from_numpy(x))
    return {name: q.numpy(), f"{name}_scale": scale.numpy()}


@pytest.fixture(scope="module", params=["fp16", "int8"])
def cache(request, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"cache-{request.param}")
    write_cache(root, request.param, parts=(("a", 7), ("empty", 0), ("b", 5), ("c", 9)))
    return root


def reference_rows(ref: CacheReader, field: str, ids: np.ndarray) -> np.ndarray:
    rows = []
    for i in ids:
        p, row = ref.locate(int(i))
        rows.append(ref.read(ref.parts[p]["name"], field, row, row + 1)[0])
    return np.stack(rows)


def reference_text(ref: CacheReader, field: str, index: int) -> np.ndarray:
    p, row = ref.locate(index)
    name = ref.parts[p]["name"]
    a, b = ref.read(name, "text_offsets", row, row + 2)
    return ref.read(name, field, a, b)


@pytest.mark.parametrize("direct", [True, False], ids=["direct-reads", "tensorstore"])
def test_every_per_sample_field_is_bit_identical_to_the_reference(cache, direct):
    fast, ref = FastReader(cache, direct_reads=direct), CacheReader(cache)
    ids = np.random.default_rng(0).permutation(len(fast))
    ids = np.concatenate([ids, ids[:3]])  # repeated ids come back repeated
    names = [n for n, f in fast.fields.items() if f.per_sample and n != "text_offsets"]
    assert {"moments", "dino", "label", "key", "caption", "source_index"} <= set(names)
    for name in names:
        got, want = fast.read(name, ids), reference_rows(ref, name, ids)
        if fast.fields[name].dtype == "str":  # numpy's variable-width StringDType, as zarr returns whole arrays
            assert got.tolist() == want.tolist(), name
            continue
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert np.array_equal(got, want), name
    assert np.array_equal(fast.keys, ref.keys)
    both = fast.read_many(ids, {"moments": None, "dino": None})
    assert np.array_equal(both["dino"], fast.read("dino", ids))
    # the writer's layout is the one direct reads understand: every sharded row field is read that way
    used = {name for (_, name), rows in fast._process().rows.items() if rows is not None}
    assert used == ({n for n, f in fast.fields.items() if f.sharded and f.per_sample} if direct else set())


def test_direct_reads_refuse_layouts_they_do_not_know(cache):
    import json

    from cache_schema.reading.shard_rows import ShardedRows

    root = next((cache / "parts").glob("a.zarr")) / "dino"
    meta = json.loads((root / "zarr.json").read_text())
    assert ShardedRows.from_metadata(root, meta) is not None
    for change in (
        lambda m: m["codecs"][0]["configuration"].update(index_location="start"),
        lambda m: m["codecs"][0]["configuration"]["codecs"].append({"name": "zstd", "configuration": {"level": 1}}),
        lambda m: m["codecs"][0]["configuration"].update(chunk_shape=[3] + m["shape"][1:]),  # shard of 4 rows
        lambda m: m["codecs"][0]["configuration"].update(chunk_shape=[1, 1] + m["shape"][2:]),  # split rows
        lambda m: m.update(codecs=m["codecs"][0]["configuration"]["codecs"]),  # not sharded
    ):
        other = json.loads(json.dumps(meta))
        change(other)
        assert ShardedRows.from_metadata(root, other) is None


@pytest.mark.parametrize("direct", [True, False], ids=["direct-reads", "tensorstore"])
def test_ragged_text_flat_and_padded_match_the_reference(cache, direct):
    fast, ref = FastReader(cache, direct_reads=direct), CacheReader(cache)
    ids = np.random.default_rng(1).permutation(len(fast))
    tokens, scales, lengths = fast.read_text(ids)
    padded, padded_scales, padded_lengths = fast.read_text(ids, padded=True)
    assert (lengths == 0).any() and lengths.max() == MAX_TOKENS
    assert np.array_equal(lengths, padded_lengths) and np.array_equal(lengths, fast.text_lengths(ids))
    assert tokens.shape == (lengths.sum(), TEXT_DIM) and padded.shape == (len(ids), MAX_TOKENS, TEXT_DIM)
    int8 = "text_scale" in fast.fields
    assert (scales is not None) == int8 and (padded_scales is not None) == int8
    starts = np.cumsum(lengths) - lengths
    for j, i in enumerate(ids):
        want = reference_text(ref, "text", int(i))
        assert np.array_equal(tokens[starts[j] : starts[j] + lengths[j]], want)
        assert np.array_equal(padded[j, : lengths[j]], want) and not padded[j, lengths[j] :].any()
        if int8:
            want_scale = reference_text(ref, "text_scale", int(i))
            assert np.array_equal(scales[starts[j] : starts[j] + lengths[j]], want_scale)
            assert np.array_equal(padded_scales[j, : lengths[j]], want_scale)
            assert not padded_scales[j, lengths[j] :].any()
    empty = ids[lengths == 0][:2]
    assert fast.read_text(empty)[0].shape == (0, TEXT_DIM)
    assert fast.read_text(empty, padded=True)[0].shape == (2, 0, TEXT_DIM)


def test_reads_fill_the_given_buffers_in_place(cache):
    fast = FastReader(cache)
    ids = np.array([5, 0, 11])
    out = np.full((3, 2 * LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE), np.nan, dtype=np.float16)
    assert fast.read("moments", ids, out=out) is out
    assert np.array_equal(out, fast.read("moments", ids))
    with pytest.raises(ValueError, match="out for moments"):
        fast.read("moments", ids, out=np.empty((2, 1), np.float16))


def test_bad_requests_are_refused_with_clear_errors(tmp_path, cache):
    fast = FastReader(cache)
    with pytest.raises(IndexError, match=f"sample {len(fast)} out of range"):
        fast.read("moments", np.array([0, len(fast)]))
    with pytest.raises(ValueError, match="read_text"):
        fast.read("text", np.array([0]))
    with pytest.raises(KeyError, match="no field 'latents'"):
        fast.read("latents", np.array([0]))
    write_cache(tmp_path, "fp16", text=False, parts=(("a", 2),))
    with pytest.raises(CacheError, match="no text features"):
        FastReader(tmp_path).read_text(np.array([0]))


class _WorkerReads(Dataset):
    """Batches read in a DataLoader worker, tagged with the process that read them."""

    def __init__(self, reader: FastReader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitems__(self, ids):
        ids = np.asarray(ids)
        tokens, _, lengths = self.reader.read_text(ids)
        feats = self.reader.read_many(ids, {"moments": None, "dino": None, "label": None})
        return {"pid": os.getpid(), **{k: torch.from_numpy(v) for k, v in feats.items()},
                "text": torch.from_numpy(tokens), "lengths": torch.from_numpy(lengths)}


def _batch(batch):
    return batch


def test_reader_made_and_used_in_the_parent_works_in_dataloader_workers(tmp_path):
    write_cache(tmp_path, "int8")
    reader = FastReader(tmp_path)
    batches = [np.arange(i, len(reader), 3) for i in range(3)]
    expected = [_WorkerReads(reader).__getitems__(ids) for ids in batches]  # tensorstore used here first
    loader = DataLoader(
        _WorkerReads(reader), batch_sampler=batches, num_workers=2, collate_fn=_batch,
        multiprocessing_context="forkserver",
    )
    got = list(loader)
    pids = {b["pid"] for b in got}
    assert len(pids) == 2 and os.getpid() not in pids
    for g, e in zip(got, expected, strict=True):
        assert all(torch.equal(g[k], e[k]) for k in e if k != "pid")
