"""Reading a whole small (non-sharded) array of a part, chunk files decoded here.

At CC12M scale the training process reads the keys of 2 176 parts at start; zarr-python spends most
of its time per array opening it, not decoding it (numcodecs' vlen-utf8, the codec zarr itself uses;
BENCHMARKS.md, "Design measurements"). For arrays whose metadata is exactly the layout
this package writes (one dimension, codecs ``vlen-utf8`` or little-endian ``bytes``, then ``crc32c``)
each chunk file is read, its crc32c checked and its bytes decoded here; any other layout is left to
the caller's general path (``None``). Like zarr-python, a chunk file that is not there reads as the
fill value: readers check a part's files against its record before relying on this.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import google_crc32c
import numpy as np
from numcodecs.vlen import VLenBytes, VLenUTF8

from cache_schema.storage.object_store import S3Path

_CRC = 4


class PlainReadError(Exception):
    """A chunk could not be decoded as recorded: the message names the file and why."""


def read_plain(root: Path | S3Path, meta: dict, utf8: bool = False) -> np.ndarray | None:
    """All of the array at ``root`` (its parsed ``zarr.json`` is ``meta``), or None for other layouts.
    Strings come back as numpy's ``StringDType`` (16 bytes per short string, not a Python object each),
    or with ``utf8`` as an object array of their UTF-8 bytes (nothing decoded, for hashing)."""
    try:
        (length,) = meta["shape"]
        (chunk,) = meta["chunk_grid"]["configuration"]["chunk_shape"]
        first, crc = meta["codecs"]
    except (KeyError, TypeError, ValueError):
        return None
    separator = meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
    if (meta.get("zarr_format") != 3 or meta.get("chunk_key_encoding", {}).get("name") != "default"
            or separator != "/" or crc.get("name") != "crc32c" or crc.get("configuration")):
        return None
    decode: Callable[[bytes, int], np.ndarray]
    if first.get("name") == "vlen-utf8" and meta.get("data_type") == "string":
        decode, fill = (_utf8 if utf8 else _strings), meta.get("fill_value", "")
    elif first.get("name") == "bytes" and meta.get("data_type") in ("int64", "int32", "float32", "float64"):
        endian = (first.get("configuration") or {}).get("endian", "little")
        if endian != "little" or sys.byteorder != "little":
            return None
        dtype = np.dtype(meta["data_type"])
        decode, fill = partial(_numbers, dtype=dtype), meta.get("fill_value", 0)
    else:
        return None
    pieces = []
    for i, start in enumerate(range(0, length, chunk)):
        n = min(chunk, length - start)
        path, where = root / "c" / str(i), f"{root.name}/c/{i}"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            pieces.append(_filled(n, fill, decode, meta))
            continue
        data, stored = raw[:-_CRC], raw[-_CRC:]
        if len(raw) < _CRC or google_crc32c.value(data) != int.from_bytes(stored, "little"):
            raise PlainReadError(f"{where} fails its crc32c (damaged bytes)")
        try:
            pieces.append(decode(data, n))
        except (ValueError, RuntimeError) as e:
            raise PlainReadError(f"{where} cannot be decoded ({e})") from None
    if not pieces:
        return _filled(0, fill, decode, meta)
    return np.concatenate(pieces)


def _filled(n: int, fill, decode, meta: dict) -> np.ndarray:
    if decode is _utf8:
        out = np.empty(n, dtype=object)
        out[:] = [str(fill).encode()] * n
        return out
    return np.full(n, fill, dtype=np.dtypes.StringDType() if decode is _strings else np.dtype(meta["data_type"]))


def _numbers(data: bytes, n: int, dtype: np.dtype) -> np.ndarray:
    return np.frombuffer(data, dtype, n)


def _utf8(data: bytes, n: int) -> np.ndarray:
    values = VLenBytes().decode(data)  # the same encoding as vlen-utf8, left as bytes
    if len(values) < n:
        raise ValueError(f"{len(values)} strings for {n} rows")
    return values[:n]


def _strings(data: bytes, n: int) -> np.ndarray:
    values = VLenUTF8().decode(data)
    if len(values) < n:
        raise ValueError(f"{len(values)} strings for {n} rows")
    return np.array(values[:n], dtype=np.dtypes.StringDType())


def read_utf8(root: Path) -> np.ndarray:
    """The string array at ``root`` as an object array of UTF-8 bytes, whatever its layout."""
    import json

    values = read_plain(root, json.loads((root / "zarr.json").read_bytes()), utf8=True)
    if values is None:
        import zarr

        stored = np.asarray(zarr.open_array(str(root), mode="r")[:])
        values = np.array([str(v).encode() for v in stored] or [b""][:0], object)
    return values
