"""Validation on the held-out split with fixed noise and fixed t per sample.

Sample ``i`` of the (capped, key-ordered) held-out list always gets t_i = (i + 0.5) / N and noise
drawn from a generator seeded by its cache id, so two runs on the same cache are scored on exactly
the same problems, whatever their seed, batch size or number of processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from stages.core.data.codec import features_to_device
from stages.core.diffusion.diffusion_variable import VaeLatents
from stages.core.diffusion.family_settings import FamilySettings
from stages.core.diffusion.objective import NUM_T_BINS, batch_loss_terms, bin_by_t
from stages.core.runtime.seeding import generator

from .data import CacheBatchDataset

VAL_SEED = 20241009


class Validator:
    def __init__(self, dataset: CacheBatchDataset, val_ids: np.ndarray, max_samples: int, batch_size: int,
                 latent: dict, rank: int, world_size: int, device: torch.device, repa: bool = True,
                 targets: Sequence[str] = ("dino",), family: FamilySettings | None = None, variable=None):
        """``variable``: what is diffused (``stages.core.diffusion.diffusion_variable``; default: the VAE latents of
        ``latent``)."""
        ids = np.asarray(val_ids)[:max_samples]
        self.n_total = len(ids)
        positions = np.arange(len(ids))[rank::world_size]
        self.ids, self.t = ids[positions], torch.from_numpy((positions + 0.5) / max(len(ids), 1)).float()
        self.dataset, self.batch_size, self.device, self.repa = dataset, batch_size, device, repa
        self.targets = targets
        self.family = family or FamilySettings()
        self.variable = variable or VaeLatents(latent)

    def noise(self, ids) -> torch.Tensor:
        """(B, 2, C, h, w): each sample's fixed posterior and path noise, drawn per batch (a token latent's
        noise for every held-out sample at once would take gigabytes)."""
        shape = self.variable.shape
        return torch.stack([torch.randn(2, *shape, generator=generator(VAL_SEED, int(i))) for i in ids])

    def class_token_noise(self, batch: dict, ids) -> torch.Tensor | None:
        """REG's fixed path noise of each sample's class token, drawn apart from the latents' noise."""
        if not self.family.class_token:
            return None
        dim = batch[f"{self.targets[0]}_cls"].shape[-1]
        return torch.stack([torch.randn(dim, generator=generator(VAL_SEED, int(i), 1)) for i in ids]).to(self.device)

    @torch.no_grad()
    def run(self, model, cond_inputs, reduce) -> dict:
        """Mean denoising loss and REPA cosine, overall and per t-bin, over all processes.

        ``cond_inputs(batch) -> dict`` gives the model's conditioning keyword arguments;
        ``reduce(tensor) -> tensor`` sums across processes.
        """
        was_training = model.training
        model.eval()
        sums = torch.zeros(3, NUM_T_BINS, dtype=torch.float64, device=self.device)  # denoise, cos, count
        for start in range(0, len(self.ids), self.batch_size):
            sl = slice(start, start + self.batch_size)
            batch = features_to_device(self.dataset.__getitems__(self.ids[sl]), self.device)
            t = self.t[sl].to(self.device)
            eps_latent, eps_path = self.noise(self.ids[sl]).to(self.device).unbind(1)
            x = self.variable.clean(batch, eps_latent)
            terms = batch_loss_terms(model, batch, x, eps_path, t, cond_inputs(batch), self.targets, self.family,
                                     cls_noise=self.class_token_noise(batch, self.ids[sl]))
            denoise_sum, counts = bin_by_t(terms.denoise, t)
            sums[0] += denoise_sum
            sums[2] += counts
            sums[1] += bin_by_t(terms.cosine(), t)[0]
        sums = reduce(sums)
        if was_training:
            model.train()
        count = sums[2].clamp_min(1)
        total = sums[2].sum().clamp_min(1)
        out = {
            "denoise": float(sums[0].sum() / total),
            "denoise_bins": (sums[0] / count).tolist(),
            "samples": int(sums[2].sum()),
        }
        if self.repa:
            out["repa_cos"] = float(sums[1].sum() / total)
            out["repa_cos_bins"] = (sums[1] / count).tolist()
        return out
