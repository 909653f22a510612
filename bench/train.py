"""Stage-two throughput: training fed from the cache against the same step on batches already in memory.

    python bench/train.py                    # CPU, a small SiT on tiny synthetic samples (make bench-train)
    python bench/train.py --real [--compile] [--cond text]
                                             # GPU: SiT-XL/2 + REPA, SD-VAE/DINOv2-B-sized cache (bench/train_gpu.sh)

Writes a synthetic cache on the spot (random moments and DINOv2 tokens of the real sizes; class
labels, or with ``--cond text`` T5-XXL-width int8 caption tokens of 8-60 tokens), then runs
  1. in memory: the training step (``Trainer.step``: forward, backward, update and EMA, exactly the
     loop's code) on one batch resident on the device, timed between two device synchronisations;
  2. cache-fed: ``run_train`` for the same model and batch, reading random batches through the
     DataLoader; its rate is taken over the logged windows after the warm-up (each window ends with
     a device synchronisation: the loop's finiteness check reads a flag from the device);
and prints both rates and their ratio (target for SiT-XL/2 compiled on an H100: >= 0.97, >= 560 img/s);
  3. each --method (REPA's successors, docs/methods.md) in memory the same way, its rate against REPA's: the
     cost of REG's extra token, iREPA's conv projector and z-score, the dispersive term;
  4. RAE's DiT-DH (docs/rae.md; DiTDH-XL with --real, a small one on CPU) in memory, diffusing the cache's
     DINOv2 tokens (``--diffuse dino``), against the SiT without REPA (``--method sit``) on the VAE latents.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from pathlib import Path

import numpy as np
import torch
from synthetic import synthetic_cache

from cache_schema import read_manifest
from cache_schema.writing.push import push_cache
from stages.core.diffusion.diffusion_variable import TargetTokens
from stages.core.diffusion.token_stats import LatentStats
from stages.core.diffusion.token_target import target_tokens
from stages.core.runtime.threads import set_threads
from stages.train.config import TrainConfig
from stages.train.data import CacheBatchDataset
from stages.train.loop import build_trainer, make_accelerator, run_train
from stages.train.methods import NEUTRAL
from stages.train.metrics import read_metrics
from stages.train.prefetch import DevicePrefetcher
from stages.train.rae_tokens import diffused_target
from stages.train.setup import build_model_config

OUT = Path(__file__).resolve().parent / "out"


def in_memory_rate(cfg: TrainConfig, steps: int, warmup: int) -> float:
    """img/s of the loop's own step (``Trainer.step``) on one batch resident on the device: the upper
    bound for cache-fed training, with the torch threads the loop gives itself beside its loader workers."""
    set_threads(cfg.threads, cfg.num_workers)
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    manifest = read_manifest(cfg.cache)
    text = cfg.cond == "text"
    variable = token_variable(cfg, manifest) if cfg.diffuse else None
    reads = dict(need_dino=True, targets=[cfg.diffuse], need_moments=False) if variable else {}
    dataset = CacheBatchDataset(cfg.cache, **{**dict(need_dino=cfg.repa_lambda > 0, need_label=not text, need_text=text,
                                                     class_tokens=cfg.class_token_weight > 0), **reads})
    labels = dataset.reader.read("label", np.arange(len(dataset)))
    model_cfg = build_model_config(cfg, manifest, cfg.cond, labels, variable.shape if variable else None)
    trainer = build_trainer(cfg, accelerator, model_cfg, cfg.cond, manifest.latent, variable)
    text_length = manifest.settings["max_text_tokens"] if cfg.compile and text else None  # as the loop pads
    host = dataset.__getitems__(np.arange(cfg.batch_size // cfg.batch_multiplicity))  # the distinct images
    batches = itertools.repeat(next(DevicePrefetcher(iter([host]), device, text_length)))
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


def token_variable(cfg: TrainConfig, manifest) -> TargetTokens:
    """--diffuse's variable with unit statistics: the step's cost does not depend on their values, and
    computing them over the cache would time a pass over it too."""
    record = diffused_target(cfg, manifest)
    shape = (record["dim"], record["grid"][0], record["grid"][1])
    return target_tokens(cfg.diffuse, record, LatentStats(torch.zeros(shape), torch.ones(shape)))


def fed_from(cfg: TrainConfig, warmup: int) -> tuple[float, int]:
    """(img/s over the synchronised windows after the warm-up, steps timed) of ``run_train`` with ``cfg``."""
    run_train(cfg, log=lambda m: None)
    records = [r for r in read_metrics(cfg.run_dir) if r["kind"] == "train" and r["step"] > warmup]
    # Images over seconds across the timed windows (equal lengths): the harmonic mean of their rates.
    return len(records) / sum(1 / r["img_per_s"] for r in records), records[-1]["step"] - warmup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", action="store_true", help="SiT-XL/2 + REPA on an SD-VAE/DINOv2-B-sized cache (GPU)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--cond", choices=("class", "text"), default="class")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None, help="steps before timing starts (compilation, caches)")
    ap.add_argument("--samples", type=int, default=None, help="samples in the synthetic cache")
    ap.add_argument("--methods", default="sit,repa,reg,irepa,dispersive,reg+irepa",
                    help="--method values timed in memory against repa, comma-separated ('' for none)")
    ap.add_argument("--dit-dh", action=argparse.BooleanOptionalAction, default=True,
                    help="also time RAE's DiT-DH (DiTDH-XL with --real) in memory on the cache's DINOv2 tokens "
                    "(--diffuse dino) against the SiT without REPA; class conditioning only")
    ap.add_argument("--s3", default=None, metavar="URL",
                    help="also train from the cache pushed to this s3://bucket/prefix "
                    "(credentials and AWS_ENDPOINT_URL from the environment)")
    args = ap.parse_args()

    text = dict(text_dim=4096, codec="int8") if args.cond == "text" else {}
    if args.real:
        cache = synthetic_cache(OUT / f"train-cache-xl-{args.cond}", args.samples or 8192, 8, class_tokens=1, **text)
        model = dict(model="SiT-XL/2")
        dit_dh = dict(model="DiTDH-XL")  # RAE's ImageNet-256 model on 16x16x768 tokens, the bench cache's DINOv2-B
        batch, steps, warmup, workers = args.batch_size or 64, args.steps or 200, args.warmup or 40, args.workers or 8
    else:
        text = dict(text_dim=64) if args.cond == "text" else {}
        cache = synthetic_cache(OUT / f"train-cache-small-{args.cond}", args.samples or 2048, 2, latent=(4, 16),
                                dino=(64, 64), classes=10, class_tokens=1, **text)
        model = dict(model=None, width=128, depth=4, head_dim=32, align_layer=2, projector_dim=256)
        dit_dh = dict(model=None, arch="dit-dh", width=128, depth=4, head_dim=32, head_width=192, head_depth=1)
        batch, steps, warmup, workers = args.batch_size or 32, args.steps or 30, args.warmup or 6, args.workers or 1
    window = max(steps // 5, 1)  # several synchronised windows after the warm-up one
    cfg = TrainConfig(cache=cache, run_dir=OUT / "train-run", cond=args.cond, batch_size=batch,
                      steps=warmup + window * (steps // window), log_every=window if warmup % window == 0 else warmup,
                      val_every=10**9, ckpt_every=10**9, val_fraction=0.0, num_workers=workers, report_to="none",
                      overwrite=True, compile=args.compile, **model)
    memory = in_memory_rate(cfg, steps, warmup)
    fed_rate, timed_steps = fed_from(cfg, warmup)
    remote_rate = None
    if args.s3:  # the same cache on object storage (pushed once), the same run otherwise
        push_cache(cache, args.s3)
        remote_rate, _ = fed_from(dataclasses.replace(cfg, cache=args.s3), warmup)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print()
    print(f"device {name}, {cfg.model or f'width {cfg.width} depth {cfg.depth}'} + REPA, {args.cond} conditioning, "
          f"batch {batch}, {workers} loader workers, compile={args.compile}, {timed_steps} timed steps")
    print(f"{'in memory (one resident batch)':<40}{memory:10.1f} img/s")
    print(f"{'fed from the cache (random batches)':<40}{fed_rate:10.1f} img/s")
    print(f"{'ratio cache-fed / in-memory':<40}{fed_rate / memory:10.2f}")
    if remote_rate is not None:
        print(f"{'fed from ' + args.s3:<40}{remote_rate:10.1f} img/s  (ratio {remote_rate / memory:.2f})")
    methods = [m for m in args.methods.split(",") if m]
    if methods:
        rates = {m: in_memory_rate(dataclasses.replace(cfg, method=m, **dict.fromkeys(NEUTRAL)), steps, warmup)
                 for m in dict.fromkeys(["repa", *methods])}  # unset options: each method's own values
        print(f"\n{'--method (in memory)':<40}{'img/s':>10}  vs repa")
        for m in methods:
            print(f"{m:<40}{rates[m]:10.1f}  {rates[m] / rates['repa']:6.2f}")
    if args.dit_dh and args.cond == "class":  # RAE's networks are class-conditional or unconditional
        sit = in_memory_rate(dataclasses.replace(cfg, method="sit", **dict.fromkeys(NEUTRAL)), steps, warmup)
        rae = in_memory_rate(dataclasses.replace(cfg, method="sit", **dict.fromkeys(NEUTRAL), diffuse="dino", **dit_dh),
                             steps, warmup)
        m = read_manifest(cache)
        latent, tokens = m.latent, m.target("dino")
        name = dit_dh["model"] or (f"DiT-DH {dit_dh['width']}/{dit_dh['head_width']} x "
                                   f"{dit_dh['depth']}/{dit_dh['head_depth']}")
        print(f"\n{'RAE, in memory (no REPA)':<40}{'img/s':>10}  vs sit")
        vae_shape = f"{latent['channels']}x{latent['size']}x{latent['size']}"
        token_shape = "x".join(str(n) for n in (tokens["dim"], *tokens["grid"]))
        print(f"{f'sit on the VAE latents ({vae_shape})':<40}{sit:10.1f}  {1:6.2f}")
        print(f"{f'{name} on dino ({token_shape})':<40}{rae:10.1f}  {rae / sit:6.2f}")


if __name__ == "__main__":
    main()
