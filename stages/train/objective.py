"""The rectified-flow objective on cached VAE moments (the SiT "linear" path).

x_t = (1 - t) x + t eps, the model predicts v = eps - x; the denoising loss is the mean over
(C, H, W) of (v_hat - v)^2. Latents are drawn from the cached posterior every step,
z = mean + std * n, then normalised with the VAE's shift and scaling factors.
"""

from __future__ import annotations

import torch
from torch import Tensor

NUM_T_BINS = 10


def sample_latents(moments: Tensor, scaling_factor: float, shift_factor: float, generator: torch.Generator) -> Tensor:
    """moments (B, 2C, h, w) = [mean, std] -> normalised latent sample (B, C, h, w) in float32."""
    mean, std = moments.float().chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * noise - shift_factor) * scaling_factor


def sample_t(batch: int, mode: str, generator: torch.Generator, device: torch.device) -> Tensor:
    if mode == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    if mode == "logit-normal":
        return torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    raise ValueError(f"unknown time sampling {mode!r}")


def interpolate(x: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, v): the point on the linear path at time t and the velocity target."""
    tt = t.view(-1, *([1] * (x.dim() - 1)))
    return (1 - tt) * x + tt * noise, noise - x


def denoise_loss_per_sample(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over all but the batch axis of the squared error, in float32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def bin_by_t(values: Tensor, t: Tensor, bins: int = NUM_T_BINS) -> tuple[Tensor, Tensor]:
    """(sum per bin, count per bin) of per-sample values, bins of equal width over t in [0, 1]."""
    idx = (t.float() * bins).long().clamp_(0, bins - 1)
    sums = torch.zeros(bins, device=values.device, dtype=torch.float64).index_add_(0, idx, values.double())
    counts = torch.zeros(bins, device=values.device, dtype=torch.float64).index_add_(0, idx, torch.ones_like(values, dtype=torch.float64))
    return sums, counts
