"""Fitting the demo's tiny DINOv2 to the demo images, so that its patch tokens mean what a real one's would.

A random DINOv2 gives REPA nothing to align to. A real one's patch tokens tell which object a patch belongs to,
what it is and where; the demo generator knows exactly that for every pixel (the shapes of each sample's
metadata). So the tiny model is trained, with linear heads that are then dropped, to predict from each patch
token the shape, colour, size and position of the object under that patch (or background), and from the class
token the first shape's class. Its tokens after the final LayerNorm then carry that information linearly, as
REPA's projector reads them. Object-level facts spread over every patch of an object are what the VAE's
8x8-pixel colour blocks lack, which is the situation REPA is built for.

The model is fitted at the demo's geometry: its position table is resampled once to the demo's patch grid
(official REPA's antialias-once, as `repa encode` would) and saved at that size, with ``image_size`` set to
the DINOv2 input of the demo resolution, so the encode stage finds a table of the right size and uses it as is.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .adam_fit import adam_fit
from .data import COLOUR_NAMES, POSITIONS, SHAPES, SIZES, DrawnShape, class_id, draw_shape
from .fit_vae import prepared_demo_samples

# Per-patch targets: index 0 is "background" in each.
TARGETS = {"shape": 1 + len(SHAPES), "colour": 1 + len(COLOUR_NAMES), "size": 1 + len(SIZES),
           "position": 1 + len(POSITIONS)}
CLASSES = len(SHAPES) * len(COLOUR_NAMES)
FIT_LR = 2e-3
OWNED = 0.2  # a patch belongs to the object covering this share of it: demo shapes are about a patch wide


@dataclass
class DemoPatches:
    """Crops as `repa encode` makes them, and per patch the label of each target (N, grid, grid)."""

    images: np.ndarray  # (N, res, res, 3) uint8
    labels: dict[str, np.ndarray]
    classes: np.ndarray  # (N,) the first shape's class id


def _label_mask(meta: dict) -> tuple[Image.Image, list[DrawnShape]]:
    """The image's pixels labelled 1 + index of the shape drawn there (0: background), drawn as the generator
    drew them (later shapes over earlier ones)."""
    shapes = [DrawnShape(**{**s, "centre": tuple(s["centre"])}) for s in meta["shapes"]]
    mask = Image.new("L", (meta["width"], meta["height"]), 0)
    draw = ImageDraw.Draw(mask)
    for i, s in enumerate(shapes):
        draw_shape(draw, s, fill=i + 1)
    return mask, shapes


def _crop_like_adm(mask: Image.Image, resolution: int) -> np.ndarray:
    """``mask`` through the ADM crop's geometry (``center_crop_adm``), with nearest-neighbour resampling."""
    w, h = mask.size
    while min(w, h) >= 2 * resolution:
        w, h = w // 2, h // 2
    scale = resolution / min(w, h)
    arr = np.asarray(mask.resize((round(w * scale), round(h * scale)), resample=Image.Resampling.NEAREST))
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return arr[top : top + resolution, left : left + resolution]


def patch_labels(meta: dict, resolution: int, grid: int) -> dict[str, np.ndarray]:
    """Per patch of a ``grid`` x ``grid`` patching of the crop: each target's label of the object covering most
    of the patch, if it covers at least ``OWNED`` of it (else 0, background)."""
    mask, shapes = _label_mask(meta)
    crop = _crop_like_adm(mask, resolution)
    step = resolution // grid
    out = {name: np.zeros((grid, grid), np.int64) for name in TARGETS}
    for r in range(grid):
        for c in range(grid):
            cell = crop[r * step : (r + 1) * step, c * step : (c + 1) * step]
            counts = np.bincount(cell.ravel(), minlength=len(shapes) + 1)[1:]
            owner = 1 + int(counts.argmax()) if counts.size and counts.max() >= OWNED * cell.size else 0
            if owner:
                s = shapes[owner - 1]
                out["shape"][r, c] = 1 + SHAPES.index(s.shape)
                out["colour"][r, c] = 1 + COLOUR_NAMES.index(s.colour)
                out["size"][r, c] = 1 + list(SIZES).index(s.size)
                out["position"][r, c] = 1 + list(POSITIONS).index(s.position)
    return out


