"""Checking a cache: the check to run after copying a cache, after a crash, or before a long training.

For every committed part: its files are the ones its record lists, with the recorded sizes
(missing, zero-length and truncated files); every chunk of every array decodes and matches its
crc32c (garbage, bit rot); each array has the recorded number of rows; every stored feature value is
finite; ragged text offsets are consistent; and keys are unique across the cache. Directories in
``parts/`` that no record lists are reported too. ``quick`` stops after the file and size checks.
The committed parts of added targets get the same checks, and must hold their cache part's keys in
its order; they are reported as ``targets/<target>/<part>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .errors import CacheError
from .integrity import REPAIR_HINT, check_part_files, part_where, target_hint
from .layout import PART_SUFFIX, PARTS_DIR, TARGETS_DIR
from .manifest import read_records, target_dir, target_part_problem
from .reader import CacheReader


def _check_part(reader: CacheReader, part: dict, rows: int, quick: bool) -> None:
    name, n = part["name"], part["num_samples"]
    check_part_files(reader.cache_dir, part)
    if quick:
        return
    g = reader.group(name)
    for field, spec in reader.fields.items():
        if field not in g:
            raise CacheError(f"{part_where(part)}: array {field} missing; {REPAIR_HINT.format(name=name)}")
        want = n + 1 if field == "text_offsets" else (n if spec["per_sample"] else part["num_text_tokens"])
        have = g[field].shape[0]
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
            arr = g[field]
            if arr.shape[0] != rec["num_samples"]:
                raise CacheError(f"{where}: {field} has {arr.shape[0]} rows, the record says {rec['num_samples']}{fix}")
            for start in range(0, arr.shape[0], rows):
                block = arr[start : start + rows]
                if spec["dtype"] in ("float16", "float32") and not np.isfinite(block).all():
                    raise CacheError(f"{where}: {field} holds non-finite values{fix}")
        if g["key"][:].tolist() != reader.read(rec["name"], "key").tolist():
            raise CacheError(f"{where}: its keys are not the cache part's keys in order{fix}")
    except (KeyError, ValueError) as e:  # a missing array, a crc32c mismatch
        raise CacheError(f"{where}: cannot be read ({type(e).__name__}: {e}){fix}") from None


def find_problems(cache_dir: str | Path, names: list[str] | None = None, quick: bool = False,
                  progress: Callable[[str, str | None], None] | None = None, rows: int = 1024) -> dict[str, str]:
    """Check the committed parts (or those in ``names``); returns part name -> what is wrong with it.
    ``progress(name, problem or None)`` is called after each part."""
    reader = CacheReader(cache_dir)
    problems: dict[str, str] = {}
    seen: dict[str, str] = {}
    for part in reader.parts:
        name = part["name"]
        if names is not None and name not in names:
            continue
        try:
            _check_part(reader, part, rows, quick)
            if not quick:
                for key in reader.read(name, "key"):
                    key = str(key)
                    if key in seen:
                        raise CacheError(f"{part_where(part)}: key {key!r} also stored in part {seen[key]}; "
                                         "the cache holds a sample twice")
                    seen[key] = name
        except CacheError as e:
            problems[name] = str(e)
        if progress:
            progress(name, problems.get(name))
    for target in sorted(reader.manifest.targets):
        records = {r["name"]: r for r in read_records(target_dir(cache_dir, target))}
        for part in reader.parts:
            rec = records.get(part["name"])
            if (names is not None and part["name"] not in names) or target_part_problem(part, rec) is not None:
                continue  # not added yet, or made for an earlier encode of the part: never read
            try:
                _check_target_part(reader, target, rec, rows, quick)
            except CacheError as e:
                problems[f"{TARGETS_DIR}/{target}/{part['name']}"] = str(e)
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
