"""Reading a cache with zarr-python: the reference reader.

Opens the cache read-only; any number of processes may read one cache at once. Reads are by
contiguous slices (whole chunks), never by fancy indexing over many small chunks, which zarr-python
serves ~10x slower. The training hot path uses ``fast_reader`` (tensorstore) on the same files.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import cast

import numpy as np
import zarr

from cache_schema.errors import CacheError
from cache_schema.format.codec import dequantize_int8_numpy
from cache_schema.format.integrity import check_part_files, damaged
from cache_schema.format.layout import PART_SUFFIX, PARTS_DIR
from cache_schema.format.manifest import Manifest, read_manifest
from cache_schema.storage.object_store import cache_root, is_s3

SMALL_FIELDS = ("key", "source_index", "caption", "label")


class CacheReader:
    """A committed cache, seen through its manifest. Global sample ids run over parts in manifest order."""

    def __init__(self, cache_dir: str | Path, unreadable: dict[str, str] | None = None):
        """``unreadable``: see ``read_records`` (given, parts whose record cannot be read are left out)."""
        if is_s3(cache_dir):  # zarr-python opens local groups only
            raise CacheError(f"{cache_root(cache_dir)}: this command reads the cache's arrays from a local disk; "
                             "copy the cache there (e.g. `aws s3 sync`) and pass that directory")
        self.cache_dir = Path(cache_dir)
        self.manifest: Manifest = read_manifest(self.cache_dir, unreadable)
        self.parts: list[dict] = list(self.manifest.parts)
        self.offsets = np.cumsum([0] + [p["num_samples"] for p in self.parts]).tolist()
        self._index = {p["name"]: i for i, p in enumerate(self.parts)}
        self._groups: dict[str, zarr.Group] = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def fields(self) -> dict:
        return self.manifest.fields

    def part_path(self, name: str) -> Path:
        return self.cache_dir / PARTS_DIR / f"{name}{PART_SUFFIX}"

    def record(self, name: str) -> dict:
        return self.parts[self._index[name]]

    def group(self, name: str) -> zarr.Group:
        """A part's zarr group, once its files were checked against its record (missing chunk files
        would otherwise read as zeros)."""
        if name not in self._groups:
            rec = self.record(name)
            check_part_files(self.cache_dir, rec)
            try:
                self._groups[name] = zarr.open_group(str(self.part_path(name)), mode="r")
            except Exception as e:  # zarr's own errors for a damaged group
                raise damaged(rec, f"cannot be opened ({type(e).__name__}: {e})") from None
        return self._groups[name]

    def locate(self, index: int) -> tuple[int, int]:
        """(part number, row within the part) of a global sample id."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for a cache of {len(self)} samples")
        p = bisect.bisect_right(self.offsets, index) - 1
        return p, index - self.offsets[p]

    def array(self, part: str, field: str) -> zarr.Array:
        return cast(zarr.Array, self.group(part)[field])  # a part's fields are arrays, never groups

    def read(self, part: str, field: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of one field of one part, as stored (int8 stays int8)."""
        arr = self.array(part, field)
        try:
            return np.asarray(arr[start:stop])
        except ValueError as e:  # a chunk whose crc32c does not match, or undecodable bytes
            raise damaged(self.record(part), f"{field} rows {start}:{stop} cannot be read ({e})") from None

    def small_fields(self, part: str) -> dict[str, np.ndarray]:
        """The per-sample metadata arrays of a part (keys, captions, labels, source indices)."""
        return {name: self.read(part, name) for name in SMALL_FIELDS}

    @cached_property
    def keys(self) -> np.ndarray:
        """Every sample key in global-id order (one read per part)."""
        if not self.parts:
            return np.array([], dtype=str)
        return np.concatenate([self.read(p["name"], "key") for p in self.parts])

    def text_tokens(self, part: str, row: int) -> np.ndarray | None:
        if self.manifest.text is None:
            return None
        a, b = self.read(part, "text_offsets", row, row + 2)
        tokens = self.read(part, "text", a, b)
        if self.manifest.codec == "int8":
            tokens = dequantize_int8_numpy(tokens, self.read(part, "text_scale", a, b))
        return tokens

    def sample(self, index: int) -> dict:
        """One sample with features decoded to float16 (reference path; slow, for checks and tools)."""
        p, row = self.locate(index)
        name = self.parts[p]["name"]
        out = {field: self.read(name, field, row, row + 1)[0] for field in SMALL_FIELDS}
        out["key"], out["caption"] = str(out["key"]), str(out["caption"])
        out["source"] = self.parts[p]["source"]
        out["moments"] = self.read(name, "moments", row, row + 1)[0]
        dino = self.read(name, "dino", row, row + 1)[0]
        if self.manifest.codec == "int8":
            dino = dequantize_int8_numpy(dino, self.read(name, "dino_scale", row, row + 1)[0])
        out["dino"] = dino
        out["text"] = self.text_tokens(name, row)
        return out

    def iter_chunks(self, part: str, field: str, rows: int) -> Iterator[np.ndarray]:
        """Whole-chunk sequential reads of one field, ``rows`` at a time."""
        n = self.array(part, field).shape[0]
        for start in range(0, n, rows):
            yield self.read(part, field, start, start + rows)
