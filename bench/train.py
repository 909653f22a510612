"""Stage-two throughput: training fed from the cache against the same step on batches already in memory.

    python bench/train.py                    # CPU, a small SiT on tiny synthetic samples (make bench-train)
    python bench/train.py --real [--compile] # GPU: SiT-XL/2 + REPA, SD-VAE/DINOv2-B-sized cache (bench/train_gpu.sh)

Writes a synthetic class-labelled cache on the spot (random moments and DINOv2 tokens of the real
sizes), then runs
  1. in memory: the training step (``Trainer.step``: forward, backward, update and EMA, exactly the
     loop's code) on one batch resident on the device;
  2. cache-fed: ``run_train`` for the same model and batch, reading random batches through the
     DataLoader; its img/s is taken from metrics.jsonl after the warm-up window;
and prints both rates and their ratio (target on an H100: >= 0.97).
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cache_schema import (
    PartWriter,
    cache_fields,
    new_manifest,
    read_manifest,
    start_encode,
)
from stages.core.codec import features_to_device
from stages.train.config import TrainConfig
from stages.train.data import CacheBatchDataset
from stages.train.loop import build_trainer, make_accelerator, run_train
from stages.train.metrics import read_metrics
from stages.train.setup import build_model_config

OUT = Path(__file__).resolve().parent / "out"


def synthetic_cache(path: Path, samples: int, channels: int, size: int, tokens: int, dim: int, classes: int = 1000) -> Path:
    """A class-labelled fp16 cache of random features with the given geometry (kept between runs)."""
    if (path / "manifest.json").exists() and read_manifest(path).num_samples == samples:
        return path
    shutil.rmtree(path, ignore_errors=True)
    fields = cache_fields(channels, size, tokens, dim, None, "fp16")
    settings = dict(resolution=size * 8, crop="synthetic", vae={"weights": "random"}, dino={"weights": "random"},
                    dino_preprocess="none", text_encoder=None, max_text_tokens=None, dtype="bf16",
                    feature_codec="fp16", shard_size=1024)
    grid = int(tokens**0.5)
    manifest = new_manifest(settings, dict(channels=channels, size=size, downsample=8, scaling_factor=0.18215,
                                           shift_factor=0.0, mean=None, std=None),
                            dict(dim=dim, tokens=tokens, grid=[grid, grid], registers=0), None, fields)
    start_encode(path, manifest, overwrite=True)
    rng = np.random.default_rng(0)
    per_part, chunk = 4096, 512
    for p in range(0, samples, per_part):
        w = PartWriter(path, f"part-{p // per_part:04d}", f"synthetic-{p // per_part}", fields, 1024)
        for start in range(p, min(p + per_part, samples), chunk):
            n = min(chunk, samples - start, p + per_part - start)
            moments = rng.standard_normal((n, 2 * channels, size, size), dtype=np.float32)
            moments[:, channels:] = np.abs(moments[:, channels:]) * 0.1
            w.append(dict(key=[f"{start + i:09d}" for i in range(n)], source_index=np.arange(n), caption=[""] * n,
                          label=rng.integers(0, classes, n), moments=moments.astype(np.float16),
                          dino=rng.standard_normal((n, tokens, dim), dtype=np.float32).astype(np.float16)))
        w.commit()
    return path


def in_memory_rate(cfg: TrainConfig, steps: int, warmup: int) -> float:
    """img/s of the loop's own step (``Trainer.step``) on one batch resident on the device: the upper
    bound for cache-fed training."""
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    manifest = read_manifest(cfg.cache)
    dataset = CacheBatchDataset(cfg.cache, need_dino=cfg.repa_lambda > 0, need_label=True)
    labels = dataset.reader.read("label", np.arange(len(dataset)))
    trainer = build_trainer(cfg, accelerator, build_model_config(cfg, manifest, "class", labels), "class",
                            manifest.latent)
    batches = itertools.repeat(features_to_device(dataset.__getitems__(np.arange(cfg.batch_size)), device))
    for i in range(warmup):
        trainer.step(i + 1, batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        trainer.step(warmup + i + 1, batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * cfg.batch_size / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", action="store_true", help="SiT-XL/2 + REPA on an SD-VAE/DINOv2-B-sized cache (GPU)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None, help="steps before timing starts (compilation, caches)")
    ap.add_argument("--samples", type=int, default=None, help="samples in the synthetic cache")
    args = ap.parse_args()

    if args.real:
        cache = synthetic_cache(OUT / "train-cache-xl", args.samples or 8192, 4, 32, 256, 768)
        model = dict(model="SiT-XL/2")
        batch, steps, warmup, workers = args.batch_size or 64, args.steps or 60, args.warmup or 15, args.workers or 8
    else:
        cache = synthetic_cache(OUT / "train-cache-small", args.samples or 2048, 4, 16, 64, 64, classes=10)
        model = dict(model=None, width=128, depth=4, head_dim=32, align_layer=2, projector_dim=256)
        batch, steps, warmup, workers = args.batch_size or 32, args.steps or 30, args.warmup or 5, args.workers or 1
    cfg = TrainConfig(cache=cache, run_dir=OUT / "train-run", cond="class", batch_size=batch, steps=warmup + steps,
                      log_every=warmup, val_every=10**9, ckpt_every=10**9, val_fraction=0.0, num_workers=workers,
                      report_to="none", overwrite=True, compile=args.compile, **model)
    memory = in_memory_rate(cfg, steps, warmup)
    run_train(cfg, log=lambda m: None)
    fed = [r["img_per_s"] for r in read_metrics(cfg.run_dir) if r["kind"] == "train"][1:]  # skip the warm-up window
    fed_rate = statistics.median(fed)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print()
    print(f"device {name}, {cfg.model or f'width {cfg.width} depth {cfg.depth}'} + REPA, batch {batch}, "
          f"{workers} loader workers, compile={args.compile}")
    print(f"{'in memory (one resident batch)':<40}{memory:10.1f} img/s")
    print(f"{'fed from the cache (random batches)':<40}{fed_rate:10.1f} img/s")
    print(f"{'ratio cache-fed / in-memory':<40}{fed_rate / memory:10.2f}")


if __name__ == "__main__":
    main()
