"""Synthetic captioned images in the CC12M webdataset layout, for running the pipeline offline.

Each image shows one or two flat shapes on a solid or gradient background, and its caption says
in words what was drawn ("a large red circle on the left, on a light blue background"). That is
easy enough for a small diffusion model to learn and lets a test check that captions match pixels:
the JSON metadata carries every shape's centre and colour.

The shards look like img2dataset output: ``{prefix}-0000.tar`` … with ``KEY.jpg``, ``KEY.txt`` and
``KEY.json`` per sample (plus ``KEY.cls`` with ``labels=True``, as ImageNet webdatasets carry),
keys ``f"{shard:05d}{index:04d}"``. Every byte is a function of ``seed``: samples are drawn from
a generator seeded with (seed, shard, index) and tar members get a fixed mtime.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 25),
    "green": (35, 150, 55),
    "blue": (30, 65, 210),
    "purple": (125, 40, 175),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
# Muted tones, so every shape colour stands out from every background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "light blue": (170, 205, 230),
    "light grey": (200, 200, 200),
    "beige": (225, 210, 175),
    "dark grey": (85, 85, 90),
    "pale green": (180, 215, 170),
}
SIZES: dict[str, float] = {"small": 0.11, "large": 0.2}  # shape radius as a fraction of the short side
POSITIONS: dict[str, tuple[float, float]] = {
    "centre": (0.5, 0.5),
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
}
# Two shapes always sit on opposite sides, so they never overlap and both centres keep their colour.
PAIRED_POSITIONS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{shapes}, on a {background} background",
    "{shapes} against a {background} background",
    "a picture of {shapes} on a {background} background",
)
POSITION_PHRASES: dict[str, str] = {
    "centre": "in the centre",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
SHAPE_PHRASE = "a {size} {colour} {shape} {where}"
SHAPE_JOINER = " and "
GRADIENT_PHRASE = "{direction} gradient from {a} to {b}"
GRADIENT_DIRECTIONS: tuple[str, ...] = ("vertical", "horizontal")

CLASS_NAMES: tuple[str, ...] = tuple(f"{colour} {shape}" for shape in SHAPES for colour in COLOUR_NAMES)

MIN_SIDE, MAX_SIDE = 160, 384
LARGE_SIDES = (520, 640)  # a few images are larger than 512 px so the halving step of the crop runs
LARGE_IMAGE_FRACTION = 0.05
TWO_SHAPE_FRACTION = 0.3
GRADIENT_FRACTION = 0.4
POSITION_JITTER = 0.03  # fraction of the side; small enough that paired shapes stay apart
JPEG_QUALITY = 90
TAR_MTIME = 1_700_000_000  # fixed so identical samples give byte-identical shards


def _words(text: str) -> list[str]:
    """Lower-case words of a caption fragment; template placeholders such as ``{shapes}`` are not words."""
    return re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", text).lower())


def caption_words() -> tuple[str, ...]:
    """Every word a demo caption can contain, sorted; a tokenizer covering these never emits <unk>."""
    texts = [
        *SHAPES,
        *COLOURS,
        *BACKGROUNDS,
        *SIZES,
        *POSITION_PHRASES.values(),
        *CAPTION_TEMPLATES,
        SHAPE_PHRASE,
        SHAPE_JOINER,
        GRADIENT_PHRASE,
        *GRADIENT_DIRECTIONS,
    ]
    return tuple(sorted({w for t in texts for w in _words(t)}))


@dataclass(frozen=True)
class DrawnShape:
    """One shape as drawn: what the caption names and where its pixels are."""

    shape: str
    colour: str
    size: str
    position: str
    centre: tuple[int, int]  # (x, y) in pixels
    radius: int

    def phrase(self) -> str:
        return SHAPE_PHRASE.format(
            size=self.size, colour=self.colour, shape=self.shape, where=POSITION_PHRASES[self.position]
        )


def _polygon(cx: float, cy: float, radii: list[float]) -> list[tuple[float, float]]:
    """Vertices at equal angles around (cx, cy), the first pointing up, with the given radii in turn."""
    angles = np.deg2rad(-90.0 + 360.0 * np.arange(len(radii)) / len(radii))
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles, strict=True)]


def draw_shape(draw: ImageDraw.ImageDraw, s: DrawnShape, fill=None) -> None:
    """``s`` drawn in its colour, or in ``fill`` (e.g. a label value on a mask)."""
    cx, cy = s.centre
    r = s.radius
    fill = COLOURS[s.colour] if fill is None else fill
    if s.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif s.shape == "square":
        h = 0.85 * r  # a square of half-side r looks bigger than a circle of radius r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif s.shape == "triangle":
        # Vertices at radius r around the centre: the centroid is the centre, well inside the shape.
        draw.polygon(_polygon(cx, cy, [r, r, r]), fill=fill)
    elif s.shape == "cross":
        w = 0.3 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif s.shape == "star":
        draw.polygon(_polygon(cx, cy, [r, 0.45 * r] * 5), fill=fill)
    else:
        raise ValueError(f"unknown shape {s.shape!r}")


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    if rng.random() < LARGE_IMAGE_FRACTION:
        lo, hi = LARGE_SIDES
    else:
        lo, hi = MIN_SIDE, MAX_SIDE
    width, height = rng.integers(lo, hi + 1, size=2)
    return int(width), int(height)


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, str]:
    """An (H, W, 3) uint8 canvas and the words that describe it."""
    names = list(BACKGROUNDS)
    if rng.random() >= GRADIENT_FRACTION:
        name = names[rng.integers(len(names))]
        return np.broadcast_to(np.array(BACKGROUNDS[name], np.uint8), (height, width, 3)).copy(), name
    i, j = rng.choice(len(names), size=2, replace=False)
    direction = GRADIENT_DIRECTIONS[rng.integers(len(GRADIENT_DIRECTIONS))]
    steps = height if direction == "vertical" else width
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
    ramp = (1 - t) * np.array(BACKGROUNDS[names[i]], np.float32) + t * np.array(BACKGROUNDS[names[j]], np.float32)
    ramp = ramp.round().astype(np.uint8)
    canvas = (
        np.broadcast_to(ramp[:, None, :], (height, width, 3))
        if direction == "vertical"
        else np.broadcast_to(ramp[None, :, :], (height, width, 3))
    )
    return canvas.copy(), GRADIENT_PHRASE.format(direction=direction, a=names[i], b=names[j])


def _pick_shapes(rng: np.random.Generator, width: int, height: int) -> list[DrawnShape]:
    if rng.random() < TWO_SHAPE_FRACTION:
        positions = list(PAIRED_POSITIONS[rng.integers(len(PAIRED_POSITIONS))])
    else:
        positions = [list(POSITIONS)[rng.integers(len(POSITIONS))]]
    shapes = []
    for position in positions:
        size = list(SIZES)[rng.integers(len(SIZES))]
        fx, fy = np.array(POSITIONS[position]) + rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
        shapes.append(
            DrawnShape(
                shape=SHAPES[rng.integers(len(SHAPES))],
                colour=COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))],
                size=size,
                position=position,
                centre=(int(round(fx * width)), int(round(fy * height))),
                radius=int(round(SIZES[size] * min(width, height))),
            )
        )
    return shapes


def class_id(shape: DrawnShape) -> int:
    """Index into CLASS_NAMES: shape index * number of colours + colour index."""
    return SHAPES.index(shape.shape) * len(COLOUR_NAMES) + COLOUR_NAMES.index(shape.colour)


def make_sample(seed: int, shard: int, index: int) -> tuple[Image.Image, str, list[DrawnShape], str]:
    """(image, caption, shapes, background words) for one sample; depends only on its three arguments."""
    rng = np.random.default_rng([seed, shard, index])
    width, height = _image_size(rng)
    canvas, background = _background(rng, width, height)
    shapes = _pick_shapes(rng, width, height)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        draw_shape(draw, s)
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    caption = template.format(shapes=SHAPE_JOINER.join(s.phrase() for s in shapes), background=background)
    return image, caption, shapes, background


def _jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _sample_record(
    key: str, image: Image.Image, caption: str, shapes: list[DrawnShape], background: str, labels: bool
) -> dict:
    """The webdataset sample: image, caption and img2dataset-style metadata extended with what was drawn."""
    meta = {
        "key": key,
        "caption": caption,
        "url": f"https://example.invalid/demo/{key}.jpg",
        "width": image.width,
        "height": image.height,
        "original_width": image.width,
        "original_height": image.height,
        "status": "success",
        "error_message": None,
        "background": background,
        "shapes": [asdict(s) for s in shapes],
    }
    record = {
        "__key__": key,
        "jpg": _jpeg_bytes(image),
        "txt": caption.encode("utf-8"),
        "json": json.dumps(meta).encode("utf-8"),
    }
    if labels:
        record["cls"] = str(class_id(shapes[0])).encode("ascii")
    return record


def write_demo_shards(
    out_dir: Path,
    num_shards: int = 4,
    samples_per_shard: int = 256,
    seed: int = 0,
    labels: bool = False,
    prefix: str = "cc12m-train",
) -> list[Path]:
    """Write ``num_shards`` tar shards of synthetic captioned images into ``out_dir``; return their paths.

    ``labels=True`` adds ``KEY.cls``: the class id (see ``CLASS_NAMES``) of the first shape drawn.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(num_shards):
        path = out_dir / f"{prefix}-{shard:04d}.tar"
        with wds.TarWriter(str(path), encoder=False, mtime=TAR_MTIME) as sink:
            for index in range(samples_per_shard):
                key = f"{shard:05d}{index:04d}"
                sink.write(_sample_record(key, *make_sample(seed, shard, index), labels=labels))
        paths.append(path)
    return paths
