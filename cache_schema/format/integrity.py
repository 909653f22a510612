"""Checking that a part's files are the ones its record lists, before anything is read from them.

zarr-python reads a missing chunk file as the fill value (zeros) without a word, so a reader must
never trust a directory listing it did not check: every committed part's record lists each of its
files with its size, and these checks compare the disk against it. (tensorstore, the training
reader, is also told to fail on missing chunks; every chunk's crc32c catches changed bytes.)
"""

from __future__ import annotations

import os
from pathlib import Path

from cache_schema.errors import CacheError
from cache_schema.format.layout import PART_SUFFIX, PARTS_DIR, RECORDS_DIR, TARGETS_DIR
from cache_schema.storage.object_store import S3Path, cache_root

REPAIR_HINT = "rerun the encode command with --repair, or with --redo {name}"


def part_where(rec: dict) -> str:
    return f"part {rec['name']} (from {rec['source']})"


def damaged(rec: dict, what: str, hint: str = REPAIR_HINT) -> CacheError:
    return CacheError(f"{part_where(rec)}: {what}; {hint.format(name=rec['name'])}")


def check_part_files(cache_dir: Path | S3Path, rec: dict, arrays: list[str] | None = None,
                     hint: str = REPAIR_HINT) -> None:
    """Raise CacheError naming the first listed file (of ``arrays``, default all) that is missing or has
    another size than recorded; ``hint`` says how to fix it ({name}: the part)."""
    root = cache_root(cache_dir) / PARTS_DIR / f"{rec['name']}{PART_SUFFIX}"
    listed = None  # on object storage one listing gives every size (records use the local separator)
    if isinstance(root, S3Path):
        listed = {rel.replace("/", os.sep): n for rel, n in root.list_sizes().items()}
        if not listed:
            raise damaged(rec, f"no objects under {root}", hint)
    elif not root.is_dir():
        raise damaged(rec, f"directory {root} is missing", hint)
    wanted = set(arrays) if arrays is not None else None
    for rel, size in sorted(rec["files"].items()):
        if wanted is not None and rel.split(os.sep, 1)[0] not in wanted:
            continue
        try:
            actual = os.stat(root / rel).st_size if listed is None else listed[rel]
        except (FileNotFoundError, KeyError):
            raise damaged(rec, f"file {rel} is missing", hint) from None
        if actual != size:
            raise damaged(rec, f"file {rel} has {actual} bytes, the record says {size} (truncated or replaced)", hint)


def target_hint(target: str) -> str:
    """How to redo a damaged part of added target ``target`` ({name}: the part)."""
    return (f"delete {TARGETS_DIR}/{target}/{RECORDS_DIR}/{{name}}.json in the cache and rerun "
            f"`repa encode --add-target {target}` with the same --target-model")
