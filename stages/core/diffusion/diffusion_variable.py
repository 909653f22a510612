"""What the flow diffuses: the cache's VAE latents (the default) or an alignment target's patch tokens (RAE).

Both give ``clean(batch, posterior_noise) -> x`` (B, C, h, w), the clean point of the linear path, in the
model's normalised space, and ``shape`` (C, h, w); training, validation and sampling use nothing else.

:class:`VaeLatents` draws a latent from the cached posterior and normalises it with the VAE's factors
(``objective.sample_latents``). :class:`TargetTokens` is RAE's variable (``stages.core.diffusion.token_stats``): the
target's cached tokens (B, N, D), with the final LayerNorm's affine part removed when the cache records
that LayerNorm (RAE's encoder has none), laid out as (B, D, h, w) and normalised per element by dataset
statistics; :meth:`TargetTokens.tokens` inverts it for the RAE decoder. Without the LayerNorm vectors the
tokens are used as stored: with statistics taken over the same tokens that is RAE's variable up to each
channel's sign and the eps under the square root (an affine map per channel commutes with a per-element
standardisation), but RAE's released statistics and decoders read affine-free tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from stages.core.diffusion.objective import latent_normalisation, sample_latents
from stages.core.diffusion.time_shift import shift_factor
from stages.core.diffusion.token_stats import LatentStats, latent_to_tokens, strip_layernorm_affine, tokens_to_latent


class VaeLatents:
    """The cached VAE posterior, sampled every step (``posterior`` noise per image) and normalised."""

    posterior = True
    fields = ("moments",)

    def __init__(self, latent: dict):
        self.scale, self.shift = latent_normalisation(latent)
        self.shape = (int(latent["channels"]), int(latent["size"]), int(latent["size"]))

    def clean(self, batch: dict, noise: Tensor | None = None) -> Tensor:
        return sample_latents(batch["moments"], self.scale, self.shift, noise=noise)


@dataclass
class LayerNormAffine:
    """The affine vectors of the encoder's final LayerNorm, as the cache records them."""

    weight: Tensor
    bias: Tensor

    @classmethod
    def from_record(cls, record: dict | None) -> LayerNormAffine | None:
        if not record:
            return None
        return cls(torch.tensor(record["weight"], dtype=torch.float32),
                   torch.tensor(record["bias"], dtype=torch.float32))


class TargetTokens:
    """RAE's diffusion variable from the cached patch tokens of target ``name`` (no posterior to sample)."""

    posterior = False

    def __init__(self, name: str, dim: int, grid: int, stats: LatentStats | None = None,
                 layernorm: LayerNormAffine | None = None):
        self.name, self.stats, self.layernorm = name, stats, layernorm
        self.fields = (name,)
        self.shape = (int(dim), int(grid), int(grid))

    @property
    def shift(self) -> float:
        """RAE's time shift for this latent size, sqrt(C·h·w / 4096)."""
        return shift_factor(self.shape[0] * self.shape[1] * self.shape[2])

    def raw(self, batch: dict) -> Tensor:
        """The batch's tokens as RAE's encoder would give them, laid out as (B, D, h, w), float32."""
        tokens = batch[self.name].float()
        if self.layernorm is not None:
            tokens = strip_layernorm_affine(tokens, self.layernorm.weight, self.layernorm.bias)
        return tokens_to_latent(tokens)

    @property
    def loaded_stats(self) -> LatentStats:
        """The statistics, which are set (at construction or by training) before the variable is normalised."""
        if self.stats is None:
            raise ValueError(f"target {self.name}: its latent statistics are not loaded yet")
        return self.stats

    def clean(self, batch: dict, noise: Tensor | None = None) -> Tensor:
        return self.loaded_stats.normalize(self.raw(batch))

    def tokens(self, latent: Tensor) -> Tensor:
        """The model's variable (B, D, h, w) -> tokens (B, h·w, D) for the RAE decoder (affine-free where the
        LayerNorm was known)."""
        return latent_to_tokens(self.loaded_stats.denormalize(latent.float()))

    def record(self) -> dict:
        """What a checkpoint keeps of it, so a run samples without its run directory's stat.pt."""
        stats = self.loaded_stats
        out = {"target": self.name, "dim": self.shape[0], "grid": self.shape[1],
               "mean": stats.mean.detach().cpu(), "var": stats.var.detach().cpu(), "eps": stats.eps}
        if self.layernorm is not None:
            out["layernorm"] = {"weight": self.layernorm.weight.tolist(), "bias": self.layernorm.bias.tolist()}
        return out

    @classmethod
    def from_record(cls, record: dict) -> TargetTokens:
        stats = LatentStats(record["mean"].float(), record["var"].float(), float(record["eps"]))
        return cls(record["target"], record["dim"], record["grid"], stats,
                   LayerNormAffine.from_record(record.get("layernorm")))
