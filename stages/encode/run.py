"""`repa encode`: run the encoders over a webdataset corpus once and write the feature cache.

One process per GPU (``accelerate launch -m pipeline encode ...``) or one process on CPU. The
input shards not yet committed are dealt out to processes (``todo[rank::world]``), so no two
processes ever write the same file; each process decodes in DataLoader workers, encodes on its
device and writes on a background thread. Rerunning the same command resumes: committed parts are
skipped, unfinished ones are redone from the start of their input shard.
"""

from __future__ import annotations

import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from cache_schema import (
    CacheError,
    cache_fields,
    field_from_json,
    new_manifest,
    part_name,
    read_manifest,
    start_encode,
)
from cache_schema.info import describe
from cache_schema.layout import MANIFEST_NAME
from stages.core.encoders.features import (
    DINO_PREPROCESS_DESCRIPTION,
    EncoderSpec,
    FeatureEncoders,
)
from stages.core.encoders.images import IMAGE_EXTENSIONS, crop_name
from stages.core.encoders.load import (
    ModelSource,
    dino_geometry,
    hf_config,
    text_geometry,
    torch_dtype,
    vae_config,
    vae_geometry,
)
from stages.core.encoders.tars import expand_source, is_remote
from stages.core.options import check

from .config import EncodeConfig
from .part_sink import PartSink, SinkStats
from .source import ShardStream


@dataclass
class EncodeSummary:
    encoded: int = 0
    parts: int = 0
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    cache_samples: int = 0
    lines: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


def encoder_spec(cfg: EncodeConfig) -> EncoderSpec:
    text = ModelSource(cfg.text_encoder, cfg.text_subfolder) if cfg.text_encoder else None
    return EncoderSpec(
        vae=ModelSource(cfg.vae, cfg.vae_subfolder),
        dino=ModelSource(cfg.dino),
        text=text,
        max_text_tokens=cfg.max_text_tokens,
        resolution=cfg.resolution,
    )


