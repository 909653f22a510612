"""Writing a cache: starting an encode, claiming parts, writing one part, committing or dropping it.

A part is written into ``parts/.tmp-<name>-<owner>.zarr`` by the one process that claimed it
(``cache_schema.writing.claims``). Sharded arrays are written one whole shard file at a time (a partial write
rewrites a shard, and concurrent partial writers lose data): rows are copied once into a buffer the size
of one shard, which tensorstore writes when it is full (zarr-python creates the arrays and writes the
small ones; tensorstore's writer costs half its CPU per sample). ``commit`` flushes the rest, lists every file
with its size, stores the record in the group attributes, fsyncs everything, and then, under the cache lock and only if
the writer still owns its claim, renames the directory to ``parts/<name>.zarr`` and writes
``records/<name>.json``: the record is the commit. A crash leaves a ``.tmp-`` directory (deleted by
the next claimer of that part) or, between the rename and the record, a published directory whose
record the next claimer restores from its attributes.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import tensorstore as ts
import zarr
from zarr.codecs import Crc32cCodec

from cache_schema.errors import CacheError
from cache_schema.format.layout import (
    CLAIMS_DIR,
    MANIFEST_NAME,
    PART_SUFFIX,
    PARTS_DIR,
    RECORDS_DIR,
    TEXT_CHUNK_TOKENS,
    TMP_PREFIX,
    TRASH_PREFIX,
    Field,
)
from cache_schema.format.lock import cache_lock
from cache_schema.format.manifest import (
    Manifest,
    PartRecord,
    read_records,
    record_path,
    settings_diff,
    target_dir,
    update_manifest,
    write_record,
)
from cache_schema.storage.fsutil import fsync_dir, fsync_tree, write_error
from cache_schema.storage.object_store import local_path
from cache_schema.writing import claims
from cache_schema.writing.claims import Owner

_PLAIN_CHUNK = 65536  # rows per chunk of the small per-sample arrays (keys, labels, offsets)


def _zarr_dtype(f: Field):
    return str if f.dtype == "str" else f.dtype


def part_path(cache_dir: Path, name: str) -> Path:
    return Path(cache_dir) / PARTS_DIR / f"{name}{PART_SUFFIX}"


def list_files(root: Path) -> dict[str, int]:
    """Every file below a part directory except the group's own metadata, relative path -> size."""
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if rel != "zarr.json":
                out[rel] = os.path.getsize(path)
    return out


