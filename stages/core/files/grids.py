"""Tiling images into one picture: the sample grids, decoded previews and the trackers' preview images."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MAX_ASPECT = 3  # beyond this many columns per row a grid with a gap reads better than a long strip


def grid_columns(count: int) -> int:
    """Columns for ``count`` tiles: the divisor nearest a square (no empty cell), else a near-square."""
    if count <= 0:
        return 1
    rows = max(r for r in range(1, math.isqrt(count) + 1) if count % r == 0)
    columns = count // rows
    return columns if columns <= MAX_ASPECT * rows else math.ceil(math.sqrt(count))


def tile(images: Sequence[np.ndarray], columns: int | None = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """HWC uint8 images of one size tiled row by row, ``pad`` pixels of ``fill`` around each."""
    columns = columns or grid_columns(len(images))
    rows = math.ceil(len(images) / columns)
    h, w, c = images[0].shape
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), fill, np.uint8)
    for k, image in enumerate(images):
        r, col = divmod(k, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y : y + h, x : x + w] = image
    return canvas
