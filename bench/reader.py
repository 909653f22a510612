"""Random-batch read throughput of the training data path on SiT-XL/2-sized samples.

    python bench/reader.py [--samples 8192 --workers 2 --batch 256 --seconds 20]

Writes a synthetic fp16 cache once (moments 8x32x32 = 16 KiB, DINOv2-B 256x768 = 384 KiB per
sample, random values) under bench/out/, warms the page cache, then reads fully random batches:
through ``make_loader`` with worker processes, with the dataset in this process, and with the
zarr-python reference reader on a few batches.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np
import psutil

from cache_schema import (
    CacheError,
    CacheReader,
    PartWriter,
    cache_fields,
    new_manifest,
    read_manifest,
    start_encode,
)
from stages.train.data import CacheBatchDataset, EpochBatchSampler, make_loader

OUT = Path(__file__).resolve().parent / "out"
LATENT = dict(channels=4, size=32)
DINO = dict(tokens=256, dim=768)
SHARD = 1024
PARTS = 4


def random_fp16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # Uniform [0, 1) is as good as real features for timing uncompressed reads, and cheap to make.
    return rng.random(shape, np.float32).astype(np.float16)


def synthetic_cache(path: Path, samples: int) -> None:
    """Write (or keep, when it already holds ``samples`` samples) the synthetic cache."""
    try:
        if read_manifest(path).num_samples == samples:
            return
    except CacheError:
        pass
    shutil.rmtree(path, ignore_errors=True)
    fields = cache_fields(LATENT["channels"], LATENT["size"], DINO["tokens"], DINO["dim"], None, "fp16")
    settings = dict(
        resolution=256, crop="adm", vae={"id": "synthetic"}, dino={"id": "synthetic"}, dino_preprocess="none",
        text_encoder=None, max_text_tokens=0, dtype="fp16", feature_codec="fp16", shard_size=SHARD,
    )
    latent = dict(**LATENT, scaling_factor=0.18215, shift_factor=0.0, mean=None, std=None)
    manifest = new_manifest(settings, latent, dict(**DINO, grid=[16, 16]), None, fields)
    start_encode(path, manifest, overwrite=False)
    rng = np.random.default_rng(0)
    bounds = np.linspace(0, samples, PARTS + 1).astype(int)
    for p, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        writer = PartWriter(path, f"part{p}", f"synthetic-{p}.tar", fields, SHARD)
        for start in range(lo, hi, 256):
            n = min(256, hi - start)
            writer.append(
                dict(
                    key=[f"{i:08d}" for i in range(start, start + n)],
                    source_index=np.arange(start - lo, start - lo + n),
                    caption=[""] * n,
                    label=rng.integers(0, 1000, n),
                    moments=random_fp16(rng, (n, 2 * LATENT["channels"], LATENT["size"], LATENT["size"])),
                    dino=random_fp16(rng, (n, DINO["tokens"], DINO["dim"])),
                )
            )
        writer.commit()


def warm_page_cache(path: Path) -> int:
    """Read every file once so the measurement sees memory, not the disk. Returns bytes read."""
    total = 0
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                while chunk := fh.read(64 << 20):
                    total += len(chunk)
    return total


def cpu_seconds() -> float:
    """CPU time of this process and all its descendants alive now (DataLoader workers included)."""
    procs = [psutil.Process()]
    procs += procs[0].children(recursive=True)
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def timed(batches, seconds: float, min_batches: int = 1) -> tuple[int, float, float]:
    """Consume batches for about ``seconds``; returns (samples, elapsed seconds, CPU seconds)."""
    samples, t0, c0 = 0, time.perf_counter(), cpu_seconds()
    for i, batch in enumerate(batches, 1):
        samples += len(batch["index"])
        if i >= min_batches and time.perf_counter() - t0 >= seconds:
            break
    return samples, time.perf_counter() - t0, cpu_seconds() - c0


def zarr_reference(reader: CacheReader, ids: np.ndarray) -> dict:
    """The same batch through zarr-python, one slice per sample and field (the reference reader)."""
    rows: dict[str, list[np.ndarray]] = {"moments": [], "dino": [], "label": []}
    for i in ids:
        p, row = reader.locate(int(i))
        for field, out in rows.items():
            out.append(reader.read(reader.parts[p]["name"], field, row, row + 1))
    return {"index": ids, **{field: np.concatenate(out) for field, out in rows.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--cache", type=Path, default=OUT / "reader-cache")
    args = ap.parse_args()

    t0 = time.perf_counter()
    synthetic_cache(args.cache, args.samples)
    print(f"cache     {args.cache} ({args.samples} samples, ready in {time.perf_counter() - t0:.1f} s)")
    warm = warm_page_cache(args.cache)
    print(f"warmed    {warm / 2**30:.2f} GiB into the page cache; load average {os.getloadavg()[0]:.1f}")

    dataset = CacheBatchDataset(args.cache, need_dino=True, need_label=True)
    bytes_per_sample = sum(v for k, v in dataset.reader.manifest.bytes_per_sample().items() if k in dataset.per_sample)
    rows = []

    def record(path: str, samples: int, seconds: float, cpu: float) -> None:
        rate = samples / seconds
        rows.append((path, rate, rate * bytes_per_sample / 1e6, samples / cpu, samples))

    rng = np.random.default_rng(1)
    ref_ids = [rng.choice(len(dataset), args.batch, replace=False) for _ in range(2)]
    reference = CacheReader(args.cache)
    ref_batches = (zarr_reference(reference, ids) for ids in ref_ids)
    record("zarr-python reference (1 process)", *timed(ref_batches, 0, len(ref_ids)))

    sampler = EpochBatchSampler(np.arange(len(dataset)), args.batch, seed=0, name="the synthetic cache")
    batches = (dataset.__getitems__(ids) for ids in sampler)
    next(batches)  # opens the stores
    record("FastReader dataset (1 process)", *timed(batches, args.seconds / 2))

    if args.workers > 0:
        # Slots released through weak references to the batch storages (the default where torch allows
        # it), then the fallback that copies each batch out of its slot on arrival.
        for copy_out, label in ((False, ""), (True, ", copy-out fallback")):
            loader = make_loader(dataset, EpochBatchSampler(np.arange(len(dataset)), args.batch, seed=1), args.workers,
                                 copy_out=copy_out)
            t0 = time.perf_counter()
            stream = iter(loader)
            next(stream)
            print(f"workers   {args.workers} started in {time.perf_counter() - t0:.1f} s{label}")
            record(f"make_loader, {args.workers} workers{label}", *timed(stream, args.seconds))
            print(f"recycled  all but {loader.unrecycled_batches} batches read into reused shared memory")
            del stream, loader

    print(f"\n{'read path':50s} {'samples/s':>10s} {'MB/s':>7s} {'samples/CPU-s':>14s} {'samples':>8s}")
    for path, rate, mbps, per_cpu, samples in rows:
        print(f"{path:50s} {rate:10.0f} {mbps:7.0f} {per_cpu:14.0f} {samples:8d}")
    print(
        f"(batch {args.batch}, {bytes_per_sample / 1024:.0f} KiB per sample, fully random ids; "
        f"samples/CPU-s counts all processes, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )


if __name__ == "__main__":
    main()
