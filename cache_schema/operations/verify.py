"""Checking a cache: the check to run after copying a cache, after a crash, or before a long training.

For every committed part: its files are the ones its record lists, with the recorded sizes
(missing, zero-length and truncated files); every chunk of every array decodes and matches its
crc32c (garbage, bit rot); each array has the recorded number of rows; every stored feature value is
finite; ragged text offsets are consistent; and keys are unique across the cache. Directories in
``parts/`` that no record lists are reported too. ``quick`` checks the files and sizes, and reads only the
small per-sample arrays (crc32c and row counts), not the feature shards.
Parts are checked in parallel worker processes; key uniqueness is checked on 64-bit hashes of the
keys (a CC12M cache has 12 M), confirmed on the keys themselves where two hashes meet. The committed
parts of added targets get the same checks, and must hold their cache part's keys in its order; they
are reported as ``targets/<target>/<part>``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import cast

import numpy as np

from cache_schema.errors import CacheError
from cache_schema.format.integrity import REPAIR_HINT, check_part_files, part_where, target_hint
from cache_schema.format.layout import PART_SUFFIX, PARTS_DIR, TARGETS_DIR
from cache_schema.format.manifest import read_records, target_dir, target_part_problem
from cache_schema.reading.plain_arrays import PlainReadError, read_plain
from cache_schema.reading.reader import CacheReader


def _check_part(reader: CacheReader, part: dict, rows: int, quick: bool) -> None:
    name, n = part["name"], part["num_samples"]
    check_part_files(reader.cache_dir, part)
    if quick:
        _check_small_arrays(reader, part)
        return
    g = reader.group(name)
    for field, spec in reader.fields.items():
        if field not in g:
            raise CacheError(f"{part_where(part)}: array {field} missing; {REPAIR_HINT.format(name=name)}")
        want = n + 1 if field == "text_offsets" else (n if spec["per_sample"] else part["num_text_tokens"])
        have = reader.array(name, field).shape[0]
        if have != want:
            raise CacheError(f"{part_where(part)}: {field} has {have} rows, the record says {want}; "
                             + REPAIR_HINT.format(name=name))
        for block in reader.iter_chunks(name, field, rows):  # decodes every chunk: crc32c checked
            if spec["dtype"] in ("float16", "float32") and not np.isfinite(block).all():
                raise CacheError(f"{part_where(part)}: {field} holds non-finite values; "
                                 + REPAIR_HINT.format(name=name))
    if "text_offsets" in g:
        offs = reader.read(name, "text_offsets")
        if offs[0] != 0 or (np.diff(offs) < 0).any() or offs[-1] != part["num_text_tokens"]:
            raise CacheError(f"{part_where(part)}: text_offsets are inconsistent; {REPAIR_HINT.format(name=name)}")


def _check_small_arrays(reader: CacheReader, part: dict) -> None:
    """The quick check's reading: every small per-sample array (keys, labels, offsets: a few bytes per
    sample) against its crc32c and the record's row count; the big feature shards are left to the full check."""
    root = Path(reader.cache_dir) / PARTS_DIR / f"{part['name']}{PART_SUFFIX}"
    for field, spec in reader.fields.items():
        if spec.get("sharded", True):
            continue
        want = part["num_samples"] + (1 if field == "text_offsets" else 0)
        try:
            values = read_plain(root / field, json.loads((root / field / "zarr.json").read_bytes()))
        except (OSError, ValueError, PlainReadError) as e:
            raise CacheError(f"{part_where(part)}: {field} cannot be read ({e}); "
                             + REPAIR_HINT.format(name=part["name"])) from None
        if values is not None and len(values) != want:
            raise CacheError(f"{part_where(part)}: {field} has {len(values)} rows, the record says {want}; "
                             + REPAIR_HINT.format(name=part["name"]))


def _check_target_part(reader: CacheReader, target: str, rec: dict, rows: int, quick: bool) -> None:
    import zarr

    root = target_dir(reader.cache_dir, target)
    where = f"target {target} of part {rec['name']}"
    fix = "; " + target_hint(target).format(name=rec["name"])
    check_part_files(root, rec, hint=target_hint(target))
    if quick:
        return
    try:
        g = zarr.open_group(str(root / PARTS_DIR / f"{rec['name']}{PART_SUFFIX}"), mode="r")
        for field, spec in reader.manifest.targets[target]["fields"].items():
            arr = cast(zarr.Array, g[field])  # a part's fields are arrays, never groups
            if arr.shape[0] != rec["num_samples"]:
                raise CacheError(f"{where}: {field} has {arr.shape[0]} rows, the record says {rec['num_samples']}{fix}")
            for start in range(0, arr.shape[0], rows):
                block = arr[start : start + rows]
                if spec["dtype"] in ("float16", "float32") and not np.isfinite(block).all():
                    raise CacheError(f"{where}: {field} holds non-finite values{fix}")
        if np.asarray(cast(zarr.Array, g["key"])[:]).tolist() != reader.read(rec["name"], "key").tolist():
            raise CacheError(f"{where}: its keys are not the cache part's keys in order{fix}")
    except (KeyError, ValueError) as e:  # a missing array, a crc32c mismatch
        raise CacheError(f"{where}: cannot be read ({type(e).__name__}: {e}){fix}") from None


_worker_reader: CacheReader | None = None  # one per verify worker process


def _start_worker(cache_dir: str, lenient: bool) -> None:
    global _worker_reader
    _worker_reader = CacheReader(cache_dir, {} if lenient else None)


