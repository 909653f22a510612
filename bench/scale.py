"""What grows with the corpus: part commits, manifest load, `cache info`, the training index.

    python bench/scale.py [--parts 2176 --report 22,218,2176 --samples-per-part 5500 --skip-rate 0.005]
    python bench/scale.py --existing   # start-up figures of the cache already written

Writes a cache shaped like CC12M's (2 176 parts; tiny features, but real keys and captions, and each
part's record carries the skip list of a real ~5 500-sample part at ``--skip-rate``) one part at a
time, and at each part count in ``--report`` measures the costs that scale with the corpus: the
commit time (against commits into a fresh cache at the same moment), manifest load, `repa cache
info`, the training index (labels of every sample, read once), the validation split, the memory they
take, and `repa cache verify --quick`. With the default 5 500 samples per part the report points are
CC12M at 1 %, 10 % and 100 % (120 k, 1.2 M, 12 M samples). A commit publishes one part and writes
one small record, so its cost must stay flat however many parts are already there.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import psutil
from tqdm import tqdm

from cache_schema import FastReader, PartWriter, cache_fields, new_manifest, read_manifest, start_encode
from cache_schema.operations.info import describe
from cache_schema.operations.verify import find_problems
from stages.core.data.split import split_cache
from stages.core.runtime.progress import progress_bar

OUT = Path(__file__).resolve().parent / "out"
REAL_PART_SAMPLES = 5_500  # CC12M: ~12 M samples over 2 176 shards


def tiny_cache(path: Path) -> dict:
    """A fresh cache with CC12M's metadata fields and tiny features; returns its fields."""
    shutil.rmtree(path, ignore_errors=True)
    fields = cache_fields(4, 2, 4, 8, None, "fp16")
    settings = dict(
        resolution=256, crop="adm", vae={"id": "synthetic"}, dino={"id": "synthetic"}, dino_preprocess="none",
        text_encoder=None, max_text_tokens=0, dtype="fp16", feature_codec="fp16", shard_size=1024,
    )
    latent = dict(channels=4, size=2, scaling_factor=0.18215, shift_factor=0.0, mean=None, std=None)
    start_encode(path, new_manifest(settings, latent, dict(tokens=4, dim=8, grid=[2, 2]), None, fields),
                 overwrite=False)
    return fields


def write_part(path: Path, fields: dict, p: int, n: int, skips: int, rng: np.random.Generator) -> float:
    """Write part ``p`` with ``n`` samples and ``skips`` recorded skips; returns the commit's seconds."""
    url = f"s3://bucket/cc12m/cc12m-train-{p:04d}.tar"
    writer = PartWriter(path, f"cc12m-train-{p:04d}", url, fields, 1024)
    keys = [f"{p:04d}{i:05d}" for i in range(n)]
    writer.append(dict(
        key=keys, source_index=np.arange(n), label=np.full(n, -1),
        caption=[f"a photograph of thing {i} in part {p}, with a caption about as long as CC12M's" for i in range(n)],
        moments=rng.random((n, 8, 2, 2), np.float32).astype(np.float16),
        dino=rng.random((n, 4, 8), np.float32).astype(np.float16),
    ))
    for i in range(skips):
        writer.skip(f"{p:04d}{n + i:05d}", n + i, "decode-error: cannot identify image file (synthetic)")
    t0 = time.perf_counter()
    writer.commit()
    return time.perf_counter() - t0


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def start_up(cache: Path) -> tuple:
    """(parts, samples, skips, manifest s, info s, index s, split s, index MiB): what `repa cache info`
    and a training process read before the first batch (labels, the split), and the memory it takes."""
    manifest, load = timed(lambda: read_manifest(cache))
    _, info = timed(lambda: describe(read_manifest(cache)))
    rss0 = psutil.Process().memory_info().rss
    reader = FastReader(cache)
    _, index = timed(reader.load_index)
    _, split = timed(lambda: split_cache(reader, 0.01))
    rss = (psutil.Process().memory_info().rss - rss0) / 2**20
    problems, quick = timed(lambda: find_problems(cache, quick=True))
    if problems:
        raise SystemExit(f"verify --quick found damage: {next(iter(problems.values()))}")
    return len(manifest.parts), manifest.num_samples, len(manifest.skipped), load, info, index, split, rss, quick


