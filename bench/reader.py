"""Random-batch read throughput of the training data path on SiT-XL/2-sized samples.

    python bench/reader.py [--samples 8192 --parts 4,1024 --workers 2 --batch 256 --seconds 20 --text]

For each part count, writes a synthetic cache once (moments 8x32x32 = 16 KiB, DINOv2-B 256x768 =
384 KiB per sample in fp16, random values) under bench/out/, warms the page cache, then reads fully
random batches: through ``make_loader`` with worker processes, with the dataset in this process,
and (first layout only) with the zarr-python reference reader on a few batches. CC12M has 2 176
parts of ~5 500 samples, so a random batch touches a different part for nearly every sample: the
1 024-part layout reads that way, the 4-part one groups many samples per part.

``--s3`` also pushes each cache to an S3-compatible server started on 127.0.0.1 (moto) and reads it
from there through the same loader, for the samples/s of an object-store cache against local disk.
``--text`` adds T5-XXL-width caption tokens (4 096 wide, 8 to 60 tokens per caption, mean ~34) and
stores every feature as int8 with per-token scales, as a CC12M cache would be; it also reports the
read amplification of the caption tokens (bytes of the chunks touched / bytes of the tokens).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import psutil
from synthetic import synthetic_cache

from cache_schema import CacheReader, FastReader
from cache_schema.format.layout import TEXT_CHUNK_TOKENS
from cache_schema.writing.push import push_cache
from stages.train.data import CacheBatchDataset, EpochBatchSampler, make_loader

OUT = Path(__file__).resolve().parent / "out"
TEXT_DIM = 4096  # T5-XXL
S3_BUCKET = "repa-bench"


def text_amplification(reader: FastReader) -> float:
    """Bytes of the inner chunks a caption's tokens lie in, over the bytes of the tokens, for all samples."""
    starts, counts = reader.text_spans()
    first, last = starts // TEXT_CHUNK_TOKENS, (starts + counts - 1) // TEXT_CHUNK_TOKENS
    return float(((last - first + 1) * TEXT_CHUNK_TOKENS).sum() / counts.sum())


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


def measure(args, parts: int, rows: list, reference: bool) -> None:
    """Every read path over the cache of ``parts`` parts; appends table rows."""
    path = args.cache_root / f"reader-{args.samples}s-{parts}p{'-text' if args.text else ''}"
    t0 = time.perf_counter()
    synthetic_cache(path, args.samples, parts, text_dim=TEXT_DIM if args.text else None,
                    codec="int8" if args.text else "fp16")
    print(f"cache     {path} ({args.samples} samples in {parts} parts, ready in {time.perf_counter() - t0:.1f} s)")
    warm = warm_page_cache(path)
    print(f"warmed    {warm / 2**30:.2f} GiB into the page cache; load average {os.getloadavg()[0]:.1f}")

    t0 = time.perf_counter()
    dataset = CacheBatchDataset(path, need_dino=True, need_label=True, need_text=args.text)
    print(f"index     labels and caption spans of {len(dataset)} samples in {time.perf_counter() - t0:.2f} s")
    per_sample = dataset.reader.manifest.bytes_per_sample()
    bytes_per_sample = sum(v for k, v in per_sample.items() if k in dataset.per_sample or k.startswith("text"))
    if args.text:
        print(f"captions  {per_sample['text'] / 1024:.0f} KiB of tokens per sample; chunks of {TEXT_CHUNK_TOKENS} "
              f"tokens read {text_amplification(dataset.reader):.2f}x that")

    def record(what: str, samples: int, seconds: float, cpu: float) -> None:
        rate = samples / seconds
        rows.append((f"{parts} parts: {what}", rate, rate * bytes_per_sample / 1e6, samples / cpu, samples))

    if reference:
        rng = np.random.default_rng(1)
        ref_ids = [rng.choice(len(dataset), args.batch, replace=False) for _ in range(2)]
        ref = CacheReader(path)
        record("zarr-python reference (1 process)", *timed((zarr_reference(ref, ids) for ids in ref_ids), 0, 2))

    sampler = EpochBatchSampler(np.arange(len(dataset)), args.batch, seed=0, name="the synthetic cache")
    batches = (dataset.__getitems__(ids) for ids in sampler)
    t0 = time.perf_counter()
    next(batches)
    print(f"first     batch in this process after {time.perf_counter() - t0:.1f} s (opens the stores it touches)")
    record("FastReader dataset (1 process)", *timed(batches, args.seconds / 2))

    if args.workers > 0:
        # Slots released through weak references to the batch storages (the default where torch allows
        # it); --copy-out also measures the fallback that copies each batch out of its slot on arrival.
        for copy_out in (False, True) if args.copy_out else (False,):
            label = ", copy-out fallback" if copy_out else ""
            record(f"make_loader, {args.workers} workers{label}", *loader_rate(dataset, args, parts, copy_out))
    if args.s3:
        url = f"s3://{S3_BUCKET}/{path.name}"
        t0 = time.perf_counter()
        pushed = push_cache(path, url, threads=8)
        print(f"pushed    {pushed.bytes / 2**20:.0f} MiB to {url} in {time.perf_counter() - t0:.1f} s")
        remote = CacheBatchDataset(url, need_dino=True, need_label=True, need_text=args.text)
        record(f"make_loader, {args.workers} workers, from S3 (local server)",
               *loader_rate(remote, args, parts, False, seconds=args.seconds / 2))


