"""`repa encode --dry-run`: what would be encoded and how big the cache would be, from model configs (and,
with --min-similarity, the similarity model scoring the first samples)."""

from __future__ import annotations

import io
import tarfile
from collections import Counter

from PIL import Image

from cache_schema import read_manifest
from cache_schema.format.layout import FILTER_SKIP_CODES, MANIFEST_NAME
from cache_schema.format.sizes import caption_tokens, sample_bytes
from stages.core.data.sample_filters import SampleFilters
from stages.core.encoders.images import IMAGE_EXTENSIONS
from stages.core.encoders.load import dino_geometry, hf_config, text_geometry, vae_config, vae_geometry
from stages.core.encoders.tars import is_remote, iter_tar
from stages.core.planning import Geometry, encode_lines

from .config import EncodeConfig
from .plan import identify


def samples_per_shard(url: str) -> int | None:
    """Samples in one local tar, counted from its headers (no image is read)."""
    if is_remote(url):
        return None
    try:
        with tarfile.open(url) as tf:
            keys = {m.name.rsplit(".", 1)[0] for m in tf
                    if m.isreg() and m.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS}
        return len(keys)
    except (OSError, tarfile.TarError):
        return None


FILTER_PROBE_SAMPLES = 2000  # enough for a share to within ~1%; reads json and image headers only


def filter_estimate(url: str, filters: SampleFilters, limit: int = FILTER_PROBE_SAMPLES) -> tuple[int, Counter]:
    """(samples looked at, how many of them each filter removes) over the start of a local shard."""
    seen, removed = 0, Counter[str]()
    for sample in iter_tar(url):
        if seen >= limit:
            break
        seen += 1
        reason = filters.reject_metadata(sample)
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if reason is None and ext is not None:
            try:
                reason = filters.reject_size(*Image.open(io.BytesIO(sample[ext])).size)
            except Exception:  # noqa: BLE001 - an unreadable image is bad input, not a filter's doing
                reason = None
        if reason:
            removed[reason.split(":")[0]] += 1
    return seen, removed


SIMILARITY_PROBE_SAMPLES = 256  # scored with the similarity model itself: a share to within ~3%


def similarity_estimate(cfg: EncodeConfig, url: str, source, threshold: float,
                        limit: int = SIMILARITY_PROBE_SAMPLES) -> tuple[int, int]:
    """(samples scored, how many score below ``threshold``, --min-similarity) over the first samples of a local
    shard that the other filters keep, scored as the encode would score them (same crop, same model)."""
    import torch

    from stages.core.encoders.images import Skipped, prepare_sample
    from stages.core.encoders.load import torch_dtype
    from stages.core.encoders.similarity import SimilarityModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = SimilarityModel(source, torch_dtype(cfg.dtype, device), device)
    filters = cfg.sample_filters()
    images: list[torch.Tensor] = []
    captions: list[str] = []
    for sample in iter_tar(url):
        if len(images) >= limit:
            break
        prepared = prepare_sample(sample, cfg.resolution, cfg.max_pixels, cfg.jpeg_draft, filters)
        if not isinstance(prepared, Skipped):
            images.append(torch.tensor(prepared.image))  # a copy: the decoded array is read-only
            captions.append(prepared.caption)
    below = 0
    for start in range(0, len(images), cfg.batch_size):
        x = torch.stack(images[start : start + cfg.batch_size]).to(device).permute(0, 3, 1, 2)
        below += int((model(x, captions[start : start + cfg.batch_size]) < threshold).sum())
    return len(images), below


def _filter_lines(cfg: EncodeConfig, url: str, spec) -> tuple[list[str], float]:
    """What the filters would remove, estimated from the first shard, and the share of samples they keep."""
    filters = cfg.sample_filters()
    named = {"keep": " ".join(f"--keep '{r.text}'" for r in filters.keep),
             "min_size": f"--min-size {cfg.min_size}" if cfg.min_size is not None else ""}
    active = [k for k, flag in named.items() if flag]
    lines, kept = [], 1.0
    if active and not is_remote(url):
        seen, removed = filter_estimate(url, filters)
        counts = {k: removed[FILTER_SKIP_CODES[k]] for k in active}
        lines.append(f"filters        of the first {seen} samples of {url}: "
                     + ", ".join(f"{named[k]} removes {n} ({n / max(seen, 1):.1%})" for k, n in counts.items()))
        kept = 1 - sum(counts.values()) / max(seen, 1)
    elif active:
        lines.append("filters        not estimated: the first shard is not a local file")
    if cfg.min_similarity is not None and not is_remote(url):
        scored, below = similarity_estimate(cfg, url, spec.similarity, cfg.min_similarity)
        lines.append(f"filters        of the first {scored} samples the other filters keep: --min-similarity "
                     f"{cfg.min_similarity} removes {below} ({below / max(scored, 1):.1%}) (scored with the "
                     "similarity model, the one model a dry run loads)")
        kept *= 1 - below / max(scored, 1)
    elif cfg.min_similarity is not None:
        lines.append("filters        --min-similarity not estimated: the first shard is not a local file")
    return lines, kept


