"""The cache's int8 feature codec on torch tensors, on whatever device they live (see
``cache_schema.format.codec`` for the definition and its numpy reference)."""

from __future__ import annotations

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


def features_to_device(batch: dict, device: torch.device | str, dtype: torch.dtype = torch.float16) -> dict:
    """Move a batch of cached features to ``device`` and dequantise int8 entries there (every ``X`` with an
    ``X_scale`` entry, e.g. ``dino``, ``text`` and added targets, becomes ``dtype``; the scales are dropped)."""
    moved = {name: t.to(device, non_blocking=True) for name, t in batch.items()}
    for scale_name in [n for n in moved if n.endswith("_scale") and n[: -len("_scale")] in moved]:
        name = scale_name[: -len("_scale")]
        moved[name] = dequantize_int8(moved[name], moved.pop(scale_name), dtype)
    return moved
