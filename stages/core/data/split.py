"""The validation split of a cache: which samples are held out, decided by a hash of each key.

The choice depends on the key alone, so it survives re-encoding, adding parts and reordering them,
and train, evaluate and report all see the same split. For a whole cache (``split_cache``) the keys
are read and hashed part by part in worker processes and never held as strings: at CC12M scale (12 M
keys) that is the difference between ~1 minute and a few seconds of start-up per training process.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from cache_schema import FastReader
from cache_schema.format.integrity import damaged
from cache_schema.reading.fast_reader import READ_THREADS
from cache_schema.reading.plain_arrays import PlainReadError, read_utf8

PARTS_PER_WORKER = 64  # a worker costs ~1-2 s to start; below this many parts one process does it


def split_ids(keys, val_fraction: float, salt: str = "val") -> tuple[np.ndarray, np.ndarray]:
    """(train ids, val ids), sorted, for a cache whose sample ``i`` has key ``keys[i]``.

    A sample is held out when blake2b(salt + key), read as a number in [0, 1), is below
    ``val_fraction``. With ``val_fraction > 0`` and at least two samples neither side is empty.
    """
    _check_fraction(val_fraction)
    return _split(unit_hashes(keys, salt), val_fraction)


def split_cache(reader: FastReader, val_fraction: float, salt: str = "val",
                workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``split_ids`` of every key of the parts ``reader`` reads, hashed in up to ``workers`` processes
    (default: the cores this process may use, one per ``PARTS_PER_WORKER`` parts)."""
    _check_fraction(val_fraction)
    paths = list(zip(reader.array_paths("key"), ({"name": p["name"], "source": p["source"]}
                                                  for p in reader.manifest.parts), strict=True))
    if workers is None:
        workers = min(len(os.sched_getaffinity(0)), len(paths) // PARTS_PER_WORKER)
    if workers <= 1:
        groups, hashed = [paths], [_hash_parts(paths, salt)]
    else:
        groups = [paths[i::workers] for i in range(workers)]
        # spawn: the training process has used tensorstore, whose forked children abort
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            hashed = list(pool.map(_hash_parts, groups, [salt] * len(groups)))
    by_path = {path: u for group, us in zip(groups, hashed, strict=True)
               for (path, _), u in zip(group, us, strict=True)}
    u = np.concatenate([by_path[path] for path, _ in paths] + [np.zeros(0)])
    return _split(u, val_fraction)


def unit_hashes(keys, salt: str) -> np.ndarray:
    """blake2b-64(salt NUL key) of every key, little-endian, as a float64 in [0, 1)."""
    return _unit_hashes((str(k).encode() for k in keys), salt)


def _unit_hashes(utf8_keys, salt: str) -> np.ndarray:
    prefix = salt.encode() + b"\0"
    digests = b"".join(hashlib.blake2b(prefix + k, digest_size=8).digest() for k in utf8_keys)
    return np.frombuffer(digests, "<u8").astype(np.float64) / 2.0**64


def _hash_parts(parts: list[tuple[Path, dict]], salt: str) -> list[np.ndarray]:
    """Unit hashes of the keys of each (key array, part record); a damaged array names its part."""
    def read(part: tuple[Path, dict]) -> np.ndarray:
        try:
            return read_utf8(part[0])
        except PlainReadError as e:
            raise damaged(part[1], f"key cannot be read ({e})") from None

    with ThreadPoolExecutor(READ_THREADS) as pool:  # the next parts' files are read while one is hashed
        return [_unit_hashes(keys, salt) for keys in pool.map(read, parts)]


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


def _split(u: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    held_out = u < val_fraction
    if val_fraction > 0 and len(u) >= 2:
        # Tiny caches: keep the split usable by moving the extreme key across.
        if not held_out.any():
            held_out[np.argmin(u)] = True
        if held_out.all():
            held_out[np.argmax(u)] = False
    ids = np.arange(len(u), dtype=np.int64)
    return ids[~held_out], ids[held_out]
