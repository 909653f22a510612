"""The cache's lock: held for the short critical sections of writers (creating the manifest, claiming parts,
committing and dropping parts), so two encoders of one cache never interleave them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from cache_schema.format.layout import LOCK_NAME
from cache_schema.storage.fsutil import exclusive_lock


@contextlib.contextmanager
def cache_lock(cache_dir: Path) -> Iterator[None]:
    with exclusive_lock(Path(cache_dir) / LOCK_NAME):
        yield
