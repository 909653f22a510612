"""Cheap progress pictures: sampled latents for fixed held-out conditions, saved every N steps.

No VAE runs during training; `repa decode-previews RUN_DIR` turns the saved latents into PNG grids.
A preview file ``previews/step-0001000.pt`` holds plain tensors and values only (it loads with
``weights_only=True``): ``latents`` (K, C, h, w) in the model's normalised latent space, ``latent``
(the manifest's scaling/shift factors), and the ``keys``, ``captions`` and ``labels`` of the
conditions they were sampled for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stages.core.data.codec import features_to_device
from stages.core.diffusion.family import JointState
from stages.core.diffusion.samplers import euler_ode
from stages.core.files.grids import tile
from stages.core.files.run_files import PREVIEW_DIR
from stages.core.files.tensor_files import save_tensors
from stages.core.runtime.seeding import generator

from .data import CacheBatchDataset

PREVIEW_SEED = 1234
EMA_SETTLED = 0.1  # the random start's share of the EMA below which previews show the EMA


def preview_weights(model: torch.nn.Module, ema: torch.nn.Module, decay: float, step: int) -> torch.nn.Module:
    """The network a preview samples: the EMA once the random start weighs less than ``EMA_SETTLED``
    in it (``decay ** step``: at 0.995 still 37 % at step 200, 1 % at step 900), the trained weights before that,
    so an early preview shows what the model has learnt rather than the EMA's start. The EMA itself is not
    changed (official REPA's constant decay)."""
    return ema if decay**step < EMA_SETTLED else model


class Previewer:
    def __init__(self, dataset: CacheBatchDataset, val_ids: np.ndarray, latent: dict, count: int = 8, steps: int = 25):
        self.ids = np.asarray(val_ids)[:count]
        self.dataset, self.latent, self.steps = dataset, latent, steps
        meta = dataset.reader.read_many(self.ids, {"key": None, "caption": None, "label": None})
        self.keys = [str(k) for k in meta["key"]]
        self.captions = [str(c) for c in meta["caption"]]
        self.labels = [int(x) for x in meta["label"]]
        c, s = latent["channels"], latent["size"]
        self.noise = torch.randn(len(self.ids), c, s, s, generator=generator(PREVIEW_SEED))

    @torch.no_grad()
    def save(self, model, conditioner, step: int, run_dir: Path, device: torch.device) -> torch.Tensor:
        """Sample and save the preview latents of ``step``; returns them (on the CPU)."""
        batch = features_to_device(self.dataset.__getitems__(self.ids), device)
        cond = conditioner(batch)

        cls_dim = getattr(model.config, "class_token_dim", 0)
        joint = JointState(self.noise.shape[1:], cls_dim) if cls_dim else None  # REG: the class token too

        def velocity(x, t):
            return joint.velocity(model, x, t, cond) if joint else model(x, t, **cond)[0].float()

        noise = self.noise
        if joint:
            noise = joint.pack(noise, torch.randn(len(noise), cls_dim, generator=generator(PREVIEW_SEED, 1)))
        latents = euler_ode(velocity, noise.to(device), steps=self.steps)
        latents = joint.unpack(latents)[0] if joint else latents
        save_tensors(Path(run_dir) / PREVIEW_DIR / f"step-{step:07d}.pt",
                     {"step": step, "latents": latents.cpu(), "latent": self.latent, "keys": self.keys,
                      "captions": self.captions, "labels": self.labels}, "preview")
        return latents.cpu()


def latent_grid(latents: torch.Tensor, min_side: int = 64) -> np.ndarray:
    """The first three latent channels of each preview as RGB, tiled: a look at the previews without a VAE
    (training loads none). Each channel is stretched over its 1st-99th percentile across the batch and
    upsampled (nearest) to at least ``min_side`` pixels."""
    x = latents.float()[:, :3]
    if x.shape[1] < 3:
        x = x.repeat(1, 3, 1, 1)[:, :3]
    flat = x.transpose(0, 1).flatten(1)
    lo, hi = flat.quantile(0.01, dim=1), flat.quantile(0.99, dim=1)
    x = ((x - lo[None, :, None, None]) / (hi - lo).clamp_min(1e-6)[None, :, None, None]).clamp(0, 1)
    scale = max(1, -(-min_side // x.shape[-1]))
    x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return tile(list((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()))
