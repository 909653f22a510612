"""The identity of an input shard, by content rather than by the spelling of its path.

A local tar is identified by its size and a hash of its first and last 64 KiB: the same file given
as ``data/x.tar`` and ``/abs/data/x.tar`` (or copied elsewhere) is one source, and a tar that was
replaced or re-downloaded with other bytes is another. A remote source (``pipe:`` command, URL) can
only be identified by its text.
"""

from __future__ import annotations

import hashlib
import os

from cache_schema.errors import CacheError

_EDGE = 64 * 1024


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def source_id(url: str) -> str:
    """``file:<size>:<hash>`` for a local file, ``url:<text>`` for anything else."""
    if is_remote(url):
        return f"url:{url}"
    try:
        size = os.path.getsize(url)
        h = hashlib.blake2b(digest_size=12)
        with open(url, "rb") as f:
            h.update(f.read(_EDGE))
            if size > _EDGE:
                f.seek(max(size - _EDGE, _EDGE))
                h.update(f.read(_EDGE))
    except OSError as e:
        raise CacheError(f"{url}: cannot read the input shard ({e.strerror or e})") from None
    return f"file:{size}:{h.hexdigest()}"