HEADER = (f"{'parts':>6} {'samples':>9} {'skips':>7} {'commit ms':>10} {'(empty cache)':>14} {'ratio':>6} "
          f"{'manifest s':>11} {'info s':>7} {'index s':>8} {'split s':>8} {'start-up s':>11} {'index MiB':>10} "
          f"{'quick s':>8}")


def format_row(big, small, parts, samples, skipped, load, info, index, split, rss, quick) -> str:
    return (f"{parts:6d} {samples:9d} {skipped:7d} {big:10.1f} {small:14.1f} {big / small:6.2f} {load:11.2f} "
            f"{info:7.2f} {index:8.2f} {split:8.2f} {load + index + split:11.2f} {rss:10.0f} {quick:8.1f}")


def commit_times(path: Path, fields: dict, first: int, count: int, skips: int, rng) -> list[float]:
    return [write_part(path, fields, first + i, 8, skips, rng) for i in range(count)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", type=int, default=2176)
    ap.add_argument("--report", default="22,218,2176", help="part counts at which to measure")
    ap.add_argument("--samples-per-part", type=int, default=5500, help="CC12M: ~5 500")
    ap.add_argument("--skip-rate", type=float, default=0.005, help="skipped share of a real 5 500-sample part")
    ap.add_argument("--window", type=int, default=20, help="commits timed at each report point")
    ap.add_argument("--cache", type=Path, default=OUT / "scale-cache")
    ap.add_argument("--existing", action="store_true", help="only measure start-up on the cache already there")
    args = ap.parse_args()

    if args.existing:
        parts, samples, skipped, load, info, index, split, rss, quick = start_up(args.cache)
        print(f"{parts} parts, {samples} samples, {skipped} skips: manifest {load:.2f} s, info {info:.2f} s, "
              f"labels {index:.2f} s, split {split:.2f} s, start-up {load + index + split:.2f} s, {rss:.0f} MiB; "
              f"verify --quick {quick:.1f} s")
        return
    report = sorted({int(r) for r in args.report.split(",") if int(r) <= args.parts})
    skips = round(REAL_PART_SAMPLES * args.skip_rate)
    fields = tiny_cache(args.cache)
    # Commit time is mostly fsync, which follows the machine's I/O load: each measurement interleaves
    # commits into the growing cache with commits into a small reference cache made at the same moment.
    reference = args.cache.with_name(args.cache.name + "-reference")
    tiny_cache(reference)
    rng = np.random.default_rng(0)
    rows, extra = [], 10**6  # timed parts get numbers beyond the cache's own
    tqdm.write(HEADER)
    done = 0
    for target in report:
        for p in progress_bar(range(done, target), desc=f"parts to {target}", unit="part"):
            write_part(args.cache, fields, p, args.samples_per_part, skips, rng)
        done = target
        big, small = [], []
        for _ in range(args.window):
            big += commit_times(args.cache, fields, extra, 1, skips, rng)
            small += commit_times(reference, fields, extra, 1, skips, rng)
            extra += 1
        row = (1e3 * float(np.median(big)), 1e3 * float(np.median(small)), *start_up(args.cache))
        rows.append(row)
        tqdm.write(format_row(*row))
        shutil.rmtree(reference)
        tiny_cache(reference)

    print(f"\n{skips} skip records per part ({args.skip_rate:.1%} of {REAL_PART_SAMPLES}), "
          f"{args.samples_per_part} samples per part; commit: median of {args.window}")
    print(HEADER)
    for row in rows:
        print(format_row(*row))
    print("(ratio: a commit into this cache over one into a fresh cache at the same moment; flat is ~1. "
          "start-up: what training reads before its first batch: manifest, labels, split; quick: verify --quick)")


if __name__ == "__main__":
    main()
