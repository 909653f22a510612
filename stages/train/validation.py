"""Validation on the held-out split with fixed noise and fixed t per sample.

Sample ``i`` of the (capped, key-ordered) held-out list always gets t_i = (i + 0.5) / N and noise
drawn from a generator seeded by its cache id, so two runs on the same cache are scored on exactly
the same problems, whatever their seed, batch size or number of processes.
"""

from __future__ import annotations

import numpy as np
import torch

from .data import CacheBatchDataset, to_device
from .objective import NUM_T_BINS, bin_by_t, denoise_loss_per_sample, interpolate
from .model import repa_loss_per_sample

VAL_SEED = 20241009


class Validator:
    def __init__(self, dataset: CacheBatchDataset, val_ids: np.ndarray, max_samples: int, batch_size: int,
                 latent: dict, rank: int, world_size: int, device: torch.device):
        ids = np.asarray(val_ids)[:max_samples]
        self.n_total = len(ids)
        positions = np.arange(len(ids))[rank::world_size]
        self.ids, self.t = ids[positions], torch.from_numpy((positions + 0.5) / max(len(ids), 1)).float()
        self.dataset, self.batch_size, self.device = dataset, batch_size, device
        self.scale, self.shift = latent["scaling_factor"], latent["shift_factor"]
        c, s = latent["channels"], latent["size"]
        noise = []
        for i in self.ids:
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([VAL_SEED, int(i)]).generate_state(1)[0]))
            noise.append(torch.randn(2, c, s, s, generator=g))
        self.noise = torch.stack(noise) if noise else torch.zeros(0, 2, c, s, s)

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
            batch = to_device(self.dataset.__getitems__(self.ids[sl]), self.device)
            t = self.t[sl].to(self.device)
            eps_latent, eps_path = self.noise[sl].to(self.device).unbind(1)
            mean, std = batch["moments"].float().chunk(2, dim=1)
            x = (mean + std * eps_latent - self.shift) * self.scale
            x_t, v = interpolate(x, eps_path, t)
            pred, proj = model(x_t, t, **cond_inputs(batch))
            denoise_sum, counts = bin_by_t(denoise_loss_per_sample(pred, v), t)
            sums[0] += denoise_sum
            sums[2] += counts
            if proj is not None:
                sums[1] += bin_by_t(-repa_loss_per_sample(proj, batch["dino"]), t)[0]
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
        if model_has_projector(model):
            out["repa_cos"] = float(sums[1].sum() / total)
            out["repa_cos_bins"] = (sums[1] / count).tolist()
        return out


def model_has_projector(model) -> bool:
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    return getattr(inner, "projector", None) is not None
