"""FID reference statistics from the held-out split's source images, and their .npz files.

The held-out split is the one training validated on: ``split_ids(keys, val_fraction)`` of the run's
cache. Its images are re-read from the source tars (each cache part records the tar URL it came
from; samples are matched by key) and centre-cropped exactly as `repa encode` cropped them (ADM crop
to the cache resolution, the same JPEG draft setting), so generated and reference images share a
resolution and a crop. The statistics (mu, sigma, n) are written once with ``--make-reference`` and
read back with ``--reference``; any .npz with ``mu`` and ``sigma`` arrays of the same feature size
(for example one made by another FID tool with the same Inception network) is accepted too.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cache_schema import CacheReader, Manifest
from cache_schema.format.sources import source_id
from stages.core.data.split import split_ids
from stages.core.encoders.images import Skipped, crop_name, prepare_sample
from stages.core.encoders.tars import expand_source, iter_tar, recorded_source
from stages.core.errors import UsageError
from stages.core.runtime.progress import progress_bar

#################################################################################
#                               The held-out split                              #
#################################################################################


@dataclass
class HeldOut:
    """The held-out samples of a cache, in cache order."""

    ids: np.ndarray  # global cache ids
    keys: list[str]
    captions: list[str]
    labels: list[int]
    sources: list[str]  # the tar URL each sample was read from, as recorded in the cache
    source_ids: dict[str, str]  # recorded tar URL -> content identity recorded with it

    def __len__(self) -> int:
        return len(self.ids)


def held_out(cache: Path, val_fraction: float) -> HeldOut:
    """The held-out split; of the other samples only the keys are read (and not kept)."""
    reader = CacheReader(cache)
    _, ids = split_ids(reader.keys, val_fraction)
    if not len(ids):
        raise UsageError(f"the run held out no samples of {cache} (val_fraction {val_fraction}); "
                         "evaluation conditions on and compares with the held-out split")
    part_of = np.searchsorted(reader.offsets, ids, side="right") - 1
    keys, captions, labels, sources, source_ids = [], [], [], [], {}
    for p in np.unique(part_of):
        part = reader.parts[p]
        small = reader.small_fields(part["name"])
        rows = ids[part_of == p] - reader.offsets[p]
        keys += [str(k) for k in small["key"][rows]]
        captions += [str(c) for c in small["caption"][rows]]
        labels += [int(x) for x in small["label"][rows]]
        sources += [part["source"]] * len(rows)
        source_ids[part["source"]] = part.get("source_id") or ""
    return HeldOut(ids, keys, captions, labels, sources, source_ids)


#################################################################################
#                          Re-reading the source images                         #
#################################################################################


def source_locations(held: HeldOut, given: str | None) -> dict[str, str]:
    """Where to read each recorded source now (``recorded_source``): a recorded command or URL only
    when given with ``--source`` on this command line."""
    by_id = {source_id(u): u for u in expand_source(given)} if given else {}
    return {url: recorded_source(url, sid, by_id, f"the held-out images' source shard {url}",
                                 also=", or --reference FILE.npz")
            for url, sid in held.source_ids.items()}


def _shard_images(url: str, where: str, keys: set[str], resolution: int, draft: bool) -> list[np.ndarray]:
    """The held-out images of one shard, in shard order."""
    missing, images = set(keys), []
    for sample in iter_tar(where):
        if sample["__key__"] not in missing:
            continue
        missing.discard(sample["__key__"])
        # The sample passed encode's checks once; only its pixels are needed again.
        out = prepare_sample(sample, resolution, sys.maxsize, draft)
        if isinstance(out, Skipped):
            raise UsageError(f"{url}: held-out sample {out.key} no longer decodes ({out.reason})")
        images.append(out.image)
        if not missing:
            break
    if missing:
        raise UsageError(f"{url}: {len(missing)} held-out sample(s) not in the shard (first: {sorted(missing)[0]}); "
                         "the source changed since encoding, so pass --reference FILE.npz")
    return images


def source_images(held: HeldOut, urls: list[str], manifest: Manifest, where: dict[str, str],
                  workers: int | None = None, progress: bool = False) -> Iterator[np.ndarray]:
    """The held-out images of the given (recorded) shards, (res, res, 3) uint8, cropped as the cache was;
    ``where`` says where each is read now (``source_locations``). Shards are read by ``workers`` threads at
    once (tar reading and JPEG decoding release the GIL); images come in shard order all the same."""
    resolution = int(manifest.settings["resolution"])
    draft = manifest.settings["crop"] == crop_name(True)
    wanted: dict[str, set[str]] = defaultdict(set)
    for url, key in zip(held.sources, held.keys, strict=True):
        wanted[url].add(key)
    workers = max(1, min(workers or os.cpu_count() or 1, len(urls)))
    with ThreadPoolExecutor(workers) as pool, progress_bar(
        total=sum(len(wanted[u]) for u in urls), unit="img", desc="reference images", disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        # map() keeps shard order; each result is one shard's held-out images (a share of the shard).
        for images in pool.map(lambda u: _shard_images(u, where[u], wanted[u], resolution, draft), urls):
            bar.update(len(images))
            yield from images


def image_batches(images: Iterator[np.ndarray], batch_size: int) -> Iterator[Tensor]:
    """uint8 (B, 3, H, W) batches."""
    batch: list[np.ndarray] = []
    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
            batch = []
    if batch:
        yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)


#################################################################################
#                                  Statistics                                   #
#################################################################################


@dataclass
class FeatureStats:
    """Mean and covariance of Inception features; ``n`` is None for statistics made elsewhere without it."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    n: int | None = None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # a file object: np.savez would append .npz to a name without it
            np.savez(f, mu=self.mu, sigma=self.sigma, n=np.int64(self.n or 0))

    @classmethod
    def load(cls, path: Path) -> FeatureStats:
        try:
            with np.load(path, allow_pickle=False) as data:
                if "mu" not in data or "sigma" not in data:
                    raise UsageError(f"--reference {path}: no mu and sigma arrays in it "
                                     f"(found {', '.join(data.files)})")
                mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
                n = int(data["n"]) if "n" in data and int(data["n"]) > 0 else None
        except FileNotFoundError:
            raise UsageError(f"--reference {path}: no such file; write one with --make-reference") from None
        except (OSError, ValueError) as e:
            raise UsageError(f"--reference {path}: not a readable .npz ({e})") from None
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
            raise UsageError(f"--reference {path}: mu {mu.shape} and sigma {sigma.shape} do not match")
        return cls(mu, sigma, n)

    @classmethod
    def from_fid(cls, fid) -> FeatureStats:
        """The real-image statistics a torchmetrics ``FrechetInceptionDistance`` accumulated (summed over processes)."""
        with fid.sync_context():
            n = int(fid.real_features_num_samples)
            if n < 2:
                raise UsageError(f"reference statistics need at least 2 images, the held-out split gave {n}")
            mu = fid.real_features_sum.double().cpu() / n
            sigma = (fid.real_features_cov_sum.double().cpu() - n * torch.outer(mu, mu)) / (n - 1)
        return cls(mu.numpy(), sigma.numpy(), n)

    def load_into(self, fid, main: bool) -> None:
        """Make ``fid``'s real-image side hold these statistics.

        torchmetrics keeps sums (of features and their outer products) and sums them over processes
        when it computes, so only the main process holds them; the others keep zeros. Any count
        reproduces mu and sigma exactly, so statistics without ``n`` use 2.
        """
        if self.mu.size != fid.real_features_sum.numel():
            raise UsageError(f"reference statistics have {self.mu.size} features, the Inception network gives "
                             f"{fid.real_features_sum.numel()}; they were made with another network")
        if not main:
            return
        n = self.n or 2
        device = fid.real_features_sum.device
        mu, sigma = torch.from_numpy(self.mu), torch.from_numpy(self.sigma)
        fid.real_features_sum = (mu * n).to(device)
        fid.real_features_cov_sum = (sigma * (n - 1) + n * torch.outer(mu, mu)).to(device)
        fid.real_features_num_samples = torch.tensor(n, device=device)
