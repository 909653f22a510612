"""Routing encoded batches into part writers on a background thread, so disk writes overlap GPU work.

The encode loop hands over device tensors copied to the host with ``non_blocking=True`` plus a
CUDA event; this thread waits on the event, splits rows by input shard, appends them to that
shard's ``PartWriter`` and commits the part when the batch says the shard has ended (complete when
its source was read to the end without a break or a sample limit). Samples whose features are not
finite (an encoder overflowing fp16, a NaN) are skipped and recorded like any other bad input; a
batch in which every sample is non-finite stops the encode, since that is a setting, not the data.
Samples whose image-caption similarity is below ``min_similarity`` are skipped the same way, and so
are samples whose key the cache or this process already holds (``duplicates``).
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cache_schema import CacheError, Field, PartWriter
from cache_schema.format.layout import FILTER_SKIP_CODES
from cache_schema.storage.fsutil import write_error
from cache_schema.writing.claims import Heartbeat, Owner
from stages.core.encoders.features import NONFINITE_BITS
from stages.core.errors import UsageError

from .duplicates import SeenKeys
from .plan import Shard
from .source import Batch, ShardEnd

MIN_BATCH_FOR_ALL_BAD = 8  # a smaller batch that is wholly non-finite may be bad data, not a bad setting


@dataclass
class SinkStats:
    encoded: int = 0
    parts: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)


_STOP = object()


class PartSink:
    """Owns every part writer of this process. Its thread fills the writers; a second thread, the
    committer, finishes each part whose source has ended (last shard, fsync, rename, record), so a
    commit never holds up the batches behind it."""

    def __init__(self, cache_dir: Path, fields: dict[str, Field], shard_size: int, shards: dict[str, Shard],
                 owner: Owner | None = None, heartbeat: Heartbeat | None = None, max_pending: int = 3,
                 min_similarity: float | None = None, publish: Callable[[str], bool] | None = None,
                 seen: SeenKeys | None = None):
        self.cache_dir = cache_dir
        # Called with each part once committed where it was built: whether it is this writer's (an upload
        # to object storage may find another writer's commit there first; that part then counts nothing).
        self.publish = publish
        self.fields = fields
        self.shard_size = shard_size
        self.shards, self.owner, self.heartbeat = shards, owner, heartbeat
        self.min_similarity = min_similarity
        self.seen = seen  # None: every key is stored as it comes (a target must match its cache part row for row)
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.to_commit: queue.Queue = queue.Queue()
        self.writers: dict[str, PartWriter] = {}
        self.committing: list[PartWriter] = []
        self.stats = SinkStats()
        self.error: BaseException | None = None
        self._stats_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="part-sink", daemon=True)
        self.committer = threading.Thread(target=self._commit_loop, name="part-committer", daemon=True)
        self.thread.start()
        self.committer.start()

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
        if self.committer.is_alive():
            self.to_commit.put(_STOP)
            self.committer.join()
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
        if self.committer.is_alive():
            self.to_commit.put(_STOP)
            self.committer.join(timeout=600)  # parts already handed over are finished, not lost
        for w in self.writers.values():
            w.abort()
        self.writers.clear()

    def _raise_if_failed(self) -> None:
        """Re-raise the writer thread's error here: one line for what the user can fix (a full disk,
        a lost claim, overflowing encoders), the full story for anything else."""
        e = self.error
        if e is None:
            return
        if isinstance(e, (UsageError, CacheError)):
            raise e
        if isinstance(e, OSError):
            raise write_error(self.cache_dir, e, "rerun the same encode command (committed parts are kept)") from None
        raise RuntimeError(f"writing the cache failed: {e}") from e

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

    def _commit_loop(self) -> None:
        while True:
            item = self.to_commit.get()
            if item is _STOP:
                return
            writer, end = item
            try:
                record = writer.commit(complete=end.broken is None, samples_read=end.samples_read)
                ours = self.publish is None or self.publish(writer.name)
            except BaseException as e:
                self.error = self.error or e
                continue  # the writer aborted itself; later parts may still commit
            if self.heartbeat is not None:
                self.heartbeat.discard(writer.name)
            with self._stats_lock:
                if not ours:  # another writer's commit stands: this copy's samples are not in the cache
                    self.stats.encoded -= record.num_samples
                    self.stats.skipped.subtract(Counter(s["reason"].split(":")[0] for s in record.skips))
                    continue
                self.stats.parts += 1
                self.stats.bytes += record.bytes

    def _writer(self, url: str) -> PartWriter:
        if url not in self.writers:
            shard = self.shards[url]
            self.writers[url] = PartWriter(self.cache_dir, shard.part, url, self.fields, self.shard_size,
                                           shard.source_id, self.owner)
        return self.writers[url]

    def _consume(self, batch: Batch, features: dict, ready) -> None:
        if ready is not None:
            ready.synchronize()
        host = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        bad = host.pop("nonfinite", np.zeros(len(batch), np.uint8))
        if len(batch) >= MIN_BATCH_FOR_ALL_BAD and bad.all():
            raise UsageError(f"every sample of a batch of {len(batch)} gave non-finite {_names(int(bad[0]))} "
                             "features: the encoders overflow in this --dtype; encode with --dtype bf16 or fp32")
        urls = np.asarray(batch.urls)
        low = np.zeros(len(batch), bool)
        if self.min_similarity is not None and len(batch):
            low = (bad == 0) & (host["similarity"] < self.min_similarity)
        held = self._held_keys(batch, (bad == 0) & ~low)
        dup = np.array([h is not None for h in held], bool)
        for url in dict.fromkeys(batch.urls):  # distinct, in order of appearance
            rows = _contiguous(np.flatnonzero((urls == url) & (bad == 0) & ~low & ~dup))
            writer = self._writer(url)
            writer.append(self._rows(batch, host, rows))
            self.stats.encoded += len(range(len(batch))[rows]) if isinstance(rows, slice) else len(rows)
            for i in np.flatnonzero((urls == url) & (bad != 0)):
                self._skip(writer, batch.keys[i], batch.indices[i], f"non-finite: {_names(int(bad[i]))} features")
            for i in np.flatnonzero((urls == url) & low):
                code = FILTER_SKIP_CODES["min_similarity"]
                self._skip(writer, batch.keys[i], batch.indices[i],
                           f"{code}: {host['similarity'][i]:.4f} below --min-similarity {self.min_similarity}")
            for i in np.flatnonzero((urls == url) & dup):
                where = ("an earlier sample of this input shard" if held[i] == self.shards[url].part
                         else f"part {held[i]}")
                self._skip(writer, batch.keys[i], batch.indices[i], f"duplicate-key: {where} holds the key")
        for url, key, index, reason in batch.skips:
            self._skip(self._writer(url), key, index, reason)
        for end in batch.ended:
            w = self._writer(end.url)
            if end.broken:
                self._skip(w, None, end.samples_read, end.broken)
            self._finish(w, end)
            self.to_commit.put((self.writers.pop(end.url), end))  # the committer owns it from here

    def _held_keys(self, batch: Batch, storing: np.ndarray) -> list[str | None]:
        """For each row of ``batch``, the part already holding its key (None: the row keeps it), in row
        order, so the first of two copies in one shard is the one stored."""
        held: list[str | None] = [None] * len(batch)
        if self.seen is not None:
            for i in np.flatnonzero(storing):
                held[i] = self.seen.holder(batch.keys[i], self.shards[batch.urls[i]].part)
        return held

    def _skip(self, writer: PartWriter, key: str | None, index: int, reason: str) -> None:
        """Record a sample (key None: the rest of the shard) left out of ``writer``'s part."""
        writer.skip(key, index, reason)
        self.stats.skipped[reason.split(":")[0]] += 1

    def _finish(self, writer: PartWriter, end: ShardEnd) -> None:
        """Called when every row of ``writer``'s part has arrived, before it is committed."""

    def _rows(self, batch: Batch, host: dict, rows: slice | np.ndarray) -> dict:
        """The rows of one part; a slice of the batch (the usual case) is a view, not a copy."""
        index = range(len(batch))[rows] if isinstance(rows, slice) else rows
        out: dict[str, list | np.ndarray] = {"key": [batch.keys[i] for i in index]}
        for name in self.fields:
            if name == "source_index":
                out[name] = np.asarray(batch.indices, dtype=np.int64)[rows]
            elif name == "caption":
                out[name] = [batch.captions[i] for i in index]
            elif name == "label":
                out[name] = np.asarray(batch.labels, dtype=np.int64)[rows]
            elif name not in ("key", "text", "text_scale", "text_offsets"):
                out[name] = host[name][rows]  # the encoders' features, by field name
        if "text" in self.fields:
            lengths = host["text_lengths"]
            out["text"] = [host["text"][i, : lengths[i]] for i in index]
            if "text_scale" in self.fields:
                out["text_scale"] = [host["text_scale"][i, : lengths[i]] for i in index]
        return out


def _names(bits: int) -> str:
    return "/".join(name for name, bit in NONFINITE_BITS.items() if bits & bit)


def _contiguous(rows: np.ndarray) -> slice | np.ndarray:
    """``rows`` as a slice when they are consecutive, so selecting them copies nothing."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1:
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


@contextmanager
def feeding(sink: PartSink, bar, heartbeat: Heartbeat, release: Callable[[], None]) -> Iterator[None]:
    """Around the loop that feeds ``sink``: on any error its unfinished parts are dropped; however it
    ends the progress bar closes, the heartbeat stops and the claims left uncommitted are released at
    once (so other processes may take them without waiting for the lease)."""
    try:
        yield
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()
        heartbeat.stop()
        release()
