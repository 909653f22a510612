"""From latents to pictures: the cache's VAE, PNG and grid writing, and `repa decode-previews`.

Latents are in the model's normalised space; the VAE sees ``latents / scaling_factor + shift_factor``
(per channel, ``latents * std + mean``, where the VAE's config holds its latent statistics: the inverse of
what training applied) and returns [-1, 1], mapped to uint8 exactly as official REPA's
``generate.py`` does (``255 * (x + 1) / 2``, clipped, then truncated by the cast), so FID is computed on
the same pixels. The VAE runs in float32.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cache_schema import CacheError, CacheReader, Manifest, read_manifest
from cache_schema.storage.fsutil import atomic_write_json
from stages.core.diffusion.objective import latent_normalisation
from stages.core.errors import UsageError
from stages.core.files.grids import tile
from stages.core.files.run_files import PREVIEW_DIR, read_run_config

IMAGE_NAME = "{:06d}.png"
PREVIEW_REFERENCE = "reference.png"
PREVIEW_NAME = re.compile(r"^step-(\d{7,})\.pt$")

#################################################################################
#                               Cache and its VAE                               #
#################################################################################


def resolve_cache(recorded: str, override: Path | None, fingerprint: str | None) -> tuple[Path, Manifest]:
    """The cache a run trained on (or ``override``) and its manifest, checked against the run's fingerprint."""
    cache = Path(override) if override is not None else Path(recorded)
    try:
        manifest = read_manifest(cache)
    except CacheError as e:
        hint = "" if override is not None else "; pass --cache DIR if the cache has moved"
        raise UsageError(f"{e}{hint}") from None
    if fingerprint and manifest.fingerprint != fingerprint:
        raise UsageError(
            f"cache {cache} has fingerprint {manifest.fingerprint[:12]}, the run trained on {fingerprint[:12]}; "
            "pass --cache with the cache the run was trained on"
        )
    return cache, manifest


class LatentDecoder:
    """The VAE named by a cache manifest, turning normalised latents into uint8 (B, 3, H, W) images."""

    def __init__(self, manifest: Manifest, device: torch.device):
        from stages.core.encoders.load import ModelSource, load_vae

        source = manifest.encoders.get("vae")
        if not source:
            raise UsageError("the cache manifest does not say where its VAE came from; re-encode the cache")
        self.vae = load_vae(ModelSource(**source), torch.float32, device)
        scale, shift = latent_normalisation(manifest.latent)
        self.scale, self.shift = as_factor(scale, device), as_factor(shift, device)
        self.device = device

    @torch.no_grad()
    def __call__(self, latents: Tensor) -> Tensor:
        x = self.vae.decode(latents.to(self.device, torch.float32) / self.scale + self.shift).sample
        return to_pixels(x)


def as_factor(value: float | Tensor, device: torch.device) -> float | Tensor:
    """A scalar factor stays a Python float; a per-channel one moves to where the latents are decoded."""
    return value.to(device) if isinstance(value, Tensor) else float(value)


def real_images(cache: Path, ids, decoder: LatentDecoder) -> tuple[np.ndarray, list[str]]:
    """Samples ``ids`` of ``cache`` decoded from their stored latents (the posterior mean) by ``decoder``:
    uint8 (N, H, W, 3) and their captions (or class ids). What generated images can look like at best."""
    from cache_schema import CacheReader

    reader = CacheReader(cache)
    samples = [reader.sample(int(i)) for i in ids]
    channels = int(reader.manifest.latent["channels"])
    mean = torch.from_numpy(np.stack([s["moments"][:channels] for s in samples]).astype(np.float32))
    images = decoder((mean.to(decoder.device) - decoder.shift) * decoder.scale).permute(0, 2, 3, 1).cpu().numpy()
    captions = [s["caption"] or (f"class {int(s['label'])}" if int(s["label"]) >= 0 else "") for s in samples]
    return images, captions


def to_pixels(x: Tensor) -> Tensor:
    """[-1, 1] -> uint8 as official REPA: scale, clip, truncate (not round)."""
    return torch.clamp(255.0 * (x + 1) / 2, 0, 255).to(torch.uint8)


#################################################################################
#                                  Image files                                  #
#################################################################################


