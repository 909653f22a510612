"""Feature codecs. ``fp16`` stores features as they are; ``int8`` stores one int8 per value plus a
float16 absmax/127 scale per token, halving bytes at cosine > 0.999 to the fp16 features.

Quantisation happens on the encoder's device; dequantisation is meant to run after a batch has
reached the training device (numpy dequantisation of a batch costs hundreds of milliseconds).
"""

from __future__ import annotations

import numpy as np
import torch


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last axis) symmetric int8: returns (q int8, scale float16) with x ~= q * scale."""
    x32 = x.float()
    scale = (x32.abs().amax(dim=-1) / 127.0).to(torch.float16)
    # Quantise with the fp16-rounded scale the reader will use, so rounding stays within half a step.
    s = scale.float().clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(x32 / s.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)).to(dtype)


def dequantize_int8_numpy(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Reference (CPU) dequantisation, used by verification and tests."""
    return (q.astype(np.float32) * scale.astype(np.float32)[..., None]).astype(np.float16)
