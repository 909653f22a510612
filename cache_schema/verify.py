"""Full re-read of a cache: the check to run after copying a cache or after a crash."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .errors import CacheError
from .layout import PART_SUFFIX, PARTS_DIR
from .reader import CacheReader


def verify_cache(cache_dir: str | Path, progress: Callable[[str], None] | None = None, rows: int = 1024) -> int:
    """Re-read every committed part; raise CacheError naming the first bad part, else return the sample count.

    Checks: each array's row count matches the manifest, every stored feature value is finite,
    ragged text offsets are consistent, and keys are unique across the whole cache.
    """
    reader = CacheReader(cache_dir)
    seen: dict[str, str] = {}
    for part in reader.parts:
        name, n = part["name"], part["num_samples"]
        where = f"part {name} (from {part['source']})"
        g = reader.group(name)
        for field, spec in reader.fields.items():
            if field not in g:
                raise CacheError(f"{where}: field {field!r} missing; re-encode this part (delete it and rerun encode)")
            want = n + 1 if field == "text_offsets" else (n if spec["per_sample"] else part["num_text_tokens"])
            have = g[field].shape[0]
            if have != want:
                raise CacheError(f"{where}: {field} has {have} rows, manifest says {want}; delete the part and rerun encode")
            if spec["dtype"] in ("float16", "float32"):
                for block in reader.iter_chunks(name, field, rows):
                    if not np.isfinite(block).all():
                        raise CacheError(f"{where}: {field} holds non-finite values; delete the part and rerun encode")
        if "text_offsets" in g:
            offs = g["text_offsets"][:]
            if offs[0] != 0 or (np.diff(offs) < 0).any() or offs[-1] != part["num_text_tokens"]:
                raise CacheError(f"{where}: text_offsets are inconsistent; delete the part and rerun encode")
        for key in g["key"][:]:
            key = str(key)
            if key in seen:
                raise CacheError(f"{where}: key {key!r} also stored in part {seen[key]}; the cache holds a sample twice")
            seen[key] = name
        if progress:
            progress(name)
    on_disk = {p.name[: -len(PART_SUFFIX)] for p in (Path(cache_dir) / PARTS_DIR).glob(f"[!.]*{PART_SUFFIX}")}
    unlisted = sorted(on_disk - set(reader.manifest.part_names()))
    if unlisted:
        raise CacheError(f"part {unlisted[0]} is committed on disk but not in the manifest; rerun the same encode command to record it")
    return len(reader)
