"""Every knob of `repa encode`, with its default and what it means."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cache_schema import DEFAULT_SHARD_SIZE, FEATURE_CODECS, UsageError


@dataclass
class EncodeConfig:
    source: str = ""  # webdataset shards: path, brace pattern (data/cc12m-train-{0000..2175}.tar) or pipe: URL
    cache: Path = Path("cache/demo")  # output cache directory
    resolution: int = 256  # centre-crop size in pixels (multiple of 16; 256 and 512 are the usual)
    vae: str = "stabilityai/sd-vae-ft-ema"  # AutoencoderKL: Hub id or local folder
    vae_subfolder: str | None = None  # e.g. "vae" for black-forest-labs/FLUX.1-schnell
    dino: str = "facebook/dinov2-base"  # DINOv2 (-small/-base/-large/-giant, -with-registers variants)
    text_encoder: str | None = None  # T5 encoder or CLIP text model: Hub id or folder; None = no captions
    text_subfolder: str | None = None  # e.g. "text_encoder_2" for the T5 of a FLUX repository
    max_text_tokens: int = 128  # captions are truncated to this many tokens
    batch_size: int = 64  # images per encoder batch
    num_workers: int | None = None  # decode processes per GPU; None = all CPU cores shared between processes
    dtype: str = "auto"  # encoder precision: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32
    feature_codec: str = "fp16"  # fp16 or int8 (per-token absmax scale) for DINOv2 and caption features
    compile: bool = False  # torch.compile the VAE and DINOv2 (about 2.5x faster VAE on H100)
    max_samples: int | None = None  # stop after this many encoded samples (trial runs; parts cut short stay short)
    max_pixels: int = 64_000_000  # skip images with more pixels than this (decompression bombs, panoramas)
    jpeg_draft: bool = True  # decode large JPEGs at reduced DCT scale before the crop (about 2x faster)
    shard_size: int = DEFAULT_SHARD_SIZE  # samples per zarr shard file
    overwrite: bool = False  # delete what the cache holds and start over
    dry_run: bool = False  # print what would be encoded and the estimated size; load no model

    def validate(self) -> None:
        if not self.source:
            raise UsageError("--source is required: a webdataset shard path, brace pattern or pipe: URL")
        if self.resolution <= 0 or self.resolution % 16:
            raise UsageError(f"--resolution {self.resolution}: must be a positive multiple of 16 (256, 512)")
        if self.batch_size <= 0:
            raise UsageError(f"--batch-size {self.batch_size}: must be positive")
        if self.feature_codec not in FEATURE_CODECS:
            raise UsageError(f"--feature-codec {self.feature_codec!r}: choose one of {', '.join(FEATURE_CODECS)}")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise UsageError(f"--dtype {self.dtype!r}: choose auto, bf16, fp16 or fp32")
        if self.max_text_tokens <= 0:
            raise UsageError(f"--max-text-tokens {self.max_text_tokens}: must be positive")
        if self.shard_size <= 0:
            raise UsageError(f"--shard-size {self.shard_size}: must be positive")
        if self.max_samples is not None and self.max_samples <= 0:
            raise UsageError(f"--max-samples {self.max_samples}: must be positive")
