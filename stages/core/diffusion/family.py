"""What REPA's successors add to its objective, computed from the same cached features.

- iREPA (End2End-Diffusion/iREPA): the target tokens are z-scored over the token axis, the mean scaled by
  ``alpha`` (``spatial_zscore``), and the projector is one Conv2d over the token grid (``ConvProjector``).
- Dispersive loss (Wang & He, arXiv 2506.09027): an in-batch repulsion of one block's hidden states,
  ``log mean_ij exp(-||z_i - z_j||^2 / D' / tau)`` over all B x B pairs, the diagonal included, z the
  flattened state (D' = tokens x width) (``dispersive_loss``).
- REG (Martinser/REG): the target's class token is noised on the same path as the latents (its own noise,
  the same t), enters the SiT as one extra token and is denoised too; the REPA target is [class token,
  patch tokens] (``alignment_inputs``; the model side is in ``stages.core.model.sit``).
- HASTE (NUS-HPC-AI-Lab/HASTE): alignment switched off after a step (``FamilySettings.align``).

Sampling a REG model denoises its class token with the latents (``JointState``), as REG's sampler does.

``FamilySettings`` (``stages.core.diffusion.family_settings``) carries these choices from the training config to
``objective.loss_terms``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.core.diffusion.family_settings import FamilySettings

ZSCORE_EPS = 1e-6


def spatial_zscore(tokens: Tensor, alpha: float = 1.0, eps: float = ZSCORE_EPS) -> Tensor:
    """(B, T, D) -> (x - alpha * mean_T x) / (std_T x + eps), per sample and channel, in float32.

    The std is the unbiased one (torch's default), as iREPA's ``spatial_zscore`` computes it."""
    x = tokens.float()
    return (x - alpha * x.mean(dim=1, keepdim=True)) / (x.std(dim=1, keepdim=True) + eps)


def dispersive_loss(hidden: Tensor, tau: float = 1.0) -> Tensor:
    """InfoNCE-style dispersion of a batch of hidden states (B, ...) -> scalar, in float32.

    Squared L2 distances between the flattened states, divided by their size D' and by ``tau``; the
    log of the mean of exp(-distance) over all B x B pairs, the B zero distances of the diagonal included
    (the official PyTorch code pads ``pdist`` with them to match its JAX code's full matrix)."""
    z = hidden.float().flatten(1)
    sq = z.pow(2).sum(dim=1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)).clamp_min(0.0)
    dist = dist * (1 - torch.eye(len(z), device=z.device, dtype=z.dtype))  # exactly 0 on the diagonal
    logits = (-dist / (z.shape[1] * tau)).flatten()
    return torch.logsumexp(logits, dim=0) - torch.log(torch.tensor(float(logits.numel()), device=z.device))


class ConvProjector(nn.Module):
    """iREPA's projector: one Conv2d (stride 1, 'same' padding) from the hidden size to the target's, over
    the square token grid.

    ``leading`` tokens in front of the grid (REG's class token) have no neighbours: each is projected as a
    lone pixel in zero padding, i.e. by the kernel's centre tap (with kernel 1, the same map as the grid's).
    The parameter names (``projection_layer.*``) are those of iREPA's ``ProjectionLayer``.
    """

    def __init__(self, hidden_size: int, out_dim: int, kernel_size: int):
        super().__init__()
        self.projection_layer = nn.Conv2d(hidden_size, out_dim, kernel_size=kernel_size, stride=1,
                                          padding=kernel_size // 2)

    def forward(self, x: Tensor, leading: int = 0) -> Tensor:
        batch, tokens, width = x.shape
        side = int(round((tokens - leading) ** 0.5))
        if side * side != tokens - leading:
            raise ValueError(f"the conv projector needs a square token grid, got {tokens - leading} tokens")
        grid = x[:, leading:].reshape(batch, side, side, width).permute(0, 3, 1, 2)
        out = self.projection_layer(grid).permute(0, 2, 3, 1).reshape(batch, side * side, -1)
        if not leading:
            return out
        conv = self.projection_layer
        centre = conv.weight[:, :, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2]
        return torch.cat([F.linear(x[:, :leading], centre, conv.bias), out], dim=1)


def alignment_inputs(batch: dict, names, settings: FamilySettings) -> tuple[list[Tensor], Tensor | None]:
    """(the REPA targets of ``names``, the class token REG denoises or None) from a batch.

    iREPA's z-score applies to the patch tokens; with REG each target is [its class token, patch tokens]
    (the class token as stored: REG aligns ``x_norm_clstoken`` unnormalised), and the first target's class
    token is the one denoised."""
    names = list(names)
    cls = batch[f"{names[0]}_cls"][:, 0] if settings.class_token else None
    targets = []
    for name in names:
        if name not in batch:
            continue
        target = batch[name]
        if settings.target_norm == "zscore":
            target = spatial_zscore(target, settings.zscore_alpha)
        if settings.class_token:
            target = torch.cat([batch[f"{name}_cls"][:, :1].to(target.dtype), target], dim=1)
        targets.append(target)
    return targets, cls


class JointState:
    """REG's sampling state: the latents (B, C, H, W) and the class token (B, D), denoised together as one flat
    tensor per sample (B, C*H*W + D), so every sampler integrates both with the same steps and noise."""

    def __init__(self, latent_shape: tuple[int, ...], dim: int):
        self.shape, self.size = tuple(latent_shape), math.prod(latent_shape)
        self.dim = dim

    def pack(self, x: Tensor, cls: Tensor) -> Tensor:
        return torch.cat([x.flatten(1), cls.to(x.dtype)], dim=1)

    def unpack(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z[:, : self.size].reshape(-1, *self.shape), z[:, self.size :]

    def velocity(self, model, x: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """The packed velocity of ``model`` (a REG SiT) at the packed state ``x``."""
        latents, cls = self.unpack(x)
        out = model(latents, t, **cond, cls_token=cls)
        return self.pack(out[0].float(), out[2]["cls"].float())
