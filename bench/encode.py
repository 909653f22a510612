"""Stage-one throughput: the whole `repa encode` pipeline against the encoders alone, on the same batches.

    python bench/encode.py                 # CPU, tiny encoders (make bench-encode)
    python bench/encode.py --real          # GPU: SD-VAE + DINOv2-B architectures, random init (bench/encode_gpu.sh)

Writes synthetic JPEG shards (natural-image-sized, distinct per sample) and random-init encoders
under bench/out/, then measures
  1. encoders alone: ``FeatureEncoders.encode`` on batches already in device memory;
  2. end to end: ``run_encode`` (decode workers, crop, encode, D2H, background zarr writes) into a
     fresh cache;
and prints both rates and their ratio (the pipeline's efficiency; the target on an H100 is >= 0.9),
plus the decode workers' rate alone, which bounds the pipeline from the other side.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from stages.core.encoders.features import EncoderSpec, FeatureEncoders
from stages.core.encoders.images import prepare_sample
from stages.core.encoders.load import ModelSource, torch_dtype
from stages.core.encoders.tars import expand_source, iter_tar
from stages.core.runtime.cuda_settings import fast_cuda_math
from stages.encode.config import EncodeConfig
from stages.encode.run import run_encode
from stages.encode.source import ShardStream

OUT = Path(__file__).resolve().parent / "out"


def real_models(out: Path) -> dict[str, Path]:
    """Random-init models with the real SD-VAE and DINOv2-B architectures (no download needed)."""
    from diffusers import AutoencoderKL
    from transformers import Dinov2Config, Dinov2Model

    paths = {"vae": out / "sd-vae-arch", "dino": out / "dinov2-base-arch"}
    paths["target"] = paths["dino"]  # added as a second target: the cost of a DINOv2-B-sized one
    if not (paths["vae"] / "config.json").exists():
        AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, sample_size=256, scaling_factor=0.18215,
        ).save_pretrained(paths["vae"])
    if not (paths["dino"] / "config.json").exists():
        Dinov2Model(Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                 patch_size=14, image_size=518)).save_pretrained(paths["dino"])
    return paths


def synthetic_shards(out: Path, shards: int, per_shard: int, size: tuple[int, int], seed: int = 0) -> str:
    """JPEG shards of smooth random images (decode cost like photos of that size); distinct per sample."""
    out.mkdir(parents=True, exist_ok=True)
    pattern = str(out / f"bench-{{0000..{shards - 1:04d}}}.tar")
    if (out / f"bench-{shards - 1:04d}.tar").exists():
        return pattern
    rng = np.random.default_rng(seed)
    w, h = size
    for s in range(shards):
        with wds.TarWriter(str(out / f"bench-{s:04d}.tar")) as tw:
            for i in range(per_shard):
                coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
                img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                tw.write({"__key__": f"{s:05d}{i:04d}", "jpg": buf.getvalue(),
                          "txt": f"image {i} of shard {s}".encode()})
    return pattern


def encoders_alone(cfg: EncodeConfig, pattern: str, batches: int, device: torch.device) -> float:
    """img/s of the encoders on pre-decoded batches resident on the device (same crops as the pipeline)."""
    spec = EncoderSpec(ModelSource(cfg.vae), ModelSource(cfg.dino), None, cfg.max_text_tokens, cfg.resolution)
    enc = FeatureEncoders(spec, device, torch_dtype(cfg.dtype, device), compile=cfg.compile, batch_size=cfg.batch_size)
    images = []
    for sample in iter_tar(expand_source(pattern)[0]):
        images.append(prepare_sample(sample, cfg.resolution, cfg.max_pixels, cfg.jpeg_draft).image)
        if len(images) == cfg.batch_size:
            break
    x = torch.from_numpy(np.stack(images)).to(device)
    captions = [""] * len(images)

    def once():
        out = enc.encode(x, captions, cfg.feature_codec)
        for v in out.values():
            v.to("cpu")  # include the device-to-host copy the pipeline also pays

    for _ in range(2):  # warm-up (and compilation)
        once()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batches * len(images) / (time.perf_counter() - start)


def decode_alone(cfg: EncodeConfig, pattern: str) -> float:
    """img/s of the decode + crop workers alone (the same DataLoader the pipeline uses)."""
    urls = expand_source(pattern)
    stream = ShardStream(urls, cfg.batch_size, cfg.resolution, cfg.max_pixels, cfg.jpeg_draft)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=min(cfg.num_workers, len(urls)))
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch)
    return n / (time.perf_counter() - start)


def writer_cost(out: Path, samples: int = 4096, batch: int = 128, per_part: int = 1024) -> tuple[float, float]:
    """CPU milliseconds per sample of the write path alone (PartSink: rows into shard buffers, tensorstore
    shard writes, commits with fsync and records), for SD-VAE + DINOv2-B sized features (16 + 384 KiB), and
    the wall time of the slowest commit. The encode loop only submits, so process CPU = the writer's."""
    from cache_schema import cache_fields, new_manifest, start_encode
    from stages.encode.part_sink import PartSink
    from stages.encode.plan import Shard
    from stages.encode.source import Batch, ShardEnd

    cache = out / "writer-cache"
    shutil.rmtree(cache, ignore_errors=True)
    fields = cache_fields(4, 32, 256, 768, None, "fp16")
    settings = dict(resolution=256, crop="adm", vae={}, dino={}, dino_preprocess="x", text_encoder=None,
                    max_text_tokens=None, dtype="bf16", feature_codec="fp16", shard_size=1024)
    start_encode(cache, new_manifest(settings, dict(channels=4, size=32, downsample=8, scaling_factor=0.18215,
                                                    shift_factor=0.0), dict(dim=768, tokens=256, grid=[16, 16]),
                                     None, fields), overwrite=True)
    rng = np.random.default_rng(0)
    features = {"moments": rng.random((batch, 8, 32, 32), np.float32).astype(np.float16),
                "dino": rng.random((batch, 256, 768), np.float32).astype(np.float16),
                "nonfinite": np.zeros(batch, np.uint8)}
    urls = [f"part-{i:04d}.tar" for i in range(samples // per_part)]
    sink = PartSink(cache, fields, 1024, {u: Shard(u, u, u.removesuffix(".tar")) for u in urls})
    cpu0, done = time.process_time(), 0
    for i in range(0, samples, batch):
        url = urls[i // per_part]
        b = Batch(images=torch.empty(0, dtype=torch.uint8), keys=[f"{i + j:08d}" for j in range(batch)],
                  urls=[url] * batch, indices=list(range(i % per_part, i % per_part + batch)), captions=[""] * batch,
                  labels=[0] * batch)
        if (i + batch) % per_part == 0:
            b.ended.append(ShardEnd(url, per_part))
        sink.submit(b, features, None)  # the sink only reads them
        done += batch
    sink.close()
    return (time.process_time() - cpu0) / done * 1e3, sink.stats.parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", action="store_true", help="real SD-VAE + DINOv2-B architectures at 256 px (GPU)")
    ap.add_argument("--shards", type=int, default=None)
    ap.add_argument("--per-shard", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--codec", default="fp16")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fast_cuda_math(device)  # what run_encode applies, here before anything is timed
    if args.real:
        models = real_models(OUT / "models-real")
        batch, workers = args.batch_size or 128, args.workers or 14
        compile_ = True if args.compile is None else args.compile
        # Whole shards per worker, two each: no worker idles while another finishes a shard alone.
        shards, per_shard, res, size = args.shards or 2 * workers, args.per_shard or 512, 256, (500, 375)
    else:
        from stages.demo.tiny_encoders import write_tiny_encoders

        tiny = OUT / "models-tiny"
        models = write_tiny_encoders(tiny) if not (tiny / "dino-reg").exists() else {
            name: tiny / name for name in ("vae", "dino", "dino-reg")}
        models["target"] = models["dino-reg"]
        shards, per_shard, res, size = args.shards or 4, args.per_shard or 128, 128, (320, 240)
        batch, workers, compile_ = args.batch_size or 32, args.workers or 1, bool(args.compile)
    if shards % workers:
        print(f"note: {shards} shards over {workers} workers: the last shards are decoded by fewer workers")
    pattern = synthetic_shards(OUT / f"shards-{shards}x{per_shard}-{size[0]}x{size[1]}", shards, per_shard, size)
    cfg = EncodeConfig(source=pattern, cache=OUT / "cache", resolution=res, vae=str(models["vae"]),
                       dino=str(models["dino"]), batch_size=batch, num_workers=workers, compile=compile_,
                       feature_codec=args.codec, overwrite=True)

    cold_ms, _ = writer_cost(OUT)  # first use: shard buffers are allocated and faulted in
    writer_ms, writer_parts = writer_cost(OUT)  # steady state: an encode reuses its buffers for every part
    alone = encoders_alone(cfg, pattern, batches=8 if args.real else 4, device=device)
    decode = decode_alone(cfg, pattern)
    shutil.rmtree(cfg.cache, ignore_errors=True)
    summary = run_encode(cfg, log=lambda m: None)
    ratio = summary.steady_rate / alone
    # Adding a target to that cache: the images are decoded again, only the target encoder runs.
    added = run_encode(dataclasses.replace(cfg, overwrite=False, add_target="bench-target",
                                           target_model=str(models["target"])), log=lambda m: None)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print()
    print(f"device {name}, {'SD-VAE + DINOv2-B architectures' if args.real else 'tiny encoders'}, {res} px, "
          f"batch {batch}, {workers} decode workers, compile={compile_}, codec {args.codec}")
    print(f"{'encoders alone (batches in device memory)':<46}{alone:10.1f} img/s")
    print(f"{'decode + crop workers alone':<46}{decode:10.1f} img/s")
    print(f"{'end to end, steady state (first to last batch)':<46}{summary.steady_rate:10.1f} img/s  "
          f"({summary.encoded} images)")
    print(f"{'end to end, whole run (start-up, final commits)':<46}{summary.rate:10.1f} img/s")
    print(f"{'ratio end-to-end steady / encoders-alone':<46}{ratio:10.2f}  (target >= 0.9 on a GPU)")
    print(f"{'--add-target (decode + one encoder + write)':<46}{added.rate:10.1f} img/s  "
          f"(whole run, {added.rate / summary.rate:.2f}x the full encode's)")
    print(f"{'writer CPU, SD-VAE + DINOv2-B sized rows':<46}{writer_ms:10.3f} ms/sample  ({writer_parts} parts, "
          f"target <= 1; {cold_ms:.3f} while its buffers are first allocated)")
    if device.type == "cpu":
        # On the CPU, decoding and encoding share the same cores, so the best possible end-to-end rate
        # is the harmonic combination of the two, not the encoder rate.
        shared = 1 / (1 / alone + 1 / decode)
        print(f"{'CPU bound when both share the cores':<46}{shared:10.1f} img/s  "
              f"(end to end = {summary.steady_rate / shared:.2f} of it)")


if __name__ == "__main__":
    main()
