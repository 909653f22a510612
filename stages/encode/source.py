"""Input shards: expanding the --source pattern and streaming decoded batches out of DataLoader workers.

Each worker owns whole input shards (``shards[worker::num_workers]``) and yields fixed-size
batches of cropped images. A batch also carries the skips found while filling it and the list of
input shards that ended before it was yielded, so the consumer can commit a part as soon as all
of its rows have arrived. Tar parsing is webdataset's (``tar_file_expander`` + ``group_by_keys``);
a truncated tar keeps every sample before the break and reports the break.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from braceexpand import braceexpand

from cache_schema import UsageError
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from .preprocess import Prepared, Skipped, prepare_sample


_META = r"__[^/]*__($|/)"  # webdataset's pattern for meta entries, which carry no sample


class SourceError(UsageError):
    """The --source pattern cannot be used; the message says why and how to fix it."""


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def expand_source(pattern: str) -> list[str]:
    """Brace- and glob-expand a source pattern into shard URLs, in a stable order.

    Local files must exist; ``pipe:`` and other URLs are passed to webdataset's gopen as they are.
    """
    urls: list[str] = []
    for piece in pattern.split("::"):
        for url in braceexpand(piece.strip()):
            if _is_remote(url):
                urls.append(url)
            elif any(c in url for c in "*?["):
                urls.extend(sorted(glob.glob(url)))
            else:
                urls.append(url)
    if not urls:
        raise SourceError(f"--source {pattern!r} matches no input shards; check the path or brace pattern")
    missing = [u for u in urls if not _is_remote(u) and not os.path.isfile(u)]
    if len(missing) == len(urls):
        raise SourceError(f"--source {pattern!r} matches no existing file (first: {missing[0]}); check the path")
    if missing:
        raise SourceError(
            f"--source {pattern!r}: {len(missing)} of {len(urls)} shards do not exist (first: {missing[0]}); "
            "fix the pattern so it lists only shards you have"
        )
    dupes = len(urls) - len(set(urls))
    if dupes:
        raise SourceError(f"--source {pattern!r} lists {dupes} shard(s) twice; each input shard may appear once")
    return urls


@dataclass
class ShardEnd:
    """An input shard has been read completely (or up to a break)."""

    url: str
    samples_read: int
    broken: str | None = None  # reason the shard ended early: a tar read error or the sample limit


@dataclass
class Batch:
    """What a worker yields. Rows are in source order within each input shard."""

    images: np.ndarray | torch.Tensor  # (B, res, res, 3) uint8; a pinned tensor after pin_memory()
    keys: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skips: list[tuple[str, str | None, int, str]] = field(default_factory=list)  # (url, key, index, reason)
    ended: list[ShardEnd] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pinning thread (pin_memory=True): page-locked images copy to the
        GPU asynchronously, so the next batch's upload overlaps the current batch's encoding."""
        self.images = torch.from_numpy(self.images).pin_memory()
        return self


def iter_tar(url: str) -> Iterator[dict]:
    """Samples of one tar shard as webdataset dicts (``__key__`` plus one bytes entry per extension).

    Like webdataset's ``tar_file_expander`` + ``group_by_keys``, except at a break: when the
    stream fails inside a file of the *next* sample, the sample before it is known complete and
    is yielded before the error propagates (webdataset drops it).
    """
    current: dict | None = None
    with gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tf:
        for info in tf:
            if not info.isreg():
                continue
            prefix, suffix = base_plus_ext(info.name)
            if prefix is None or re.match(_META, info.name):
                continue
            if current is not None and prefix != current["__key__"]:
                yield current
                current = None
            data = tf.extractfile(info).read()
            if current is None:
                current = {"__key__": prefix, "__url__": url}
            suffix = suffix.lower()
            if suffix in current:
                current.setdefault("__duplicate__", suffix)
            current[suffix] = data
            tf.members = []  # do not accumulate member headers over a whole shard
        if current is not None:
            yield current


class ShardStream(torch.utils.data.IterableDataset):
    """Decoded, cropped batches from a list of input shards, split across DataLoader workers."""

    def __init__(
        self,
        urls: list[str],
        batch_size: int,
        resolution: int,
        max_pixels: int,
        draft: bool,
        sample_limit: int | None = None,
    ):
        self.urls = urls
        self.batch_size = batch_size
        self.resolution = resolution
        self.max_pixels = max_pixels
        self.draft = draft
        self.sample_limit = sample_limit  # for the whole stream, shared out over workers

    def _my_share(self) -> tuple[list[str], int | None]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        limit = None
        if self.sample_limit is not None:
            limit = self.sample_limit // nw + (1 if wid < self.sample_limit % nw else 0)
        return self.urls[wid::nw], limit

    def _new_batch(self) -> Batch:
        return Batch(images=np.empty((self.batch_size, self.resolution, self.resolution, 3), np.uint8))

    def __iter__(self):
        urls, limit = self._my_share()
        produced = 0
        batch = self._new_batch()
        for url in urls:
            if limit is not None and produced >= limit:
                break
            index, broken = 0, None
            try:
                for sample in iter_tar(url):
                    if limit is not None and produced >= limit:
                        broken = f"sample-limit: stopped after {index} samples (--max-samples)"
                        break
                    out = prepare_sample(sample, self.resolution, self.max_pixels, self.draft)
                    if isinstance(out, Skipped):
                        batch.skips.append((url, out.key, index, out.reason))
                    else:
                        self._add(batch, url, index, out)
                        produced += 1
                        if len(batch) == self.batch_size:
                            yield batch
                            batch = self._new_batch()
                    index += 1
            except Exception as e:  # the tar stream broke: keep what came before, record the break
                msg = str(e.args[0]) if e.args else type(e).__name__
                broken = f"truncated-tar: {type(e).__name__}: {msg[:200]} after {index} samples"
            batch.ended.append(ShardEnd(url, index, broken))
        if len(batch) or batch.skips or batch.ended:
            batch.images = batch.images[: len(batch)]
            yield batch

    @staticmethod
    def _add(batch: Batch, url: str, index: int, s: Prepared) -> None:
        batch.images[len(batch)] = s.image
        batch.keys.append(s.key)
        batch.urls.append(url)
        batch.indices.append(index)
        batch.captions.append(s.caption)
        batch.labels.append(s.label)
