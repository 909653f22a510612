"""Reading batches of random samples from a cache with tensorstore: the training hot path.

zarr-python serves random samples from the sharded arrays slowly through fancy indexing;
tensorstore reads the same zarr v3 shards with true random access. The fastest correct way
measured is one orthogonal-index read per (part, field), written straight into a preallocated
output through an ``array`` view of it: one read future per sample, or reading into fresh arrays
that are then copied into the batch, cost more CPU, and a chunk cache pool, ``Batch``-grouped
reads and other ``data_copy_concurrency`` limits were no faster (numbers: BENCHMARKS.md,
"Design measurements").

Handles are opened lazily and per process (an instance is created in the training process and
used inside DataLoader workers; it re-opens everything when it finds itself in a new process).
Note that tensorstore aborts a *forked* child once the parent has used it, so workers must be
started with ``forkserver`` or ``spawn``, as ``stages.train.data.make_loader`` does.

Small per-sample arrays are held in RAM. The numeric ones a batch needs (labels, caption token
spans) form the *index*: read once, in the process that creates the reader, with one concurrent
tensorstore read per part (zarr-python opens parts one by one; a CC12M cache has 2 176), and carried
to worker processes with the reader (``index_arrays``/``adopt_index`` let a caller put them in
shared memory first). Strings (keys, captions) are read on demand with zarr-python, once per
process. Results are bit-identical to ``CacheReader``.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import tensorstore as ts
import zarr

from cache_schema.errors import CacheError
from cache_schema.format.integrity import check_part_files, damaged, target_hint
from cache_schema.format.layout import PART_SUFFIX, PARTS_DIR, Field
from cache_schema.format.manifest import (
    Manifest,
    field_from_json,
    read_manifest,
    read_records,
    target_dir,
    target_part_problem,
)
from cache_schema.reading.plain_arrays import PlainReadError, read_plain
from cache_schema.reading.shard_rows import RowReadError, ShardedRows
from cache_schema.storage.object_store import S3Path, cache_root, kvstore_spec, local_path

READ_THREADS = 16  # small-array reads in flight at once: file round trips overlap, decoding does not


@dataclass
class _ProcessState:
    """Everything that must not cross a fork: tensorstore handles and the RAM copies made with them."""

    pid: int
    context: ts.Context
    stores: dict[tuple[int, str], ts.TensorStore] = field(default_factory=dict)
    small: dict[str, np.ndarray] = field(default_factory=dict)
    small_parts: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # (name, part) -> its values
    rows: dict[tuple[int, str], ShardedRows | None] = field(default_factory=dict)  # direct-read geometry
    # (part, added target or None) checked against its record
    checked: set[tuple[int, str | None]] = field(default_factory=set)


class FastReader:
    """Random-access batch reads from a committed cache. Global sample ids run over parts in
    manifest order. Not thread-safe; use one instance per thread (DataLoader workers are processes,
    which is fine)."""

    def __init__(self, cache_dir: str | Path, parts: list[str] | None = None, direct_reads: bool = True,
                 unreadable: dict[str, str] | None = None):
        """``parts``: read only these committed parts (e.g. those a run started with), else all.
        ``unreadable``: see ``read_records`` (given, parts whose record cannot be read are left out).
        ``direct_reads=False`` reads every field through tensorstore (see ``shard_rows``). ``cache_dir``
        may be an ``s3://bucket/prefix``: arrays are then read through tensorstore's s3 kvstore."""
        self.cache_dir = cache_root(cache_dir)
        self.manifest: Manifest = read_manifest(self.cache_dir, unreadable)
        if parts is not None:
            have = {p["name"]: p for p in self.manifest.parts}
            gone = [name for name in parts if name not in have]
            if gone:
                raise CacheError(f"{self.cache_dir}: {len(gone)} part(s) this run trained on are no longer committed "
                                 f"(first: {gone[0]}); rerun the encode command to restore them")
            self.manifest.with_parts([have[name] for name in parts])
        self.part_names: list[str] = self.manifest.part_names()
        self.offsets = np.cumsum([0] + [p["num_samples"] for p in self.manifest.parts], dtype=np.int64)
        self.fields = {name: field_from_json(name, spec) for name, spec in self.manifest.fields.items()}
        # The arrays of added targets (targets/<target>/parts/...), by field name -> target.
        self._target_of: dict[str, str] = {}
        for target, entry in self.manifest.targets.items():
            for name, spec in entry["fields"].items():
                if name != "key":
                    self.fields[name] = field_from_json(name, spec)
                    self._target_of[name] = target
        self._target_records: dict[str, dict[str, dict]] = {}
        self._state: _ProcessState | None = None
        self._index: dict[str, np.ndarray] = {}  # by global id; travels with the reader
        # Direct reads open shard files by path: local caches only.
        self.direct_reads = direct_reads and not isinstance(self.cache_dir, S3Path)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict:
        # Workers started by forkserver or spawn unpickle the reader; they open their own handles.
        return {**self.__dict__, "_state": None}

    @property
    def has_text(self) -> bool:
        return "text" in self.fields

    # -- per-process resources -------------------------------------------------------------------
    def _process(self) -> _ProcessState:
        pid = os.getpid()
        if self._state is None or self._state.pid != pid:
            # No chunk cache: random reads rarely hit one, and a 32-256 MiB pool (which would also keep
            # shard indexes) measured no faster. One copy thread: with a part per sample (CC12M's 2 176
            # parts) the default pool's threads cost more in hand-offs than they save (2 000 -> 2 330
            # samples per CPU-second, 1 024 parts).
            self._state = _ProcessState(pid, ts.Context({"data_copy_concurrency": {"limit": 1}}))
        return self._state

    def _array_path(self, part: int, name: str) -> Path | S3Path:
        target = self._target_of.get(name)
        root = self.cache_dir if target is None else target_dir(self.cache_dir, target)
        return root / PARTS_DIR / f"{self.part_names[part]}{PART_SUFFIX}" / name

    def require_targets(self, names: list[str]) -> None:
        """CacheError unless every part read holds the tokens of each added target in ``names``, made
        for the part as it is now (not for an earlier encode of it)."""
        for target in names:
            if target not in self.manifest.targets:
                continue
            if target not in self._target_records:
                self._target_records[target] = {r["name"]: r for r in read_records(target_dir(self.cache_dir, target),
                                                                                  fix=target_hint(target))}
            records = self._target_records[target]
            for part in self.manifest.parts:
                why = target_part_problem(part, records.get(part["name"]))
                if why is not None:
                    raise CacheError(f"{self.cache_dir}: target {target} of part {part['name']}: {why}; rerun "
                                     f"`repa encode --cache {self.cache_dir} --add-target {target} ...` to finish it")

    def _check(self, part: int, name: str | None = None) -> None:
        """Compare a part's files with its record once per process: a missing file must never be
        read as zeros (zarr-python fills missing chunks), a truncated one never be trusted. A field of
        an added target is checked against that target's record of the part."""
        state = self._process()
        target = self._target_of.get(name) if name is not None else None
        if (part, target) not in state.checked:
            if target is None:
                check_part_files(self.cache_dir, self.manifest.parts[part])
            else:
                self.require_targets([target])
                check_part_files(target_dir(self.cache_dir, target),
                                 self._target_records[target][self.part_names[part]], hint=target_hint(target))
            state.checked.add((part, target))

    def _store(self, part: int, name: str) -> ts.TensorStore:
        state = self._process()
        handle = state.stores.get((part, name))
        if handle is None:
            self._check(part, name)
            spec = {
                "driver": "zarr3",
                "kvstore": kvstore_spec(self._array_path(part, name)),
                # Committed parts never change: never revalidate what tensorstore has read.
                "recheck_cached_data": False,
                "recheck_cached_metadata": False,
                # A chunk that is not there is an error, not zeros (a deleted or half-copied file).
                "fill_missing_data_reads": False,
            }
            try:
                handle = ts.open(spec, read=True, context=state.context).result()
            except ValueError as e:  # tensorstore reports missing or damaged arrays as ValueError
                raise damaged(self.manifest.parts[part], f"{name} cannot be opened ({e})") from None
            state.stores[(part, name)] = handle
        return handle

    def _read_whole(self, part: int, name: str) -> np.ndarray:
        self._check(part, name)
        if isinstance(self.cache_dir, S3Path):
            raise damaged(self.manifest.parts[part], f"{name} has a layout that is read from local disk only; "
                          "copy the cache to a local disk")
        try:
            return np.asarray(zarr.open_array(str(self._array_path(part, name)), mode="r")[:])
        except Exception as e:  # a crc32c mismatch, undecodable bytes
            raise damaged(self.manifest.parts[part], f"{name} cannot be read ({type(e).__name__}: {e})") from None

    def _read_parts(self, name: str, parts: list[int] | None = None) -> list[np.ndarray]:
        """A small array of every part (or of ``parts``): decoded here where the layout allows
        (``plain_arrays``), else numbers through tensorstore (concurrently over parts) and strings
        through zarr-python. Parts are checked and read by a pool of threads: each costs a few round trips
        (a cold page cache: ~25 s for CC12M's 2 176 parts one after the other; object storage: more)."""
        parts = list(range(len(self.part_names)) if parts is None else parts)
        if len(parts) > 1:
            # The first alone: it sets up this process's state and an added target's records.
            with ThreadPoolExecutor(READ_THREADS) as pool:
                out = [self._read_plain(parts[0], name)]
                out += pool.map(lambda p: self._read_plain(p, name), parts[1:])
        else:
            out = [self._read_plain(p, name) for p in parts]
        rest = [i for i, values in enumerate(out) if values is None]
        if rest and self.fields[name].dtype == "str":
            for i in rest:
                out[i] = self._read_whole(parts[i], name)
        elif rest:
            for i, values in zip(rest, self._read_parts_tensorstore(name, [parts[i] for i in rest]), strict=True):
                out[i] = values
        return cast(list[np.ndarray], out)  # every None was just replaced

    def _read_plain(self, p: int, name: str) -> np.ndarray | None:
        """Part ``p``'s array ``name`` checked and decoded here, or None for a layout ``read_plain`` does not know."""
        self._check(p, name)
        root = self._array_path(p, name)
        try:
            return read_plain(root, json.loads((root / "zarr.json").read_bytes()))
        except (OSError, ValueError) as e:
            raise damaged(self.manifest.parts[p], f"{name}/zarr.json cannot be read ({e})") from None
        except PlainReadError as e:
            raise damaged(self.manifest.parts[p], f"{name} cannot be read ({e})") from None

    def _read_parts_tensorstore(self, name: str, parts: list[int]) -> list[np.ndarray]:
        # Missing chunks read as fill values, as zarr-python reads them: every file the part's record
        # lists was just found with its size, and caches written before every chunk was stored
        # leave all-zero chunks out.
        spec = {"driver": "zarr3", "recheck_cached_data": False, "recheck_cached_metadata": False}
        context = self._process().context
        opening = [ts.open({**spec, "kvstore": kvstore_spec(self._array_path(p, name))},
                           read=True, context=context) for p in parts]
        reading = []
        for p, future in zip(parts, opening, strict=True):
            try:
                reading.append(future.result().read())
            except ValueError as e:
                raise damaged(self.manifest.parts[p], f"{name} cannot be opened ({e})") from None
        out = []
        for p, read in zip(parts, reading, strict=True):
            try:
                out.append(read.result())
            except ValueError as e:
                raise damaged(self.manifest.parts[p], f"{name} cannot be read ({e})") from None
        return out

    def _read_small(self, name: str) -> np.ndarray:
        """A whole small array (one entry per sample), all parts concatenated: from the index, else
        read once per process."""
        if name in self._index:
            return self._index[name]
        state = self._process()
        if name not in state.small:
            dtype = self.fields[name].dtype
            chunks = self._read_parts(name)
            empty = np.array([], dtype=str if dtype == "str" else dtype)
            state.small[name] = np.concatenate(chunks) if chunks else empty
        return state.small[name]

    def _small_rows(self, name: str, part: np.ndarray, row: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Values of a small array for ``ids``. Strings come from the parts they are in, each read once
        per process (12 M keys as strings take ~200 MB and ~10 s to read; a preview needs a few)."""
        state = self._process()
        if self.fields[name].dtype != "str" or name in state.small:
            return self._read_small(name)[ids]
        out = np.empty(len(ids), dtype=np.dtypes.StringDType())
        for p in np.unique(part).tolist():
            if (name, p) not in state.small_parts:
                state.small_parts[(name, p)] = self._read_parts(name, [p])[0]
            sel = part == p
            out[sel] = state.small_parts[(name, p)][row[sel]]
        return out

    # -- the index -------------------------------------------------------------------------------
    def load_index(self, label: bool = True, text: bool = True) -> None:
        """Read labels and caption token spans (those the cache has) into the index, once."""
        if label and "label" not in self._index:
            self._index["label"] = self._read_small("label")
        if text and self.has_text and "text_start" not in self._index:
            offsets = self._read_parts("text_offsets")
            self._index["text_start"] = np.concatenate([o[:-1] for o in offsets] + [np.zeros(0, np.int64)])
            self._index["text_count"] = np.concatenate([np.diff(o) for o in offsets] + [np.zeros(0, np.int64)])

    def index_arrays(self) -> dict[str, np.ndarray]:
        """The index as loaded so far: name -> int64 array by global id."""
        return dict(self._index)

    def adopt_index(self, arrays: dict[str, np.ndarray]) -> None:
        """Use ``arrays`` (same values as ``index_arrays()``, e.g. views of shared memory) as the index."""
        for name, values in arrays.items():
            if values.shape != (len(self),):
                raise ValueError(f"index {name}: shape {values.shape}, want ({len(self)},)")
        self._index = dict(arrays)

    def text_spans(self) -> tuple[np.ndarray, np.ndarray]:
        """(first token row within its part, token count) of every sample, by global id."""
        self._require_text()
        self.load_index(label=False)
        return self._index["text_start"], self._index["text_count"]

    def array_paths(self, name: str) -> list[Path | S3Path]:
        """Where each part's (small) array ``name`` lives, in part order, once every part's files were
        found as its record lists them: for callers that read them in other processes."""
        for p in range(len(self.part_names)):
            self._check(p, name)
        return [self._array_path(p, name) for p in range(len(self.part_names))]

    # -- addressing ------------------------------------------------------------------------------
    @property
    def keys(self) -> np.ndarray:
        """Every sample key in global-id order."""
        return self._read_small("key")

    def keys_by_part(self) -> list[np.ndarray | None]:
        """Each part's keys, in part order; None for a part whose keys cannot be read (verify names it)."""
        try:
            return list(self._read_parts("key"))
        except CacheError:
            out: list[np.ndarray | None] = []
            for p in range(len(self.part_names)):
                try:
                    out.append(self._read_parts("key", [p])[0])
                except CacheError:
                    out.append(None)
            return out

    def checked_ids(self, ids: np.ndarray) -> np.ndarray:
        """``ids`` as an int64 array, or IndexError naming the first one outside the cache."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            bad = ids[(ids < 0) | (ids >= len(self))][0]
            raise IndexError(f"sample {bad} out of range for a cache of {len(self)} samples")
        return ids

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(part number, row within the part) for each global sample id."""
        ids = self.checked_ids(ids)
        part = np.searchsorted(self.offsets, ids, side="right") - 1
        return part, ids - self.offsets[part]

    # -- reads -----------------------------------------------------------------------------------
    def read(self, name: str, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """One per-sample field for ``ids``, collated in their order, as stored (int8 stays int8).

        ``out`` (C-contiguous, shape ``(len(ids),) + row shape``) receives the rows without an
        extra copy, e.g. a shared-memory tensor's numpy view in a DataLoader worker.
        """
        return self.read_many(ids, {name: out})[name]

    def read_many(self, ids: np.ndarray, outs: dict[str, np.ndarray | None]) -> dict[str, np.ndarray]:
        """Several per-sample fields for the same ``ids``; their reads run concurrently."""
        ids = self.checked_ids(ids)
        part, row = self.locate(ids)
        result, pending = {}, []
        for name, out in outs.items():
            f = self._per_sample_field(name)
            if not f.sharded:  # held in RAM
                values = self._small_rows(name, part, row, ids)
                if out is not None:
                    out[...] = values
                result[name] = values if out is None else out
                continue
            out = self._check_out(out, (len(row),) + f.inner_shape, f.dtype, name)
            pending += self._read_rows(name, part, row, out)
            result[name] = out
        self._wait(pending)
        return result

    def text_lengths(self, ids: np.ndarray) -> np.ndarray:
        """Number of caption tokens of each sample, (len(ids),) int64."""
        self._require_text()
        return self.text_spans()[1][self.checked_ids(ids)]

    def read_text(
        self,
        ids: np.ndarray,
        padded: bool = False,
        out: np.ndarray | None = None,
        scale_out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Caption tokens of ``ids`` as stored: ``(tokens, scales or None, lengths)``.

        Flat: tokens ``(sum(lengths), Dt)``, sample i owning the next ``lengths[i]`` rows.
        Padded: tokens ``(B, max(lengths), Dt)`` and scales ``(B, max(lengths))``, zero beyond
        each length. ``out`` / ``scale_out`` receive the result without an extra copy.
        """
        self._require_text()
        ids = self.checked_ids(ids)
        part, _ = self.locate(ids)
        first, counts = self.text_spans()
        starts, lengths = first[ids], counts[ids]
        width = int(lengths.max(initial=0))
        # Token j of sample i comes from row starts[i] + j of its part and goes to output row dest.
        sample = np.repeat(np.arange(len(lengths)), lengths)
        within = np.arange(len(sample)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        src_rows = starts[sample] + within
        dest = sample * width + within if padded else np.arange(len(sample))
        lead = (len(lengths), width) if padded else (len(sample),)

        text_field = self.fields["text"]
        tokens = self._check_out(out, lead + text_field.inner_shape, text_field.dtype, "text")
        scales = None
        if "text_scale" in self.fields:
            scales = self._check_out(scale_out, lead, self.fields["text_scale"].dtype, "text_scale")
        targets = [("text", tokens)] + ([("text_scale", scales)] if scales is not None else [])
        pending = []
        firsts = np.arange(len(lengths)) * width if padded else np.cumsum(lengths) - lengths  # each sample's first row
        for name, target in targets:
            if padded:
                target[...] = 0
            flat = target.reshape((-1,) + target.shape[len(lead) :])
            others = []  # samples whose part has a layout direct reads do not know
            for i, (p, start, n, first) in enumerate(zip(part.tolist(), starts.tolist(), lengths.tolist(),
                                                         firsts.tolist(), strict=True)):
                rows = self._direct_rows(p, name) if n else None
                if rows is None:
                    others.append(i)
                    continue
                try:
                    rows.read_span(start, n, flat[first : first + n])
                except RowReadError as e:
                    raise damaged(self.manifest.parts[p], f"{name} cannot be read ({e})") from None
            if others:
                sel = np.isin(sample, others)
                pending += self._scatter(name, part[sample[sel]], src_rows[sel], dest[sel], flat)
        self._wait(pending)
        return tokens, scales, lengths

    # -- helpers ---------------------------------------------------------------------------------
    def _require_text(self) -> None:
        if not self.has_text:
            raise CacheError(f"{self.cache_dir}: cache has no text features (encoded without a text encoder)")

    def _per_sample_field(self, name: str) -> Field:
        f = self.fields.get(name)
        if f is None:
            raise KeyError(f"cache has no field {name!r}; it has {', '.join(self.fields)}")
        if not f.per_sample or name == "text_offsets":
            raise ValueError(f"{name} belongs to the caption tokens; read them with read_text or text_lengths")
        return f

    @staticmethod
    def _check_out(out: np.ndarray | None, shape: tuple[int, ...], dtype: str, name: str) -> np.ndarray:
        np_dtype = np.dtype(dtype)
        if out is None:
            return np.empty(shape, dtype=np_dtype)
        if out.shape != shape or out.dtype != np_dtype or not out.flags.c_contiguous:
            raise ValueError(f"out for {name}: got {out.dtype}{out.shape}, want a C-contiguous {np_dtype}{shape}")
        return out

    def _wait(self, pending: list[tuple[ts.WriteFutures, int, str]]) -> None:
        """Wait for every read; a failed one (missing chunk, crc32c mismatch) names its part and field."""
        error = None
        for future, part, name in pending:
            try:
                future.result()
            except ValueError as e:
                error = error or damaged(self.manifest.parts[part], f"{name} cannot be read ({e})")
        if error is not None:
            raise error

    def _direct_rows(self, part: int, name: str) -> ShardedRows | None:
        state = self._process()
        key = (part, name)
        if key not in state.rows and not self.direct_reads:
            self._check(part, name)
            state.rows[key] = None
        if key not in state.rows:
            self._check(part, name)
            root = self._array_path(part, name)
            try:
                meta = json.loads((root / "zarr.json").read_bytes())
            except (OSError, ValueError) as e:
                raise damaged(self.manifest.parts[part], f"{name}/zarr.json cannot be read ({e})") from None
            state.rows[key] = ShardedRows.from_metadata(local_path(root), meta) if self.direct_reads else None
        return state.rows[key]

    def _read_rows(self, name: str, part: np.ndarray, row: np.ndarray, out: np.ndarray) -> list:
        """Rows ``row`` of parts ``part`` into ``out``: directly where the layout allows, the rest
        started through tensorstore (returned as pending reads)."""
        others = []
        for i, (p, r) in enumerate(zip(part.tolist(), row.tolist(), strict=True)):
            rows = self._direct_rows(p, name)
            if rows is None:
                others.append(i)
                continue
            try:
                rows.read(r, out[i])
            except RowReadError as e:
                raise damaged(self.manifest.parts[p], f"{name} cannot be read ({e})") from None
        if not others:
            return []
        sel = np.asarray(others, dtype=np.int64)
        return self._scatter(name, part[sel], row[sel], sel, out)

    def _scatter(
        self, name: str, part: np.ndarray, src: np.ndarray, dest: np.ndarray, out: np.ndarray
    ) -> list[tuple[ts.WriteFutures, int, str]]:
        """Start reading rows ``src`` (of parts ``part``) of a sharded array into ``out[dest]``.

        One orthogonal-index read per part, written through an array view of ``out``: tensorstore
        copies each chunk straight from its shard into place.
        """
        if len(src) == 0:
            return []
        target = ts.array(out, copy=False, write=True)
        futures = []
        for p in np.unique(part):
            sel = np.flatnonzero(part == p)
            futures.append((target.oindex[dest[sel]].write(self._store(int(p), name).oindex[src[sel]]), int(p), name))
        return futures
