"""Every option of `repa encode`: its default, its help text and its checks, declared once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cache_schema import DEFAULT_SHARD_SIZE, FEATURE_CODECS
from stages.core.errors import UsageError
from stages.core.options import option

ENCODER_DTYPES = ("auto", "bf16", "fp16", "fp32")
DINO_POS_EMBED = ("antialias-once", "bicubic-per-call")
TEXT_ATTENTION = ("masked", "unmasked")


@dataclass
class EncodeConfig:
    source: str = option(
        "", "Webdataset shards: path, brace pattern (data/cc12m-train-{0000..2175}.tar), glob or pipe: URL.",
        metavar="PATTERN",
    )
    cache: Path = option(None, "Output cache directory.", metavar="DIR", required=True, default_text="required")
    resolution: int = option(256, "Centre-crop size in pixels (multiple of 16).", gt=0, multiple_of=16)
    vae: str = option("stabilityai/sd-vae-ft-ema", "AutoencoderKL: Hub id or local folder.", metavar="ID|DIR")
    vae_subfolder: str | None = option(None, "Subfolder of --vae holding the VAE (e.g. vae for FLUX.1).")
    dino: str = option(
        "facebook/dinov2-base",
        "DINOv2 model: Hub id or local folder (-small/-base/-large/-giant, -with-registers).", metavar="ID|DIR",
    )
    dino_pos_embed: str = option(
        "antialias-once", "DINOv2 position embedding: antialias-once (official REPA: resampled once to the "
        "patch grid of --resolution, bicubic with antialias, as timm's resample_abs_pos_embed), or "
        "bicubic-per-call (the model as loaded: transformers re-interpolates on every call; bicubic without "
        "antialias for DINOv2, the seed project's behaviour; with antialias for DINOv2 with registers).",
        choices=DINO_POS_EMBED,
    )
    text_encoder: str | None = option(
        None, "T5 encoder or CLIP text model (Hub id or folder), or none.", metavar="ID|DIR|none", none_word=True,
    )
    text_subfolder: str | None = option(
        None, "Subfolder of --text-encoder (e.g. text_encoder_2); the tokenizer is read from the matching "
        "tokenizer folder.",
    )
    max_text_tokens: int = option(128, "Truncate captions to this many tokens.", gt=0)
    text_attention: str = option(
        "masked", "Caption encoding: masked (the text encoder sees an attention mask; only real tokens are "
        "stored), or unmasked (as the seed project: captions padded to --max-text-tokens, encoded without a "
        "mask, every position stored, pads included: --max-text-tokens tokens per sample).",
        choices=TEXT_ATTENTION,
    )
    batch_size: int = option(64, "Images per encoder batch.", gt=0)
    num_workers: int | None = option(
        None, "Decode processes per GPU process.", default_text="CPU cores / processes", ge=0,
    )
    dtype: str = option(
        "auto", "Encoder precision: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32.", choices=ENCODER_DTYPES,
    )
    feature_codec: str = option(
        "fp16", "Storage of DINOv2 and caption features: fp16, or int8 with a per-token scale (half the bytes).",
        choices=FEATURE_CODECS,
    )
    compile: bool = option(False, "torch.compile the VAE and DINOv2.")
    max_samples: int | None = option(None, "Stop after this many samples (trial runs).", gt=0)
    max_pixels: int = option(64_000_000, "Skip images with more pixels than this.", gt=0)
    jpeg_draft: bool = option(
        True, "Decode large JPEGs at reduced DCT scale (about 2x faster; part of the fingerprint).",
    )
    shard_size: int = option(DEFAULT_SHARD_SIZE, "Samples per zarr shard file.", gt=0)
    redo: list[str] = option(
        [], "Encode this part again (part name or input shard; repeat for several), keeping the rest.",
        metavar="PART|SHARD",
    )
    repair: bool = option(
        False, "Check every committed part of --source in full first and encode again those that fail.",
        flags=("--repair",),
    )
    lease_seconds: float = option(
        300.0, "Seconds without a heartbeat after which a shard claimed by a process on another machine is "
        "taken over (a dead process on this machine is taken over at once).", gt=0,
    )
    overwrite: bool = option(False, "Delete what the cache holds and start over.", flags=("--overwrite",))
    dry_run: bool = option(
        False, "Print what would be encoded and the estimated cache size; load no model.", flags=("--dry-run",)
    )

    def check(self) -> None:
        if not self.source:
            raise UsageError("--source is required: a webdataset shard path, brace pattern or pipe: URL")
        if self.overwrite and (self.redo or self.repair):
            raise UsageError("--overwrite starts over; --redo and --repair keep the rest: give one of them")