def check_outputs(paths: Iterable[Path], overwrite: bool) -> None:
    """Refuse to replace a file written earlier unless ``overwrite``; the error names the first one."""
    if overwrite:
        return
    existing = [p for p in paths if Path(p).exists()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UsageError(f"{existing[0]} exists{more}; pass --overwrite to replace it, or choose another --out")


def save_png(image: Tensor | np.ndarray, path: Path) -> None:
    """Write a uint8 (3, H, W) image; through a temporary file, so a killed run leaves no half PNG."""
    array = image.permute(1, 2, 0).numpy() if isinstance(image, Tensor) else np.asarray(image)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:  # a stop signal or a full disk: no hidden half file left behind
        tmp.unlink(missing_ok=True)
        raise


def grid_image(images: Sequence[np.ndarray], columns: int | None = None, pad: int = 2) -> Image.Image:
    """HWC uint8 images tiled row by row on a white background (``columns`` default: no empty cell where
    a near-square allows it)."""
    return Image.fromarray(tile(images, columns, pad))


CAPTION_CELL = 176  # pixels: small images are enlarged (nearest) to about this width so a caption fits below
CAPTION_FONT = 11


def _wrap(text: str, font, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def captioned_grid(images: Sequence[np.ndarray], captions: Sequence[str], pad: int = 4) -> Image.Image:
    """HWC uint8 images tiled with each one's caption written below it (wrapped to the cell)."""
    from PIL import ImageDraw, ImageFont

    h, w = images[0].shape[:2]
    scale = max(1, CAPTION_CELL // w)
    w, h = w * scale, h * scale
    font = ImageFont.load_default(size=CAPTION_FONT)
    wrapped = [_wrap(c, font, w) for c in captions]
    line_h = CAPTION_FONT + 3
    text_h = line_h * max(len(lines) for lines in wrapped) + pad
    cells = []
    for image, lines in zip(images, wrapped, strict=True):
        cell = Image.new("RGB", (w, h + text_h), (255, 255, 255))
        cell.paste(Image.fromarray(image).resize((w, h), Image.Resampling.NEAREST), (0, 0))
        draw = ImageDraw.Draw(cell)
        for k, line in enumerate(lines):
            draw.text((0, h + 2 + k * line_h), line, fill=(0, 0, 0), font=font)
        cells.append(np.asarray(cell))
    return Image.fromarray(tile(cells, pad=pad))


def grid_picture(images: Sequence[np.ndarray], captions: Sequence[str | None] | None = None) -> Image.Image:
    """The images as one grid; with ``captions`` (one per image, none missing or empty), each written below its
    image."""
    texts = [c for c in captions or () if c]
    return captioned_grid(images, texts) if captions and len(texts) == len(captions) else grid_image(images)


def write_grid(files: Sequence[Path], out: Path, captions: Sequence[str | None] | None = None) -> None:
    grid_picture([np.asarray(Image.open(f).convert("RGB")) for f in files], captions).save(out)


#################################################################################
#                            `repa decode-previews`                             #
#################################################################################


def preview_files(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / PREVIEW_DIR
    found = sorted((int(m.group(1)), p) for p in folder.glob("step-*.pt") if (m := PREVIEW_NAME.match(p.name)))
    if not found:
        raise UsageError(f"{folder}: no preview latents (step-*.pt); train with --preview-every N to save them")
    return [p for _, p in found]


def run_cache(run_dir: Path, override: Path | None) -> tuple[Path, Manifest]:
    """The cache a run trained on (or ``override``), from its config.json: no checkpoint is loaded."""
    info = read_run_config(run_dir)
    return resolve_cache(info["config"]["cache"], override, info.get("cache_fingerprint"))


def load_preview(path: Path) -> dict:
    """A preview file's contents, loaded without running any code stored in it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{path}: not a loadable preview file ({type(e).__name__}); delete it or retrain") from None


def decode_previews(run_dir: Path, cache: Path | None = None, overwrite: bool = False,
                    device: torch.device | None = None, log=print) -> list[Path]:
    """Decode each ``previews/step-XXXXXXX.pt`` into ``step-XXXXXXX.png`` (a grid) and a ``.json`` sidecar
    with the keys, captions and labels of its images. Steps decoded earlier are kept unless ``overwrite``."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    previews = preview_files(run_dir)
    todo = [p for p in previews if overwrite or not p.with_suffix(".png").exists()]
    if len(todo) < len(previews):
        log(f"{len(previews) - len(todo)} preview step(s) already decoded; --overwrite decodes them again")
    if not todo:
        return []
    cache_dir, manifest = run_cache(run_dir, cache)
    decoder = LatentDecoder(manifest, device)
    written = []
    for path in todo:
        preview = load_preview(path)
        images = decoder(preview["latents"]).permute(0, 2, 3, 1).cpu().numpy()
        png = path.with_suffix(".png")
        grid_picture(list(images), preview["captions"]).save(png)
        reference = path.parent / PREVIEW_REFERENCE
        if overwrite or not reference.exists():  # the same held-out samples, real, through the same VAE
            position = {str(k): i for i, k in enumerate(CacheReader(cache_dir).keys)}
            ids = [position[k] for k in preview["keys"] if k in position]
            if ids:
                real, captions = real_images(cache_dir, ids, decoder)
                grid_picture(list(real), captions).save(reference)
                log(f"wrote {reference} (the previews' held-out samples through the same VAE)")
        atomic_write_json(path.with_suffix(".json"), {
            "step": preview["step"], "image": png.name,
            "images": [{"key": k, "caption": c, "label": lab}
                       for k, c, lab in zip(preview["keys"], preview["captions"], preview["labels"], strict=True)],
        })
        written.append(png)
        log(f"decoded {path.name} -> {png}")
    return written
