"""Reading a cache with zarr-python: the reference reader.

Opens the cache read-only; any number of processes may read one cache at once. Reads are by
contiguous slices (whole chunks), never by fancy indexing over many small chunks, which zarr-python
serves ~10x slower. The training hot path uses ``fast_reader`` (tensorstore) on the same files.
"""

from __future__ import annotations

import bisect
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr

from .codec import dequantize_int8_numpy
from .errors import CacheError
from .layout import PART_SUFFIX, PARTS_DIR
from .manifest import Manifest, read_manifest

SMALL_FIELDS = ("key", "source_index", "caption", "label")


class CacheReader:
    """A committed cache, seen through its manifest. Global sample ids run over parts in manifest order."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        self.manifest: Manifest = read_manifest(self.cache_dir)
        self.parts: list[dict] = list(self.manifest.parts)
        self.offsets = np.cumsum([0] + [p["num_samples"] for p in self.parts]).tolist()
        self._groups: dict[str, zarr.Group] = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def fields(self) -> dict:
        return self.manifest.fields

    def part_path(self, name: str) -> Path:
        return self.cache_dir / PARTS_DIR / f"{name}{PART_SUFFIX}"

    def group(self, name: str) -> zarr.Group:
        if name not in self._groups:
            path = self.part_path(name)
            try:
                self._groups[name] = zarr.open_group(str(path), mode="r")
            except Exception as e:  # FileNotFoundError, or zarr's own errors for a damaged group
                raise CacheError(f"{path}: part listed in the manifest cannot be opened ({e}); run `repa cache verify`") from e
        return self._groups[name]

    def locate(self, index: int) -> tuple[int, int]:
        """(part number, row within the part) of a global sample id."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for a cache of {len(self)} samples")
        p = bisect.bisect_right(self.offsets, index) - 1
        return p, index - self.offsets[p]

    def read(self, part: str, field: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of one field of one part, as stored (int8 stays int8)."""
        return self.group(part)[field][start:stop]

    def small_fields(self, part: str) -> dict[str, np.ndarray]:
        """The per-sample metadata arrays of a part (keys, captions, labels, source indices)."""
        g = self.group(part)
        return {name: g[name][:] for name in SMALL_FIELDS}

    @cached_property
    def keys(self) -> np.ndarray:
        """Every sample key in global-id order (one read per part)."""
        if not self.parts:
            return np.array([], dtype=str)
        return np.concatenate([self.group(p["name"])["key"][:] for p in self.parts])

    def text_tokens(self, part: str, row: int) -> np.ndarray | None:
        if self.manifest.text is None:
            return None
        g = self.group(part)
        a, b = g["text_offsets"][row : row + 2]
        tokens = g["text"][a:b]
        if "text_scale" in g:
            tokens = dequantize_int8_numpy(tokens, g["text_scale"][a:b])
        return tokens

    def sample(self, index: int) -> dict:
        """One sample with features decoded to float16 (reference path; slow, for checks and tools)."""
        p, row = self.locate(index)
        part = self.parts[p]
        g = self.group(part["name"])
        out = {name: g[name][row] for name in SMALL_FIELDS}
        out["key"], out["caption"] = str(out["key"]), str(out["caption"])
        out["source"] = part["source"]
        out["moments"] = g["moments"][row]
        dino = g["dino"][row]
        out["dino"] = dequantize_int8_numpy(dino, g["dino_scale"][row]) if "dino_scale" in g else dino
        out["text"] = self.text_tokens(part["name"], row)
        return out

    def iter_chunks(self, part: str, field: str, rows: int) -> Iterator[np.ndarray]:
        """Whole-chunk sequential reads of one field, ``rows`` at a time."""
        arr = self.group(part)[field]
        for start in range(0, arr.shape[0], rows):
            yield arr[start : start + rows]
