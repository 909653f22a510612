"""Turning one webdataset sample into a centre-cropped uint8 image, caption and label, or a skip reason.

Runs in DataLoader worker processes (CPU). The crop is the ADM / EDM2 "center-crop-dhariwal":
halve with a BOX filter while the short side is at least twice the target, resize with BICUBIC
so the short side equals the target, then take the centre square. With ``draft`` a JPEG is first
decoded at 1/2, 1/4 or 1/8 scale in the DCT (never below the target size), which roughly doubles
throughput on large images; it is part of the cache fingerprint because pixels differ slightly.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from stages.core.data.sample_filters import SampleFilters

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
Image.MAX_IMAGE_PIXELS = None  # the pixel limit is ours (max_pixels), checked before decoding


@dataclass
class Prepared:
    key: str
    image: np.ndarray  # (res, res, 3) uint8
    caption: str
    label: int


@dataclass
class Skipped:
    key: str | None
    reason: str  # "<code>: <detail>"; the code (before the colon) is what summaries count


def crop_name(draft: bool) -> str:
    return "adm-center" + ("+jpeg-draft" if draft else "")


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for every mode found in the wild: CMYK, grayscale, 16-bit, palette, and alpha (on white)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img) + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def center_crop_adm(img: Image.Image, resolution: int) -> np.ndarray:
    while min(img.size) >= 2 * resolution:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    scale = resolution / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return arr[top : top + resolution, left : left + resolution]


def decode_image(data: bytes, resolution: int, max_pixels: int, draft: bool,
                 filters: SampleFilters | None = None) -> np.ndarray | str:
    """The cropped image, or a skip reason (``filters``: its minimum size, read from the header)."""
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return "decode-error: not a recognised image format"
    except Exception as e:
        return _error_reason(e)
    w, h = img.size
    if w * h > max_pixels:
        return f"too-large: {w}x{h} exceeds --max-pixels {max_pixels}"
    if filters is not None and (reason := filters.reject_size(w, h)):
        return reason
    if min(w, h) < resolution / 8:
        return f"too-small: {w}x{h} below 1/8 of the resolution {resolution}"
    try:
        if draft and img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK"):
            img.draft(img.mode, (resolution, resolution))
        img.load()
        img = to_rgb(img)
        return center_crop_adm(img, resolution)
    except Exception as e:  # PIL raises a zoo of errors on corrupt data (OSError, SyntaxError, ValueError, ...)
        return _error_reason(e)


def _error_reason(e: Exception) -> str:
    if "truncated" in str(e).lower():
        return f"truncated-image: {e}"
    return f"decode-error: {type(e).__name__}: {e}"


def _caption(sample: dict) -> str | Skipped:
    if "txt" in sample:
        try:
            return sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            return Skipped(sample["__key__"], f"bad-caption: txt is not UTF-8 ({e.reason} at byte {e.start})")
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return Skipped(sample["__key__"], f"bad-caption: json metadata unreadable ({e})")
        cap = meta.get("caption") if isinstance(meta, dict) else None
        if cap is not None and not isinstance(cap, str):
            return Skipped(sample["__key__"], "bad-caption: json caption is not a string")
        return (cap or "").strip()
    return ""


def _label(sample: dict) -> int | Skipped:
    if "cls" not in sample:
        return -1
    try:
        value = int(sample["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return Skipped(sample["__key__"], f"bad-label: cls {sample['cls'][:20]!r} is not an integer")
    if value < 0:
        return Skipped(sample["__key__"], f"bad-label: negative class {value}")
    return value


def prepare_sample(sample: dict, resolution: int, max_pixels: int, draft: bool,
                   filters: SampleFilters | None = None) -> Prepared | Skipped:
    """The cropped image, caption and label of a sample, or why it is skipped: bad input first, then the
    --keep rules (metadata only), then the image checks (size from the header, then decoding)."""
    key = sample.get("__key__")
    if key is None:
        return Skipped(None, "missing-key: the sample has no __key__ to store it under")
    if "__duplicate__" in sample:
        return Skipped(key, f"duplicate-entry: {key}.{sample['__duplicate__']} appears twice in the shard")
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        return Skipped(key, "missing-image: no jpg/jpeg/png/webp entry")
    caption = _caption(sample)
    if isinstance(caption, Skipped):
        return caption
    label = _label(sample)
    if isinstance(label, Skipped):
        return label
    if filters is not None and (reason := filters.reject_metadata(sample)):
        return Skipped(key, reason)
    image = decode_image(sample[ext], resolution, max_pixels, draft, filters)
    if isinstance(image, str):
        return Skipped(key, image)
    return Prepared(key, image, caption, label)