def _verify_part(index: int, rows: int, quick: bool) -> tuple[str, str | None, np.ndarray | None]:
    """(part name, problem or None, sorted 64-bit hashes of its keys) for the part at ``index``."""
    reader = _worker_reader
    assert reader is not None, "set by _start_worker, the pool's initializer"
    part = reader.parts[index]
    try:
        _check_part(reader, part, rows, quick)
        if quick:
            return part["name"], None, None
        keys = reader.read(part["name"], "key")
        digests = b"".join(hashlib.blake2b(str(k).encode(), digest_size=8).digest() for k in keys)
        return part["name"], None, np.sort(np.frombuffer(digests, "<u8"))
    except CacheError as e:
        return part["name"], str(e), None


def _duplicate_keys(reader: CacheReader, hashes: dict[str, np.ndarray]) -> dict[str, str]:
    """Parts holding a key another part (or the same part) holds too, found by hash then confirmed on the keys."""
    names = [part["name"] for part in reader.parts if part["name"] in hashes]  # cache order, however they came in
    if not names:
        return {}
    flat = np.concatenate([hashes[n] for n in names])
    owner = np.repeat(np.arange(len(names)), [len(hashes[n]) for n in names])
    order = np.argsort(flat, kind="stable")
    same = flat[order][1:] == flat[order][:-1]
    hits = np.flatnonzero(same)
    suspects = [names[i] for i in sorted(set(owner[order][hits]) | set(owner[order][hits + 1]))]  # cache order
    problems: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in suspects:  # hash collisions without equal keys are possible, if unlikely: compare the keys
        part = reader.record(name)
        for key in reader.read(name, "key"):
            key = str(key)
            if key in seen and name not in problems:
                also = "stored twice in the part" if seen[key] == name else f"also stored in part {seen[key]}"
                problems[name] = (f"{part_where(part)}: key {key!r} {also}; the cache "
                                  f"holds a sample twice: rerun the encode command with --redo {name}, which "
                                  "encodes the part again without the keys the other parts hold")
            seen.setdefault(key, name)
    return problems


def find_problems(cache_dir: str | Path, names: list[str] | None = None, quick: bool = False,
                  progress: Callable[[str, str | None], None] | None = None, rows: int = 1024,
                  workers: int | None = None, unreadable: dict[str, str] | None = None) -> dict[str, str]:
    """Check the committed parts (or those in ``names``) on ``workers`` processes (default: the CPUs
    this process may use); returns part name -> what is wrong with it. ``progress(name, problem or
    None)`` is called as each part's check ends. Given ``unreadable`` (see ``read_records``), parts
    whose record cannot be read are left to the caller, which encodes them again."""
    reader = CacheReader(cache_dir, unreadable)
    todo = [i for i, part in enumerate(reader.parts) if names is None or part["name"] in names]
    if workers is None:  # a worker costs ~1-2 s to start: worth it from a few dozen parts on
        workers = min(len(os.sched_getaffinity(0)), len(todo) // 16)
    workers = max(1, min(workers, len(todo) or 1))
    problems: dict[str, str] = {}
    hashes: dict[str, np.ndarray] = {}

    def record(name: str, problem: str | None, keys: np.ndarray | None) -> None:
        if problem:
            problems[name] = problem
        elif keys is not None:
            hashes[name] = keys

    if workers == 1:
        global _worker_reader
        _worker_reader = reader
        for i in todo:
            name, problem, keys = _verify_part(i, rows, quick)
            record(name, problem, keys)
            if progress:
                progress(name, problem)
    else:
        # spawn: a forked child of a process that used tensorstore aborts, and verify may run in one
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker,
                                 initargs=(str(cache_dir), unreadable is not None)) as pool:
            futures = [pool.submit(_verify_part, i, rows, quick) for i in todo]
            for future in as_completed(futures):
                name, problem, keys = future.result()
                record(name, problem, keys)
                if progress:
                    progress(name, problem)
        problems = {part["name"]: problems[part["name"]] for part in reader.parts if part["name"] in problems}
    for name, problem in _duplicate_keys(reader, hashes).items():
        problems.setdefault(name, problem)
        if progress:
            progress(name, problem)
    for target in sorted(reader.manifest.targets):
        records = {r["name"]: r for r in read_records(target_dir(cache_dir, target), fix=target_hint(target))}
        for part in reader.parts:
            rec = records.get(part["name"])
            if ((names is not None and part["name"] not in names) or rec is None
                    or target_part_problem(part, rec) is not None):
                continue  # not added yet, or made for an earlier encode of the part: never read
            where = f"{TARGETS_DIR}/{target}/{part['name']}"
            try:
                _check_target_part(reader, target, rec, rows, quick)
            except CacheError as e:
                problems[where] = str(e)
            if progress:
                progress(where, problems.get(where))
    if names is None:
        on_disk = {p.name[: -len(PART_SUFFIX)] for p in (Path(cache_dir) / PARTS_DIR).glob(f"[!.]*{PART_SUFFIX}")}
        for name in sorted(on_disk - set(reader.manifest.part_names())):
            problems[name] = (f"part {name} is on disk but has no record (a commit cut short); rerun the encode "
                              "command: it restores or redoes the part")
    return problems


def verify_cache(cache_dir: str | Path, progress: Callable[[str, str | None], None] | None = None,
                 rows: int = 1024, quick: bool = False) -> int:
    """Check every part; raise CacheError naming the first bad part (and how many others), else return
    the number of samples."""
    problems = find_problems(cache_dir, quick=quick, progress=progress, rows=rows)
    if problems:
        first = next(iter(problems.values()))
        more = f" (and {len(problems) - 1} more bad part(s))" if len(problems) > 1 else ""
        raise CacheError(first + more)
    return CacheReader(cache_dir).manifest.num_samples