class PartWriter:
    """Writes one part. Not thread-safe: one writer thread owns it from creation to commit."""

    def __init__(self, cache_dir: Path, name: str, source: str, fields: dict[str, Field], shard_size: int,
                 source_id: str = "", owner: Owner | None = None):
        self.cache_dir = Path(cache_dir)
        self.name, self.source, self.source_id = name, source, source_id
        self.fields = fields
        self.shard_size = shard_size
        self.owner = owner  # the claim holder; None for a writer that claims nothing (a sole writer)
        unique = (owner or Owner.here()).id
        self.text_shard_tokens = TEXT_CHUNK_TOKENS * shard_size
        parts = self.cache_dir / PARTS_DIR
        parts.mkdir(parents=True, exist_ok=True)
        self.tmp_path = parts / f"{TMP_PREFIX}{name}-{unique}{PART_SUFFIX}"
        self.final_path = part_path(self.cache_dir, name)
        self.group = zarr.open_group(str(self.tmp_path), mode="w-")
        self.arrays: dict[str, zarr.Array] = {f.name: self._create(f) for f in fields.values()}
        self._plain: dict[str, list] = {f.name: [] for f in fields.values() if not f.sharded}
        self._shards: dict[str, ShardBuffer] = {
            f.name: ShardBuffer(self.tmp_path / f.name, self.shard_size if f.per_sample else self.text_shard_tokens,
                                f.inner_shape, f.dtype)
            for f in fields.values() if f.sharded
        }
        self._skipped: list[dict] = []
        self._num_samples = 0
        self._text_tokens = 0
        self._latent_sum = None
        self._latent_sumsq = None
        self._latent_count = 0
        self.base: dict = {}  # for a part of an added target: see PartRecord.base
        self.has_text = "text" in fields
        if self.has_text:
            self._plain["text_offsets"].append(0)

    def _create(self, f: Field) -> zarr.Array:
        # Every chunk carries a crc32c: zarr-python and tensorstore check it on every read.
        if not f.sharded:
            # Chunks of fill values are written too, so that every chunk is a file the record lists.
            return self.group.create_array(f.name, shape=(0,) + f.inner_shape, dtype=_zarr_dtype(f),
                                           chunks=(_PLAIN_CHUNK,), compressors=[Crc32cCodec()],
                                           config={"write_empty_chunks": True})
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
            compressors=[Crc32cCodec()],
            fill_value=0,
            # Every chunk is written, so skip zarr's scan for all-fill chunks (its cost: BENCHMARKS.md).
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
                self._shards[name].add(block)
        if self.has_text:
            lengths = [len(t) for t in rows["text"]]
            for name in ("text", "text_scale"):
                if name in self.fields:
                    for tokens in rows[name]:
                        self._shards[name].add(tokens)
            offs = self._plain["text_offsets"]
            for length in lengths:
                offs.append(offs[-1] + length)
            self._text_tokens += sum(lengths)
        if "moments" in rows:  # the parts of an added target hold no latents
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

    # -- finishing -----------------------------------------------------------------------------
    def commit(self, complete: bool = True, samples_read: int | None = None) -> PartRecord:
        """Flush, make durable, then publish under the final name and write the record (the commit).

        ``complete``: the source was read to its end without error or sample limit. Raises
        CacheError, and deletes the work, when another process has taken over the claim.
        """
        if self.owner is not None and not self._still_owned():
            self._lost()
        try:
            for shard in self._shards.values():
                shard.close()
            for name, vals in self._plain.items():
                arr = self.arrays[name]
                if vals:
                    arr.resize((len(vals),))
                    arr[:] = np.asarray(vals, dtype=_zarr_dtype(self.fields[name]))
            files = list_files(self.tmp_path)
            rec = PartRecord(
                name=self.name, source=self.source, source_id=self.source_id, num_samples=self._num_samples,
                num_text_tokens=self._text_tokens, bytes=sum(files.values()), skipped=len(self._skipped),
                skips=self._skipped, complete=complete,
                samples_read=self._num_samples + len(self._skipped) if samples_read is None else samples_read,
                files=files,
                latent_sum=[] if self._latent_sum is None else self._latent_sum.tolist(),
                latent_sumsq=[] if self._latent_sumsq is None else self._latent_sumsq.tolist(),
                latent_count=self._latent_count, writer=self.tmp_path.name,
                committed=time.strftime("%Y-%m-%dT%H:%M:%S%z"), base=self.base,
            )
            self.group.attrs.update({"part": asdict(rec)})
            fsync_tree(self.tmp_path)
        except OSError as e:
            self.abort()
            raise write_error(self.tmp_path, e, "rerun the same encode command (committed parts are kept)") from None
        with cache_lock(self.cache_dir):
            if self.owner is not None and not claims.owns(self.cache_dir, self.name, self.owner):
                self._lost()
            if record_path(self.cache_dir, self.name).exists() or self.final_path.exists():
                shutil.rmtree(self.tmp_path, ignore_errors=True)
                raise CacheError(f"{self.final_path}: part already committed by another writer; not overwriting it")
            os.rename(self.tmp_path, self.final_path)
            fsync_dir(self.final_path.parent)
            write_record(self.cache_dir, rec)
            if self.owner is not None:
                claims.release(self.cache_dir, self.name, self.owner, locked=True)
        return rec

    def abort(self) -> None:
        shutil.rmtree(self.tmp_path, ignore_errors=True)

    def _still_owned(self) -> bool:
        if self.owner is None:  # a sole writer claims nothing, so it cannot lose a claim
            return True
        with cache_lock(self.cache_dir):
            return claims.owns(self.cache_dir, self.name, self.owner)

    def _lost(self) -> None:
        self.abort()
        raise CacheError(f"part {self.name}: another process took over its claim while this one was writing it "
                         "(stalled past the lease); this copy is discarded")