def demo_patches(sources: Iterable[str], resolution: int, grid: int, limit: int) -> DemoPatches:
    """Up to ``limit`` demo samples cropped as `repa encode` crops them (full JPEG decode), with their labels."""
    labels: dict[str, list] = {k: [] for k in TARGETS}
    images, classes = [], []
    for sample, image in prepared_demo_samples(sources, resolution, limit):
        meta = json.loads(sample["json"])
        images.append(image)
        for k, v in patch_labels(meta, resolution, grid).items():
            labels[k].append(v)
        classes.append(class_id(DrawnShape(**{**meta["shapes"][0], "centre": tuple(meta["shapes"][0]["centre"])})))
    return DemoPatches(np.stack(images), {k: np.stack(v) for k, v in labels.items()}, np.array(classes))


def fit_dino(model, data: DemoPatches, resolution: int, steps: int, batch_size: int = 64, lr: float = FIT_LR,
             seed: int = 0, progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``model`` (a transformers Dinov2Model whose table is at the demo grid) with linear heads on the patch
    targets and the class; returns the losses. The heads are dropped."""
    from stages.core.encoders.features import dino_preprocess

    dim = model.config.hidden_size
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, n) for k, n in TARGETS.items()})
    heads["class"] = torch.nn.Linear(dim, CLASSES)
    params = [p for p in model.parameters()] + list(heads.parameters())
    model.embeddings.position_embeddings.requires_grad_(True)
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2)
    labels = {k: torch.from_numpy(v).reshape(len(v), -1) for k, v in data.labels.items()}
    classes = torch.from_numpy(data.classes)

    def batch_loss(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        hidden = model(pixel_values=dino_preprocess(images[idx], resolution)).last_hidden_state
        patches, cls = hidden[:, 1:], hidden[:, 0]
        loss = sum(F.cross_entropy(heads[k](patches).flatten(0, 1), labels[k][idx].flatten()) for k in TARGETS)
        return loss + F.cross_entropy(heads["class"](cls), classes[idx])

    model.train()
    losses = adam_fit(params, batch_loss, len(images), steps, batch_size, lr, seed, progress)
    model.eval()
    return losses


def probe_accuracy(model, data: DemoPatches, resolution: int, epochs: int = 200, seed: int = 0) -> dict[str, float]:
    """How well a fresh linear probe on the frozen patch tokens predicts each target (fitted and scored on
    ``data``: a measure of what the tokens carry, not of generalisation)."""
    from stages.core.encoders.features import dino_preprocess

    with torch.no_grad():
        hidden = model(pixel_values=dino_preprocess(torch.from_numpy(data.images).permute(0, 3, 1, 2), resolution))
        tokens = hidden.last_hidden_state[:, 1:].flatten(0, 1)
    out = {}
    g = torch.Generator().manual_seed(seed)
    for k, n in TARGETS.items():
        y = torch.from_numpy(data.labels[k]).flatten()
        probe = torch.nn.Linear(tokens.shape[1], n)
        torch.nn.init.normal_(probe.weight, std=0.01, generator=g)
        opt = torch.optim.Adam(probe.parameters(), lr=0.05)
        for _ in range(epochs):
            loss = F.cross_entropy(probe(tokens), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[k] = float((probe(tokens).argmax(1) == y).float().mean())
    return out


def fit_demo_dino(dino_dir: Path, source: str, resolution: int, steps: int, batch_size: int = 64,
                  max_images: int = 1024, seed: int = 0, progress=None) -> list[float]:
    """Fit the DINOv2 saved in ``dino_dir`` to the demo shards ``source`` at ``resolution`` and save it back
    (same folder, same class), its position table at the demo's patch grid."""
    from transformers import Dinov2Model

    from stages.core.encoders.library_noise import no_progress_bars
    from stages.core.encoders.load import dino_input_size, resample_position_embedding
    from stages.core.errors import UsageError

    with no_progress_bars():
        model = Dinov2Model.from_pretrained(dino_dir)
    patch = model.config.patch_size
    if not isinstance(patch, int):
        raise UsageError(f"{Path(dino_dir) / 'config.json'}: patch_size {patch!r} is not an int; the demo fit "
                         "needs square patches (rewrite the model with `repa encoders tiny`)")
    size = dino_input_size(resolution)
    grid = size // patch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        resample_position_embedding(model, [grid, grid], "antialias-once")
        model.config.image_size = size
        data = demo_patches([source], resolution, grid, max_images)
        losses = fit_dino(model, data, resolution, steps, batch_size, seed=seed, progress=progress)
    model.embeddings.position_embeddings.requires_grad_(False)
    with no_progress_bars():
        model.save_pretrained(dino_dir)
    return losses
