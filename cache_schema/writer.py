"""Writing one part of a cache: buffered, shard-aligned, committed atomically.

A part is written into ``parts/.tmp-<name>-<unique>.zarr``. Sharded arrays are written one whole
shard file at a time (zarr-python rewrites a shard on every partial write, and concurrent partial
writers lose data), so rows are buffered until a shard is full. ``commit`` flushes the rest, stores
the part record in the group attributes, fsyncs every file, renames the directory to
``parts/<name>.zarr`` and records the part in the manifest. A part directory without the ``.tmp-``
prefix is therefore always complete; a crash leaves only ``.tmp-`` directories, which the next
run deletes.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import zarr

from .errors import CacheError
from .fsutil import fsync_dir, fsync_tree
from .layout import (
    MANIFEST_NAME,
    PART_SUFFIX,
    PARTS_DIR,
    TEXT_CHUNK_TOKENS,
    TMP_PREFIX,
    Field,
)
from .manifest import Manifest, PartRecord, locked_update, settings_diff

_PLAIN_CHUNK = 65536  # rows per chunk of the small per-sample arrays (keys, labels, offsets)


def _zarr_dtype(f: Field):
    return str if f.dtype == "str" else f.dtype


class PartWriter:
    """Writes one part. Not thread-safe: one writer thread owns it from creation to commit."""

    def __init__(self, cache_dir: Path, name: str, source: str, fields: dict[str, Field], shard_size: int):
        self.cache_dir = Path(cache_dir)
        self.name = name
        self.source = source
        self.fields = fields
        self.shard_size = shard_size
        self.text_shard_tokens = TEXT_CHUNK_TOKENS * shard_size
        parts = self.cache_dir / PARTS_DIR
        parts.mkdir(parents=True, exist_ok=True)
        unique = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp_path = parts / f"{TMP_PREFIX}{name}-{unique}{PART_SUFFIX}"
        self.final_path = parts / f"{name}{PART_SUFFIX}"
        self.group = zarr.open_group(str(self.tmp_path), mode="w-")
        self.arrays: dict[str, zarr.Array] = {}
        for f in fields.values():
            self.arrays[f.name] = self._create(f)
        self._plain: dict[str, list] = {f.name: [] for f in fields.values() if not f.sharded}
        self._buf: dict[str, list[np.ndarray]] = {f.name: [] for f in fields.values() if f.sharded}
        self._buffered: dict[str, int] = {name: 0 for name in self._buf}
        self._written: dict[str, int] = {name: 0 for name in self._buf}
        self._skipped: list[dict] = []
        self._num_samples = 0
        self._text_tokens = 0
        self._latent_sum = None
        self._latent_sumsq = None
        self._latent_count = 0
        self.has_text = "text" in fields
        if self.has_text:
            self._plain["text_offsets"].append(0)

    def _create(self, f: Field) -> zarr.Array:
        if not f.sharded:
            return self.group.create_array(f.name, shape=(0,) + f.inner_shape, dtype=_zarr_dtype(f), chunks=(_PLAIN_CHUNK,))
        if f.per_sample:
            chunk, shard = (1,) + f.inner_shape, (self.shard_size,) + f.inner_shape
        else:  # ragged text tokens: a chunk is a run of tokens
            chunk = (TEXT_CHUNK_TOKENS,) + f.inner_shape
            shard = (self.text_shard_tokens,) + f.inner_shape
        return self.group.create_array(
            f.name,
            shape=(0,) + f.inner_shape,
            dtype=f.dtype,
            chunks=chunk,
            shards=shard,
            compressors=None,
            fill_value=0,
            # Every chunk is written, so skip zarr's scan for all-fill chunks (measured 1.5-2x faster).
            config={"write_empty_chunks": True},
        )

    # -- adding rows ---------------------------------------------------------------------------
    def append(self, rows: dict) -> None:
        """Append a batch. ``rows`` maps each per-sample field to an array/list with one entry per
        sample; with text, ``rows['text']`` (and ``rows['text_scale']``) are lists of per-sample
        token arrays of varying length."""
        n = len(rows["key"])
        for name in self._plain:
            if name == "text_offsets":
                continue
            vals = rows[name]
            if len(vals) != n:
                raise ValueError(f"field {name}: {len(vals)} rows for {n} samples")
            self._plain[name].extend(vals.tolist() if isinstance(vals, np.ndarray) else list(vals))
        for name, f in self.fields.items():
            if not f.sharded:
                continue
            if f.per_sample:
                block = np.asarray(rows[name])
                if block.shape != (n,) + f.inner_shape or block.dtype != np.dtype(f.dtype):
                    raise ValueError(
                        f"field {name}: got {block.dtype}{tuple(block.shape)}, want {f.dtype}{(n,) + f.inner_shape}"
                    )
                self._push(name, block)
        if self.has_text:
            lengths = [len(t) for t in rows["text"]]
            for name in ("text", "text_scale"):
                if name in self.fields:
                    self._push(name, np.concatenate(rows[name], axis=0) if n else None)
            offs = self._plain["text_offsets"]
            for length in lengths:
                offs.append(offs[-1] + length)
            self._text_tokens += sum(lengths)
        self._accumulate_latent_stats(np.asarray(rows["moments"]))
        self._num_samples += n

    def skip(self, key: str | None, index: int, reason: str) -> None:
        self._skipped.append({"key": key, "source": self.source, "index": index, "reason": reason})

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def _accumulate_latent_stats(self, moments: np.ndarray) -> None:
        if len(moments) == 0:
            return
        c = moments.shape[1] // 2
        mean = moments[:, :c].astype(np.float64)
        s = mean.sum(axis=(0, 2, 3))
        ss = (mean * mean).sum(axis=(0, 2, 3))
        if self._latent_sum is None:
            self._latent_sum, self._latent_sumsq = s, ss
        else:
            self._latent_sum += s
            self._latent_sumsq += ss
        self._latent_count += mean.shape[0] * mean.shape[2] * mean.shape[3]

    def _push(self, name: str, block: np.ndarray | None) -> None:
        if block is None or len(block) == 0:
            return
        self._buf[name].append(block)
        self._buffered[name] += len(block)
        step = self.text_shard_tokens if not self.fields[name].per_sample else self.shard_size
        while self._buffered[name] >= step:
            self._flush(name, step)

    def _flush(self, name: str, count: int) -> None:
        """Write the first ``count`` buffered rows of a field as one shard-aligned block."""
        if count == 0:
            return
        data = np.concatenate(self._buf[name], axis=0)
        block, rest = data[:count], data[count:]
        self._buf[name] = [rest] if len(rest) else []
        self._buffered[name] = len(rest)
        arr = self.arrays[name]
        start = self._written[name]
        arr.resize((start + count,) + arr.shape[1:])
        arr[start : start + count] = block
        self._written[name] = start + count

    # -- finishing -----------------------------------------------------------------------------
    def commit(self, attrs: dict | None = None) -> Manifest:
        """Flush, make durable, publish under the final name and record in the manifest."""
        for name in self._buf:
            self._flush(name, self._buffered[name])
        for name, vals in self._plain.items():
            arr = self.arrays[name]
            if vals:
                arr.resize((len(vals),))
                arr[:] = np.asarray(vals, dtype=str if self.fields[name].dtype == "str" else self.fields[name].dtype)
        rec = PartRecord(
            name=self.name,
            source=self.source,
            num_samples=self._num_samples,
            num_text_tokens=self._text_tokens,
            bytes=_tree_bytes(self.tmp_path),
            skipped=len(self._skipped),
            latent_sum=[] if self._latent_sum is None else self._latent_sum.tolist(),
            latent_sumsq=[] if self._latent_sumsq is None else self._latent_sumsq.tolist(),
            latent_count=self._latent_count,
            writer=self.tmp_path.name,
        )
        self.group.attrs.update({"part": asdict(rec), "skipped": self._skipped, **(attrs or {})})
        fsync_tree(self.tmp_path)
        if self.final_path.exists():
            raise CacheError(f"{self.final_path}: part already committed by another writer; not overwriting it")
        os.rename(self.tmp_path, self.final_path)
        fsync_dir(self.final_path.parent)
        return record_committed_part(self.cache_dir, rec, self._skipped)

    def abort(self) -> None:
        shutil.rmtree(self.tmp_path, ignore_errors=True)


def record_committed_part(cache_dir: Path, rec: PartRecord, skipped: list[dict]) -> Manifest:
    def add(m: Manifest | None) -> Manifest:
        if m is None:
            raise CacheError(f"{cache_dir}: manifest vanished while part {rec.name} was being written")
        m.add_part(rec, skipped)
        return m

    return locked_update(cache_dir, add)


def _tree_bytes(root: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


def start_encode(cache_dir: Path, template: Manifest, overwrite: bool) -> Manifest:
    """Prepare a cache directory for an encode run; call from one process before the others start.

    Creates the manifest, or checks that an existing one has the same fingerprint (refusing with
    the differing settings named otherwise), removes leftovers of interrupted writers and records
    parts that were published but not yet entered in the manifest when a process died.
    """
    cache_dir = Path(cache_dir)
    if overwrite and cache_dir.exists():
        shutil.rmtree(cache_dir / PARTS_DIR, ignore_errors=True)
        for name in (MANIFEST_NAME,):
            (cache_dir / name).unlink(missing_ok=True)
    try:
        (cache_dir / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        probe = cache_dir / f"{TMP_PREFIX}probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CacheError(f"{cache_dir}: cache directory is not writable ({e.strerror}); choose another --cache") from e

    for tmp in (cache_dir / PARTS_DIR).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)

    def merge(m: Manifest | None) -> Manifest:
        if m is None:
            return template
        if m.fingerprint != template.fingerprint:
            diff = "; ".join(settings_diff(m.settings, template.settings)) or "fingerprint"
            raise CacheError(
                f"{cache_dir}: holds a cache made with other settings ({diff}); "
                "use another --cache or pass --overwrite to start over"
            )
        for part_dir in sorted((cache_dir / PARTS_DIR).glob(f"*{PART_SUFFIX}")):
            name = part_dir.name[: -len(PART_SUFFIX)]
            if not m.has_part(name):
                attrs = zarr.open_group(str(part_dir), mode="r").attrs.asdict()
                m.add_part(PartRecord(**attrs["part"]), attrs.get("skipped", []))
        return m

    return locked_update(cache_dir, merge)