def loader_rate(dataset, args, parts: int, copy_out: bool, seconds: float | None = None) -> tuple:
    """(samples, seconds, CPU seconds) of ``make_loader`` over ``dataset`` in steady state."""
    loader = make_loader(dataset, EpochBatchSampler(np.arange(len(dataset)), args.batch, seed=1), args.workers,
                         copy_out=copy_out)
    t0 = time.perf_counter()
    stream = iter(loader)
    next(stream)
    print(f"workers   {args.workers} started, first batch after {time.perf_counter() - t0:.1f} s")
    # Every worker opens its stores on first touch: time the steady state after a warm-up of roughly one
    # pass over the parts (bounded, so small layouts do not wait for nothing).
    timed(stream, 0, min(max(parts // args.batch * 4, 2), 64))
    result = timed(stream, args.seconds if seconds is None else seconds)
    print(f"recycled  all but {loader.unrecycled_batches} batches read into reused shared memory")
    del stream, loader
    return result


def s3_server() -> None:
    """An S3-compatible server (moto) on 127.0.0.1 for --s3, with the AWS_* variables pointing at it."""
    import logging
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull,
                      AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    boto3.client("s3").create_bucket(Bucket=S3_BUCKET)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--parts", default="4,1024", help="comma-separated part counts, one cache each")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--text", action="store_true", help="T5-XXL-width int8 caption tokens, int8 features")
    ap.add_argument("--copy-out", action="store_true", help="also measure the copy-out fallback of the loader")
    ap.add_argument("--cache-root", type=Path, default=OUT)
    ap.add_argument("--s3", action="store_true", help="also read each cache from an S3-compatible server on "
                    "127.0.0.1 (moto, in memory: keep --samples small, e.g. 2048)")
    args = ap.parse_args()
    if args.s3:
        s3_server()

    rows: list = []
    for i, parts in enumerate(int(p) for p in args.parts.split(",")):
        measure(args, parts, rows, reference=i == 0)

    print(f"\n{'read path':60s} {'samples/s':>10s} {'MB/s':>7s} {'samples/CPU-s':>14s} {'samples':>8s}")
    for what, rate, mbps, per_cpu, samples in rows:
        print(f"{what:60s} {rate:10.0f} {mbps:7.0f} {per_cpu:14.0f} {samples:8d}")
    print(
        f"(batch {args.batch}, fully random ids; samples/CPU-s counts all processes, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )


if __name__ == "__main__":
    main()
