"""Reading single rows of a sharded per-sample array straight from its zarr v3 shard files.

A random training batch over a CC12M-sized cache (2 176 parts) touches a different part for nearly
every sample, so tensorstore gets one small read request per sample and field, and spends several
times more CPU per sample that way than copying and checksumming its bytes costs (BENCHMARKS.md,
"Design measurements"). For arrays whose metadata is exactly the layout
this package writes (one sample per inner chunk, inner codecs ``bytes`` + ``crc32c``, shard index
``bytes`` + ``crc32c`` at the end of the shard, as the zarr v3 sharding codec defines it) a row is
therefore read with one ``preadv`` into its destination and its crc32c checked; any other layout
is served by tensorstore. Files are opened per read, as tensorstore does, so a file replaced or
deleted under a running reader is noticed, never served from a stale handle.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

_MISSING = 2**64 - 1  # offset and length of a chunk the shard does not hold
_CRC = 4
_LE_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}
_CRC32C = {"name": "crc32c"}


class RowReadError(Exception):
    """A row could not be read as recorded: the message says which file and why."""


@dataclass(frozen=True)
class ShardedRows:
    """Geometry of one sharded array whose inner chunks are runs of ``chunk_rows`` whole rows: one
    sample (per-sample features) or a few caption tokens (see module doc)."""

    root: Path
    shape: tuple[int, ...]
    shard_rows: int
    chunk_rows: int
    dtype: np.dtype

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    @classmethod
    def from_metadata(cls, root: Path, meta: dict) -> ShardedRows | None:
        """The geometry when ``meta`` (the array's zarr.json) is exactly the supported layout, else None."""
        try:
            shape = tuple(meta["shape"])
            shard = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
            (codec,) = meta["codecs"]
            conf = codec["configuration"]
            inner = tuple(conf["chunk_shape"])
            dtype = np.dtype(meta["data_type"])
        except (KeyError, TypeError, ValueError):
            return None
        supported = (
            meta.get("zarr_format") == 3
            and meta["chunk_grid"].get("name") == "regular"
            and meta.get("chunk_key_encoding", {}).get("name") == "default"
            and meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/") == "/"
            and codec.get("name") == "sharding_indexed"
            and conf.get("index_location", "end") == "end"
            and [_normal(c, dtype) for c in conf.get("codecs", [])] == [_LE_BYTES, _CRC32C]
            and [_normal(c, np.dtype("<u8")) for c in conf.get("index_codecs", [])] == [_LE_BYTES, _CRC32C]
            and len(shape) >= 1 and len(shard) == len(inner) == len(shape)
            and inner[0] >= 1 and shard[0] % inner[0] == 0 and inner[1:] == shard[1:] == shape[1:]
            and dtype.kind in "fiu" and (dtype.itemsize == 1 or sys.byteorder == "little")
        )
        return cls(root, shape, shard[0], inner[0], dtype.newbyteorder("=")) if supported else None

    def read(self, row: int, dest: np.ndarray) -> None:
        """Row ``row`` into ``dest`` (C-contiguous, this array's row shape and dtype), crc32c checked."""
        self.read_span(row, 1, dest.reshape((1,) + dest.shape))

    def read_span(self, start: int, count: int, dest: np.ndarray) -> None:
        """Rows ``start .. start + count`` into ``dest`` (C-contiguous, ``(count,) + row shape``)."""
        if start < 0 or start + count > self.shape[0]:
            raise RowReadError(f"{self.root.name}: rows {start}..{start + count} outside its {self.shape[0]} rows")
        shard_file, row, end = None, start, start + count
        try:
            while row < end:
                chunk, within = divmod(row, self.chunk_rows)
                shard, slot = divmod(chunk, self.shard_rows // self.chunk_rows)
                if shard_file is None or shard_file.number != shard:
                    if shard_file is not None:
                        shard_file.close()
                    shard_file = _ShardFile(self, shard)
                take = min(self.chunk_rows - within, end - row)
                out = dest[row - start : row - start + take]
                if take == self.chunk_rows:  # the whole chunk: straight into place
                    shard_file.read_chunk(slot, out)
                else:
                    whole = np.empty((self.chunk_rows,) + self.shape[1:], self.dtype)
                    shard_file.read_chunk(slot, whole)
                    out[...] = whole[within : within + take]
                row += take
        finally:
            if shard_file is not None:
                shard_file.close()


class _ShardFile:
    """One open shard file and its checked index, for the reads of one request."""

    def __init__(self, rows: ShardedRows, number: int):
        self.rows, self.number = rows, number
        self.path = rows.root / "c" / str(number) / "/".join("0" * (len(rows.shape) - 1))
        self.name = str(self.path.relative_to(rows.root.parent))
        chunks = rows.shard_rows // rows.chunk_rows
        index_bytes = chunks * 16 + _CRC
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise RowReadError(f"{self.name} is missing") from None
        try:
            self.size = os.fstat(self.fd).st_size - index_bytes
            if self.size < 0:
                raise RowReadError(f"{self.name} has {self.size + index_bytes} bytes, less than its shard index")
            index = os.pread(self.fd, index_bytes, self.size)
            _check_crc(index[:-_CRC], index[-_CRC:], f"{self.name}: shard index")
            self.index = np.frombuffer(index, "<u8", 2 * chunks).reshape(chunks, 2)
        except BaseException:
            os.close(self.fd)
            raise

    def read_chunk(self, slot: int, dest: np.ndarray) -> None:
        offset, nbytes = (int(v) for v in self.index[slot])
        want = self.rows.chunk_rows * self.rows.row_bytes + _CRC
        if offset == _MISSING or nbytes != want or offset + nbytes > self.size:
            raise RowReadError(f"{self.name}: chunk {slot} is missing or has the wrong size in its shard")
        data = dest.reshape(-1).view(np.uint8)  # google_crc32c takes arrays, not writable memoryviews
        crc = bytearray(_CRC)
        if os.preadv(self.fd, [data, crc], offset) != nbytes:  # type: ignore[list-item]  # ndarray is a buffer
            raise RowReadError(f"{self.name}: chunk {slot} ends early")
        _check_crc(data, crc, f"{self.name}: chunk {slot}")

    def close(self) -> None:
        os.close(self.fd)


def _normal(codec: dict, dtype: np.dtype) -> dict:
    """A codec entry without the optional empty configuration zarr may write; ``bytes`` without an
    endianness (single-byte types) counts as little-endian."""
    codec = {k: v for k, v in codec.items() if not (k == "configuration" and not v)}
    if codec == {"name": "bytes"} and dtype.itemsize == 1:
        return _LE_BYTES
    return codec


def _check_crc(data, stored, what: str) -> None:
    if google_crc32c.value(data) != int.from_bytes(stored, "little"):
        raise RowReadError(f"{what} fails its crc32c (damaged bytes)")