def _settings(cfg: EncodeConfig, dtype_name: str, identity: dict) -> dict:
    return {
        "resolution": cfg.resolution,
        "crop": crop_name(cfg.jpeg_draft),
        "vae": identity["vae"],
        "dino": identity["dino"],
        "dino_preprocess": DINO_PREPROCESS_DESCRIPTION,
        "text_encoder": identity["text_encoder"],
        "max_text_tokens": cfg.max_text_tokens if cfg.text_encoder else None,
        "dtype": dtype_name,
        "feature_codec": cfg.feature_codec,
        "shard_size": cfg.shard_size,
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def build_manifest(cfg: EncodeConfig, enc: FeatureEncoders):
    spec = enc.spec
    latent = {**enc.latent, "mean": None, "std": None}
    text = None
    if enc.text_info is not None:
        text = {"dim": enc.text_info["dim"], "kind": enc.text_info["kind"], "max_tokens": cfg.max_text_tokens}
    fields = cache_fields(
        latent["channels"],
        latent["size"],
        enc.dino_info["tokens"],
        enc.dino_info["dim"],
        text["dim"] if text else None,
        cfg.feature_codec,
    )
    encoders = {"vae": spec.vae.to_json(), "dino": spec.dino.to_json()}
    if spec.text is not None:
        encoders["text_encoder"] = spec.text.to_json()
    settings = _settings(cfg, _dtype_name(enc.dtype), enc.identity())
    return new_manifest(settings, latent, enc.dino_info, text, fields, encoders)


def _check_cache_dir(cache: Path) -> None:
    """Fail before loading any model when the cache directory cannot be written."""
    probe = cache if cache.exists() else next((p for p in cache.parents if p.exists()), Path("."))
    if cache.exists() and not cache.is_dir():
        raise CacheError(f"--cache {cache}: exists and is not a directory; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CacheError(f"--cache {cache}: {probe} is not writable; choose a writable directory")
    if cache.is_dir() and (cache / MANIFEST_NAME).exists() and not os.access(cache / MANIFEST_NAME, os.R_OK):
        raise CacheError(f"--cache {cache}: manifest is not readable; fix permissions or choose another directory")


def samples_per_shard(url: str) -> int | None:
    """Samples in one local tar, counted from its headers (no image is read)."""
    if is_remote(url):
        return None
    try:
        with tarfile.open(url) as tf:
            keys = {m.name.rsplit(".", 1)[0] for m in tf if m.isreg() and m.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS}
        return len(keys)
    except (OSError, tarfile.TarError):
        return None


def _default_workers(num_processes: int) -> int:
    return max(1, min(16, (os.cpu_count() or 1) // max(num_processes, 1)))


# -- dry run -----------------------------------------------------------------------------------
def dry_run(cfg: EncodeConfig, urls: list[str]) -> list[str]:
    """What would be encoded and how big the cache would be; reads model configs, never weights."""
    spec = encoder_spec(cfg)
    vae = vae_geometry(vae_config(spec.vae))
    dino = dino_geometry(hf_config("DINOv2", spec.dino), cfg.resolution)
    text = text_geometry(hf_config("text encoder", spec.text)) if spec.text else None
    done = set()
    if (cfg.cache / MANIFEST_NAME).exists() and not cfg.overwrite:
        done = set(read_manifest(cfg.cache).part_names())
    todo = [u for u in urls if part_name(u) not in done]
    per_shard = samples_per_shard(urls[0])
    estimate = per_shard * len(todo) if per_shard is not None else None
    if cfg.max_samples is not None:
        estimate = min(estimate, cfg.max_samples) if estimate is not None else cfg.max_samples
    latent_size = cfg.resolution // vae["downsample"]
    feat_bytes = 1 if cfg.feature_codec == "int8" else 2
    per_sample = {
        "moments": 2 * vae["channels"] * latent_size**2 * 2,
        "dino": dino["tokens"] * dino["dim"] * feat_bytes + (dino["tokens"] * 2 if feat_bytes == 1 else 0),
    }
    assumed_tokens = min(cfg.max_text_tokens, 32)
    if text:
        per_sample["text"] = assumed_tokens * (text["dim"] * feat_bytes + (2 if feat_bytes == 1 else 0)) + 8
    total = sum(per_sample.values())
    lines = [
        f"input shards   {len(urls)} ({len(urls) - len(todo)} already committed, {len(todo)} to encode)",
        f"samples        ~{estimate if estimate is not None else 'unknown'}"
        + (f" ({per_shard} in the first shard x {len(todo)} shards)" if per_shard is not None else ""),
        f"latents        {vae['channels']}x{latent_size}x{latent_size} (moments {2 * vae['channels']} channels)",
        f"dino           {dino['tokens']} tokens x {dino['dim']} ({dino['registers']} registers dropped)",
        "text           " + (f"dim {text['dim']}, up to {cfg.max_text_tokens} tokens" if text else "none"),
    ]
    for name, b in per_sample.items():
        note = f" (assuming ~{assumed_tokens} tokens per caption)" if name == "text" else ""
        lines.append(f"bytes/sample   {name:<8}{b / 1024:10.1f} KiB{note}")
    lines.append(f"bytes/sample   {'total':<8}{total / 1024:10.1f} KiB")
    if estimate is not None:
        lines.append(f"cache size     ~{total * estimate / 2**30:.2f} GiB for {estimate} samples")
    lines.append("dry run: no model was loaded and nothing was written")
    return lines


# -- the real thing ----------------------------------------------------------------------------
def run_encode(cfg: EncodeConfig, log=print) -> EncodeSummary:
    from accelerate import PartialState
    from accelerate.utils import gather_object

    check(cfg)
    cfg.cache = Path(cfg.cache)
    urls = expand_source(cfg.source)
    if cfg.dry_run:
        return EncodeSummary(lines=dry_run(cfg, urls))
    _check_cache_dir(cfg.cache)

    state = PartialState(cpu=not torch.cuda.is_available())
    device = state.device
    dtype = torch_dtype(cfg.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    enc = FeatureEncoders(encoder_spec(cfg), device, dtype, compile=cfg.compile, batch_size=cfg.batch_size)
    template = build_manifest(cfg, enc)
    if state.is_main_process:
        start_encode(cfg.cache, template, cfg.overwrite)
    state.wait_for_everyone()
    manifest = read_manifest(cfg.cache)
    if manifest.fingerprint != template.fingerprint:
        raise CacheError(f"{cfg.cache}: process {state.process_index} computed another fingerprint; encoders differ between processes")

    done = set(manifest.part_names())
    todo = [u for u in urls if part_name(u) not in done]
    mine = todo[state.process_index :: state.num_processes]
    limit = None
    if cfg.max_samples is not None:
        limit = cfg.max_samples // state.num_processes + (state.process_index < cfg.max_samples % state.num_processes)
    workers = cfg.num_workers if cfg.num_workers is not None else _default_workers(state.num_processes)
    workers = min(workers, len(mine))
    if state.is_main_process:
        log(f"encode: {len(urls)} input shards, {len(done)} already committed, {len(todo)} to do "
            f"on {state.num_processes} process(es) x {workers} decode worker(s), device {device}, {_dtype_name(dtype)}")

    stream = ShardStream(mine, cfg.batch_size, cfg.resolution, cfg.max_pixels, cfg.jpeg_draft, limit)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
        pin_memory=device.type == "cuda",
    )
    per_shard = samples_per_shard(todo[0]) if todo else None
    total = per_shard * len(todo) if per_shard else None
    if cfg.max_samples is not None:
        total = min(total or cfg.max_samples, cfg.max_samples)
    bar = tqdm(total=total, unit="img", disable=not state.is_main_process, dynamic_ncols=True, desc="encode")
    sink = PartSink(cfg.cache, _fields_of(manifest), cfg.shard_size)
    start = time.perf_counter()
    try:
        for batch in loader:
            host, ready = {}, None
            if len(batch):
                feats = enc.encode(torch.as_tensor(batch.images), batch.captions, cfg.feature_codec)
                host = {k: v.to("cpu", non_blocking=True) for k, v in feats.items()}
                if device.type == "cuda":
                    ready = torch.cuda.Event()
                    ready.record()
            sink.submit(batch, host, ready)
            # Other processes run at about the same rate; scale so the bar tracks the whole job.
            bar.update(len(batch) * state.num_processes)
            bar.set_postfix(skipped=sum(sink.stats.skipped.values()) * state.num_processes, refresh=False)
        stats = sink.close()
    except BaseException:
        sink.abort()
        bar.close()
        raise
    bar.close()
    elapsed = time.perf_counter() - start
    all_stats: list[SinkStats] = gather_object([stats]) if state.num_processes > 1 else [stats]
    state.wait_for_everyone()
    summary = EncodeSummary(seconds=elapsed)
    for s in all_stats:
        summary.encoded += s.encoded
        summary.parts += s.parts
        summary.skipped.update(s.skipped)
    final = read_manifest(cfg.cache)
    summary.cache_samples = final.num_samples
    summary.lines = _summary_lines(summary, final)
    return summary


def _fields_of(manifest):
    return {name: field_from_json(name, spec) for name, spec in manifest.fields.items()}


def _summary_lines(s: EncodeSummary, manifest) -> list[str]:
    skipped = ", ".join(f"{r}={c}" for r, c in sorted(s.skipped.items())) or "none"
    per_sample = sum(manifest.bytes_per_sample().values())
    lines = [
        f"encoded {s.encoded} samples into {s.parts} part(s) in {s.seconds:.1f} s ({s.rate:.1f} img/s)",
        f"skipped {sum(s.skipped.values())}: {skipped}",
        f"cache now holds {manifest.num_samples} samples in {len(manifest.parts)} parts, "
        f"{per_sample / 1024:.1f} KiB/sample of features",
        "",
        *describe(manifest),
    ]
    return lines