# -- the life of a cache and of its parts ---------------------------------------------------------
def start_encode(cache_dir: Path, template: Manifest, overwrite: bool, sources: dict | None = None,
                 lease_s: float = claims.DEFAULT_LEASE_S, unreadable: dict[str, str] | None = None) -> Manifest:
    """Prepare a cache directory for an encode; call from one process of a job before the others start.

    Creates the manifest, or checks that an existing one has the same fingerprint (refusing with the
    differing settings named otherwise), and registers ``sources`` (part name -> {url, id}), the input
    shards this encode was asked for. ``overwrite`` deletes what the cache holds, refused while any
    process is writing to it. Leftovers of crashed writers are cleaned by whoever claims their part.
    """
    cache_dir = Path(cache_dir)
    if overwrite and cache_dir.exists():
        busy = claims.live_claims(cache_dir, lease_s)
        if busy:
            part, holder = next(iter(busy.items()))
            raise CacheError(f"{cache_dir}: --overwrite refused: {len(busy)} part(s) are being written, e.g. "
                             f"{part} by {claims.describe_holder(holder)}; stop those encodes first")
        for name in (PARTS_DIR, RECORDS_DIR, CLAIMS_DIR):
            shutil.rmtree(cache_dir / name, ignore_errors=True)
        (cache_dir / MANIFEST_NAME).unlink(missing_ok=True)
    try:
        for name in (PARTS_DIR, RECORDS_DIR, CLAIMS_DIR):
            (cache_dir / name).mkdir(parents=True, exist_ok=True)
        probe = cache_dir / f"{TMP_PREFIX}probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CacheError(f"{cache_dir}: cache directory is not writable ({e.strerror}); choose another --cache") from e

    def merge(m: Manifest | None) -> Manifest:
        if m is None:
            m = template
        elif m.fingerprint != template.fingerprint:
            diff = "; ".join(settings_diff(m.settings, template.settings)) or "fingerprint"
            raise CacheError(
                f"{cache_dir}: holds a cache made with other settings ({diff}); "
                "use another --cache or pass --overwrite to start over"
            )
        m.sources = {**m.sources, **(sources or {})}
        return m

    return update_manifest(cache_dir, merge).with_parts(read_records(cache_dir, unreadable))


def start_target(cache_dir: Path, name: str, entry: dict) -> Manifest:
    """Register added target ``name`` (its manifest entry: settings, fingerprint, geometry, fields) in the
    manifest of an existing cache and create its directories. A target of that name made with other
    settings is refused; the same settings resume it (and record the encoder's final LayerNorm if the entry
    lacked it). Nothing else in the manifest changes."""
    cache_dir = Path(cache_dir)
    root = local_path(target_dir(cache_dir, name))
    try:
        for sub in (PARTS_DIR, RECORDS_DIR, CLAIMS_DIR):
            (root / sub).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheError(f"{root}: not writable ({e.strerror}); fix the permissions of --cache {cache_dir}") from e

    def merge(m: Manifest | None) -> Manifest:
        if m is None:
            raise CacheError(f"{cache_dir}: no manifest; encode the cache before adding targets to it")
        old = m.targets.get(name)
        if old is not None and old["fingerprint"] != entry["fingerprint"]:
            diff = "; ".join(f"{k}: {old['settings'].get(k)} -> {v}" for k, v in entry["settings"].items()
                             if old["settings"].get(k) != v) or "fingerprint"
            raise CacheError(f"{cache_dir}: target {name} was added with other settings ({diff}); "
                             "choose another target name")
        if old is None:
            m.targets = {**m.targets, name: {**entry, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}
        elif "layernorm" in entry and "layernorm" not in old:  # added before the LayerNorm was recorded
            m.targets = {**m.targets, name: {**old, "layernorm": entry["layernorm"]}}
        return m

    return update_manifest(cache_dir, merge).with_parts(read_records(cache_dir))


def settle_part(cache_dir: Path, name: str, owner: Owner) -> PartRecord | None:
    """Call after claiming ``name``: delete what earlier, dead writers left of it, and return its
    record if a published directory only lacked one (restored from its attributes), else None."""
    cache_dir = Path(cache_dir)
    parts = cache_dir / PARTS_DIR
    for leftover in parts.glob(f"{TMP_PREFIX}{name}-*{PART_SUFFIX}"):
        if not leftover.name.endswith(f"-{owner.id}{PART_SUFFIX}"):
            shutil.rmtree(leftover, ignore_errors=True)
    final = part_path(cache_dir, name)
    if record_path(cache_dir, name).exists() or not final.exists():
        return None
    rec: PartRecord | None
    with cache_lock(cache_dir):
        try:
            attrs = zarr.open_group(str(final), mode="r").attrs.asdict()
            if not isinstance(attrs["part"], dict):
                raise CacheError(f"{final}: its part record is not a JSON object")
            found = PartRecord.from_json(attrs["part"], str(final))
            if list_files(final) != found.files:
                raise CacheError(f"{final}: files differ from its record")
        except Exception:  # an unreadable leftover: nothing to restore
            rec = None
            trash = _trash(final)
        else:
            write_record(cache_dir, found)
            rec = found
    if rec is None and trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return rec


def drop_part(cache_dir: Path, name: str) -> None:
    """Uncommit a part: its record goes first (readers stop seeing it), then its directory.
    The caller holds the part's claim."""
    cache_dir = Path(cache_dir)
    with cache_lock(cache_dir):
        local_path(record_path(cache_dir, name)).unlink(missing_ok=True)
        fsync_dir(cache_dir / RECORDS_DIR)
        trash = _trash(part_path(cache_dir, name))
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _trash(path: Path) -> Path | None:
    if not path.exists():
        return None
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}-{time.time_ns()}")
    os.rename(path, trash)
    return trash