def dry_run(cfg: EncodeConfig, urls: list[str], spec) -> list[str]:
    """What would be encoded and how big the cache would be; reads model configs, never weights (but the
    similarity model's, to estimate what --min-similarity removes)."""
    vae = vae_geometry(vae_config(spec.vae))
    dino = dino_geometry(hf_config("DINOv2", spec.dino), cfg.resolution)
    text = text_geometry(hf_config("text encoder", spec.text)) if spec.text else None
    done = set()
    if (cfg.cache / MANIFEST_NAME).exists() and not cfg.overwrite:
        done = {p["name"] for p in read_manifest(cfg.cache, {}).parts if p.get("complete", True)}  # unreadable: redone
    todo = [s.url for s in identify(urls) if s.part not in done]
    per_shard = samples_per_shard(urls[0])
    estimate = per_shard * len(todo) if per_shard is not None else None
    filter_lines, kept = _filter_lines(cfg, urls[0], spec)
    if estimate is not None:
        estimate = round(estimate * kept)
    if cfg.max_samples is not None:
        estimate = min(estimate, cfg.max_samples) if estimate is not None else cfg.max_samples
    latent_size = cfg.resolution // vae["downsample"]
    unmasked = cfg.text_attention == "unmasked"
    assumed_tokens = caption_tokens(cfg.max_text_tokens, unmasked)
    class_tokens = 1 + dino["registers"] if cfg.class_tokens else 0
    per_sample = sample_bytes(vae["channels"], latent_size, dino["tokens"], dino["dim"], cfg.feature_codec,
                              text["dim"] if text else None, assumed_tokens, bool(cfg.similarity_model), cfg.flips,
                              class_tokens)
    total = sum(per_sample.values())
    lines = [
        f"input shards   {len(urls)} ({len(urls) - len(todo)} already committed, {len(todo)} to encode)",
        f"samples        ~{estimate if estimate is not None else 'unknown'}"
        + (f" ({per_shard} in the first shard x {len(todo)} shards"
           + (f" x {kept:.1%} kept by the filters)" if kept < 1 else ")") if per_shard is not None else ""),
        *filter_lines,
        f"latents        {vae['channels']}x{latent_size}x{latent_size} (moments {2 * vae['channels']} channels)",
        f"dino           {dino['tokens']} tokens x {dino['dim']} ({dino['registers']} registers dropped)",
        "text           " + (f"dim {text['dim']}, up to {cfg.max_text_tokens} tokens" if text else "none"),
    ]
    for name, b in per_sample.items():
        note = ""
        if name == "text":
            note = (f" ({assumed_tokens} tokens per caption, unmasked)" if cfg.text_attention == "unmasked"
                    else f" (assuming ~{assumed_tokens} tokens per caption)")
        if name == "flips":
            note = (f" (moments and dino of the flipped crop: --flips takes the cache from "
                    f"{(total - b) / 1024:.1f} to {total / 1024:.1f} KiB/sample, x{total / (total - b):.2f})")
        lines.append(f"bytes/sample   {name:<8}{b / 1024:10.1f} KiB{note}")
    lines.append(f"bytes/sample   {'total':<8}{total / 1024:10.1f} KiB")
    if estimate is not None:
        lines.append(f"cache size     ~{total * estimate / 2**30:.2f} GiB for {estimate} samples")
    geometry = Geometry(vae["channels"], latent_size, dino["tokens"], dino["dim"], text["dim"] if text else None,
                        assumed_tokens, class_tokens)
    for what, value, basis in encode_lines(geometry, estimate, cfg.feature_codec, cfg.flips, cfg.compile):
        if what == "encode":
            lines.append(f"encode time    {value} on H100s (estimated from {basis})" if value != "not estimated"
                         else f"encode time    not estimated: {basis}")
    loaded = "only the similarity model was loaded" if cfg.min_similarity is not None else "no model was loaded"
    lines.append(f"dry run: {loaded} and nothing was written")
    return lines
