"""Synthetic caches of real feature sizes for the benchmarks: random values, real layout.

Timing uncompressed reads and training steps needs the sizes and the layout of a real cache, not its
values, so features are uniform random numbers (cheap to make) written through the real writer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from cache_schema import CacheError, PartWriter, cache_fields, new_manifest, read_manifest, start_encode
from stages.core.runtime.progress import progress_bar

SHARD = 1024
TEXT_TOKENS = (8, 60)  # caption lengths drawn uniformly: mean ~34 T5 tokens, like CC12M's captions


def random_fp16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.random(shape, np.float32).astype(np.float16)


def random_int8(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(-127, 128, shape, dtype=np.int8)


def rows(rng: np.random.Generator, start: int, n: int, fields: dict, classes: int) -> dict:
    """``n`` samples (global numbers from ``start``) holding every field of ``fields``."""
    out = dict(key=[f"{i:09d}" for i in range(start, start + n)], caption=[""] * n,
               label=rng.integers(0, classes, n) if classes else np.full(n, -1))
    lengths = rng.integers(TEXT_TOKENS[0], TEXT_TOKENS[1] + 1, n)
    for name, f in fields.items():
        if not f.sharded:
            continue
        make = random_int8 if f.dtype == "int8" else random_fp16
        if f.per_sample:
            out[name] = make(rng, (n,) + f.inner_shape)
        else:  # caption tokens: one array per sample
            out[name] = [make(rng, (int(k),) + f.inner_shape) for k in lengths]
    if "moments" in out:  # the std half of VAE moments is positive
        c = out["moments"].shape[1] // 2
        out["moments"][:, c:] = np.abs(out["moments"][:, c:]) * 0.1
    return out


def synthetic_cache(path: Path, samples: int, parts: int, latent: tuple[int, int] = (4, 32),
                    dino: tuple[int, int] = (256, 768), text_dim: int | None = None, codec: str = "fp16",
                    classes: int = 1000, class_tokens: int = 0) -> Path:
    """Write (or keep, when one with the same geometry is there) a cache of ``samples`` in ``parts`` parts:
    VAE moments of ``latent`` (channels, size), DINOv2 tokens of ``dino`` (tokens, dim), captions of
    ``text_dim`` when given, features stored as ``codec``, labels in ``range(classes)`` (0: none), with
    ``class_tokens`` DINOv2 class tokens (REG reads them)."""
    fields = cache_fields(latent[0], latent[1], dino[0], dino[1], text_dim, codec, class_tokens=class_tokens)
    try:
        m = read_manifest(path)
        if m.num_samples == samples and len(m.parts) == parts and set(m.fields) == set(fields):
            return path
    except CacheError:
        pass
    shutil.rmtree(path, ignore_errors=True)
    settings = dict(
        resolution=latent[1] * 8, crop="adm", vae={"id": "synthetic"}, dino={"id": "synthetic"},
        dino_preprocess="none", text_encoder={"id": "synthetic"} if text_dim else None,
        max_text_tokens=TEXT_TOKENS[1] if text_dim else 0, dtype="bf16", feature_codec=codec, shard_size=SHARD,
        **({"class_tokens": True} if class_tokens else {}),
    )
    latent_meta = dict(channels=latent[0], size=latent[1], downsample=8, scaling_factor=0.18215, shift_factor=0.0,
                       mean=None, std=None)
    grid = int(dino[0] ** 0.5)
    text_meta = dict(dim=text_dim, kind="t5", max_tokens=TEXT_TOKENS[1]) if text_dim else None
    manifest = new_manifest(settings, latent_meta, dict(tokens=dino[0], dim=dino[1], grid=[grid, grid], registers=0),
                            text_meta, fields)
    start_encode(path, manifest, overwrite=False)
    rng = np.random.default_rng(0)
    bounds = np.linspace(0, samples, parts + 1).astype(int)
    spans = list(zip(bounds[:-1], bounds[1:], strict=True))
    for p, (lo, hi) in enumerate(progress_bar(spans, desc=f"writing {path.name}", unit="part")):
        writer = PartWriter(path, f"part{p:05d}", f"synthetic-{p:05d}.tar", fields, SHARD)
        for start in range(lo, hi, 256):
            n = min(256, hi - start)
            writer.append(dict(source_index=np.arange(start - lo, start - lo + n),
                               **rows(rng, start, n, fields, classes)))
        writer.commit()
    return path
