"""A transformers image processor's preprocessing, done on the device on the encode crop.

CLIP and SigLIP models see the same centre crop as the VAE (no second read of the tars), prepared as
their image processor would: resized (bicubic, antialiased) to the processor's size, centre-cropped when
the processor crops, rescaled and normalised with the processor's mean and std.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .load import EncoderLoadError


def _side(size, *keys: str) -> int | None:
    for key in keys:
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        if value:
            return int(value)
    return None


class ProcessorPixels:
    """uint8 crops -> the model's normalised pixel values; ``size`` replaces the processor's size."""

    def __init__(self, processor, device: torch.device, dtype: torch.dtype, what: str, size: int | None = None):
        side = _side(processor.size, "height", "shortest_edge")
        if side is None:
            raise EncoderLoadError(f"{what}: its image processor names no size")
        crop = _side(getattr(processor, "crop_size", None) or {}, "height")
        crop = crop if getattr(processor, "do_center_crop", False) and crop else None
        self.resize, self.crop = (size, None) if size is not None else (side, crop)
        self.scale = float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0
        normalize = getattr(processor, "do_normalize", True)
        self.mean = torch.tensor(processor.image_mean if normalize else [0.0] * 3, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std if normalize else [1.0] * 3, device=device).view(1, 3, 1, 1)
        self.dtype = dtype

    @property
    def input_size(self) -> int:
        return self.crop if self.crop and self.crop < self.resize else self.resize

    def describe(self) -> str:
        crop = f", centre crop {self.crop}" if self.crop else ""
        mean, std = ([round(float(v), 6) for v in t.flatten()] for t in (self.mean, self.std))
        return f"encode crop, bicubic antialias resize to {self.resize}{crop}, x{self.scale:.8g}, mean {mean} std {std}"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, res, res) -> normalised pixel values (B, 3, input_size, input_size)."""
        x = F.interpolate(images.float(), size=(self.resize, self.resize), mode="bicubic", antialias=True,
                          align_corners=False).clamp(0, 255)
        if self.crop and self.crop < self.resize:
            top = (self.resize - self.crop) // 2
            x = x[:, :, top : top + self.crop, top : top + self.crop]
        return ((x * self.scale - self.mean) / self.std).to(self.dtype)
