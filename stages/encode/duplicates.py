"""The keys an encode must not store again: a later sample with one of them is a ``duplicate-key``.

A key names one sample of the cache (the held-out split, evaluation and added targets find samples by
it), so an encode keeps the first sample with a key and skips every later one, recorded like any other
skip. "Earlier" is what one process can know: the keys of the parts committed before this run that it
does not encode again, then those it stores itself, in the order it stores them (within an input
shard, shard order). Two processes storing a copy each at the same time cannot know of each other;
``repa cache verify`` names the later part, and ``--redo`` of it leaves out the keys the others hold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cache_schema import FastReader


class SeenKeys:
    def __init__(self, committed: dict[str, np.ndarray]):
        """``committed``: part name -> its keys, for the parts already in the cache."""
        self._names = list(committed)
        keys = [np.asarray(committed[n], dtype=np.dtypes.StringDType()) for n in self._names]
        flat = np.concatenate(keys) if keys else np.array([], dtype=np.dtypes.StringDType())
        owner = np.repeat(np.arange(len(keys)), [len(k) for k in keys])
        order = np.argsort(flat, kind="stable")
        self._keys, self._owner = flat[order], owner[order]
        self._stored: dict[str, str] = {}  # key -> part, for the samples this process stored

    @classmethod
    def of_cache(cls, cache: Path, parts: list[str]) -> SeenKeys:
        """The keys of committed ``parts`` of ``cache``; a part whose keys cannot be read adds none
        (verify names it; its own redo re-reads its shard)."""
        if not parts:
            return cls({})
        keys = FastReader(cache, parts=parts, unreadable={}).keys_by_part()
        return cls({name: k for name, k in zip(parts, keys, strict=True) if k is not None})

    def holder(self, key: str, part: str) -> str | None:
        """The part that already holds ``key``, or None, in which case ``part`` now does."""
        if key in self._stored:
            return self._stored[key]
        i = int(np.searchsorted(self._keys, key))
        if i < len(self._keys) and self._keys[i] == key:
            return self._names[self._owner[i]]
        self._stored[key] = part
        return None
