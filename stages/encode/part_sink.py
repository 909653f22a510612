"""Routing encoded batches into part writers on a background thread, so disk writes overlap GPU work.

The encode loop hands over device tensors copied to the host with ``non_blocking=True`` plus a
CUDA event; this thread waits on the event, splits rows by input shard, appends them to that
shard's ``PartWriter`` and commits the part when the batch says the shard has ended.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cache_schema import Field, PartWriter, part_name

from .source import Batch


@dataclass
class SinkStats:
    encoded: int = 0
    parts: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)


_STOP = object()


class PartSink:
    """Owns every part writer of this process. Only its thread touches them."""

    def __init__(self, cache_dir: Path, fields: dict[str, Field], shard_size: int, max_pending: int = 3):
        self.cache_dir = cache_dir
        self.fields = fields
        self.shard_size = shard_size
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.writers: dict[str, PartWriter] = {}
        self.stats = SinkStats()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="part-sink", daemon=True)
        self.thread.start()

    # -- producer side (encode loop) ------------------------------------------------------------
    def submit(self, batch: Batch, features: dict, ready: torch.cuda.Event | None) -> None:
        self._raise_if_failed()
        while True:  # poll so a dead writer thread cannot block the producer forever
            try:
                self.queue.put((batch, features, ready), timeout=1.0)
                return
            except queue.Full:
                self._raise_if_failed()

    def close(self) -> SinkStats:
        if self.thread.is_alive():
            self.queue.put(_STOP)
            self.thread.join()
        self._raise_if_failed()
        return self.stats

    def abort(self) -> None:
        """Stop without committing: drop queued work and delete unfinished parts (committed ones stay)."""
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        if self.thread.is_alive():
            self.queue.put(_STOP)
            self.thread.join(timeout=60)
        for w in self.writers.values():
            w.abort()
        self.writers.clear()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"writing the cache failed: {self.error}") from self.error

    # -- consumer side (thread) -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is _STOP:
                return
            try:
                self._consume(*item)
            except BaseException as e:  # surfaced to the producer by _raise_if_failed
                self.error = e
                return

    def _writer(self, url: str) -> PartWriter:
        if url not in self.writers:
            self.writers[url] = PartWriter(self.cache_dir, part_name(url), url, self.fields, self.shard_size)
        return self.writers[url]

    def _consume(self, batch: Batch, features: dict, ready) -> None:
        if ready is not None:
            ready.synchronize()
        host = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        urls = np.asarray(batch.urls)
        for url in dict.fromkeys(batch.urls):  # distinct, in order of appearance
            rows = np.flatnonzero(urls == url)
            self._writer(url).append(self._rows(batch, host, rows))
            self.stats.encoded += len(rows)
        for url, key, index, reason in batch.skips:
            self._writer(url).skip(key, index, reason)
            self.stats.skipped[reason.split(":")[0]] += 1
        for end in batch.ended:
            w = self._writer(end.url)
            if end.broken:
                w.skip(None, end.samples_read, end.broken)
                self.stats.skipped[end.broken.split(":")[0]] += 1
            manifest = w.commit({"samples_read": end.samples_read, "complete": end.broken is None})
            self.stats.parts += 1
            self.stats.bytes += next(p["bytes"] for p in manifest.parts if p["name"] == w.name)
            del self.writers[end.url]

    def _rows(self, batch: Batch, host: dict, rows: np.ndarray) -> dict:
        out = {
            "key": [batch.keys[i] for i in rows],
            "source_index": np.asarray(batch.indices, dtype=np.int64)[rows],
            "caption": [batch.captions[i] for i in rows],
            "label": np.asarray(batch.labels, dtype=np.int64)[rows],
            "moments": host["moments"][rows],
            "dino": host["dino"][rows],
        }
        if "dino_scale" in self.fields:
            out["dino_scale"] = host["dino_scale"][rows]
        if "text" in self.fields:
            lengths = host["text_lengths"]
            out["text"] = [host["text"][i, : lengths[i]] for i in rows]
            if "text_scale" in self.fields:
                out["text_scale"] = [host["text_scale"][i, : lengths[i]] for i in rows]
        return out