class _BufferPool:
    """Shard buffers kept for the next part of this process: a fresh buffer pays page faults for every
    sample the first time it is filled; a reused one does not."""

    def __init__(self):
        self._free: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        with self._lock:
            free = self._free.get((shape, dtype))
            if free:
                return free.pop()
        return np.empty(shape, dtype=dtype)

    def give(self, buf: np.ndarray) -> None:
        with self._lock:
            free = self._free.setdefault((buf.shape, buf.dtype.str), [])
            if len(free) < 2:  # the writer filling one part, and the committer finishing another
                free.append(buf)


_POOL = _BufferPool()


class ShardBuffer:
    """One shard's worth of rows of a sharded array, filled in place and written in one go.

    Rows are copied once, into the buffer; a full buffer is handed to tensorstore, and refilled as soon
    as tensorstore has copied it (its write to disk then overlaps the next shard's filling).
    """

    def __init__(self, path: Path, rows: int, inner_shape: tuple[int, ...], dtype: str):
        self.path, self.inner_shape = path, tuple(inner_shape)
        self.buf = _POOL.take((rows,) + self.inner_shape, np.dtype(dtype).str)
        self.count = 0  # rows in the buffer
        self.written = 0  # rows handed to tensorstore
        self._store: ts.TensorStore | None = None
        self._commits: list = []

    def add(self, block: np.ndarray) -> None:
        i = 0
        while i < len(block):
            take = min(len(block) - i, len(self.buf) - self.count)
            self.buf[self.count : self.count + take] = block[i : i + take]
            self.count += take
            i += take
            if self.count == len(self.buf):
                self.flush()

    def flush(self) -> None:
        if self.count == 0:
            return
        if self._store is None:
            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.path)}}
            self._store = ts.open(spec, open=True, write=True).result()
        end = self.written + self.count
        try:
            self._store = self._store.resize(exclusive_max=[end, *self.inner_shape], expand_only=True).result()
            future = self._store[self.written : end].write(self.buf[: self.count])
            future.copy.result()  # the buffer is free again
        except ValueError as e:  # tensorstore's I/O errors
            raise _as_os_error(e, self.path) from None
        self._commits.append(future.commit)
        self.written, self.count = end, 0

    def close(self) -> None:
        """Write what is buffered and wait until every shard is on disk."""
        self.flush()
        try:
            for commit in self._commits:
                commit.result()
        except ValueError as e:
            raise _as_os_error(e, self.path) from None
        self._commits.clear()
        _POOL.give(self.buf)


def _as_os_error(e: Exception, path: Path) -> OSError:
    full = "no space" in str(e).lower() or "quota" in str(e).lower()
    return OSError(errno.ENOSPC if full else errno.EIO, str(e).splitlines()[0][:300], str(path))
