"""Every option of `repa encode`: its default, its help text and its checks, declared once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cache_schema import DEFAULT_SHARD_SIZE, FEATURE_CODECS
from stages.core.data.sample_filters import SampleFilters
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
    cache: Path = option(None, "Output cache directory, or s3://bucket/prefix (endpoint: AWS_ENDPOINT_URL).",
                         metavar="DIR", required=True, default_text="required")
    resolution: int = option(256, "Centre-crop size in pixels (multiple of 16).", gt=0, multiple_of=16)
    vae: str = option("stabilityai/sd-vae-ft-ema", "AutoencoderKL: Hub id or local folder.", metavar="ID|DIR")
    vae_subfolder: str | None = option(None, "Subfolder of --vae holding the VAE (e.g. vae for FLUX.1).")
    dino: str = option(
        "facebook/dinov2-base",
        "DINOv2 model: Hub id or local folder (-small/-base/-large/-giant, -with-registers).", metavar="ID|DIR",
    )
    dino_pos_embed: str = option(
        "antialias-once", "DINOv2 position embedding, resampled to the patch grid of --resolution: antialias-once "
        "(official REPA: bicubic with antialias, as timm's resample_abs_pos_embed), or bicubic-per-call (what "
        "DINOv2's own forward does on every call, as repa-rf runs it: bicubic without antialias at scale "
        "(grid+0.1)/n for DINOv2; with antialias for DINOv2 with registers).",
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
        "stored), or unmasked (as repa-rf: captions padded to --max-text-tokens, encoded without a "
        "mask, every position stored, pads included: --max-text-tokens tokens per sample).",
        choices=TEXT_ATTENTION,
    )
    batch_size: int = option(64, "Images per encoder batch.", gt=0)
    num_workers: int | None = option(
        None, "Decode processes per GPU process.", default_text="CPU cores / processes", ge=0,
    )
    threads: int | None = option(
        None, "torch intra-op threads per process.",
        default_text="cores per process minus decode workers, or OMP_NUM_THREADS", gt=0,
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
        False, "Decode large JPEGs at 1/2, 1/4 or 1/8 scale in the DCT (PIL's draft mode), as long as the image "
        "stays at least --resolution on its short side: about 2x faster on large images, but not the pixels of "
        "a full decode (official REPA decodes at full size); part of the fingerprint.",
    )
    keep: list[str] = option(
        [], "Encode only samples whose json metadata passes FIELD OP NUMBER, e.g. 'aesthetic_score>3' (OP: > >= < "
        "<= == !=; a.b for a nested key; repeat for several); a sample without the field is skipped.",
        metavar="RULE",
    )
    min_size: int | None = option(None, "Skip images whose shorter side is below this many pixels.", gt=0)
    similarity_model: str | None = option(
        None, "CLIP or SigLIP model (Hub id or folder) scoring how well each image matches its caption; the score "
        "is stored per sample (e.g. google/siglip-large-patch16-256).", metavar="ID|DIR|none", none_word=True,
    )
    min_similarity: float | None = option(
        None, "Skip samples whose image-caption similarity (cosine, --similarity-model) is below this "
        "(repa-rf: 0.05 with google/siglip-large-patch16-256).", ge=-1, le=1,
    )
    class_tokens: bool = option(
        False, "Store the class token (and register tokens, when the model has them) of DINOv2, or with "
        "--add-target of the added target, beside its patch tokens (for REG-style alignment).",
        flags=("--class-tokens",),
    )
    flips: bool = option(
        False, "Also store the VAE moments and every alignment target of the horizontally flipped crop (the same "
        "crop, mirrored), for `repa train --flip`; about doubles the bytes per sample of moments and targets.",
        flags=("--flips",),
    )
    add_target: str | None = option(
        None, "Add an alignment target named NAME to the existing --cache: run only --target-model over the "
        "cache's samples (same crop, same order) and store its tokens beside the others; nothing already "
        "stored is re-run or rewritten. --source, when given, says where the cache's input shards are now "
        "(they are matched by content).", metavar="NAME", panel="Adding a target",
    )
    target_model: str | None = option(
        None, "Encoder of --add-target: DINOv2 (any size, with or without registers), or a CLIP or SigLIP model "
        "(its vision tower), Hub id or local folder.", metavar="ID|DIR", panel="Adding a target",
    )
    target_input_size: int | None = option(
        None, "Resize the crop to this many pixels for a CLIP/SigLIP --target-model instead of its processor's "
        "size (its position embedding is interpolated), so that its token grid is the cache's.",
        gt=0, panel="Adding a target",
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
    staging_dir: Path | None = option(
        None, "With --cache s3://bucket/prefix: where each part is built before it is uploaded (a folder per "
        "process is made in it and removed at the end); default: a new temporary folder.", metavar="DIR",
    )
    overwrite: bool = option(False, "Delete what the cache holds and start over.", flags=("--overwrite",))
    dry_run: bool = option(
        False, "Print what would be encoded and the estimated cache size; load no model (but the similarity model "
        "with --min-similarity, to estimate what it removes).", flags=("--dry-run",)
    )

    def check(self) -> None:
        if self.add_target is not None:
            return self._check_add_target()
        if self.target_model is not None or self.target_input_size is not None:
            raise UsageError("--target-model and --target-input-size belong to --add-target NAME; add it, or drop them")
        if not self.source:
            raise UsageError("--source is required: a webdataset shard path, brace pattern or pipe: URL")
        if self.min_similarity is not None and self.similarity_model is None:
            raise UsageError(f"--min-similarity {self.min_similarity} needs --similarity-model (a CLIP or SigLIP "
                             "model, e.g. google/siglip-large-patch16-256)")
        self.sample_filters()  # a malformed --keep rule fails here, before any model loads
        if self.overwrite and (self.redo or self.repair):
            raise UsageError("--overwrite starts over; --redo and --repair keep the rest: give one of them")

    def _check_add_target(self) -> None:
        if self.target_model is None:
            raise UsageError(f"--add-target {self.add_target} needs --target-model (e.g. facebook/dinov2-large)")
        if self.overwrite or self.redo or self.repair:
            raise UsageError("--add-target keeps what the cache holds; drop --overwrite, --redo and --repair")

    def sample_filters(self) -> SampleFilters:
        return SampleFilters.from_options(self.keep, self.min_size)

    def filter_settings(self) -> dict | None:
        """The filters as the manifest and the fingerprint record them (rules canonical, sorted), or None."""
        out: dict[str, list[str] | int | float] = {}
        if self.keep:
            out["keep"] = sorted({rule.text for rule in self.sample_filters().keep})
        if self.min_size is not None:
            out["min_size"] = self.min_size
        if self.min_similarity is not None:
            out["min_similarity"] = self.min_similarity
        return out or None
