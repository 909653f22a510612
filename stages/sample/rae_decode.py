"""Pictures from a run that diffused a target's tokens (RAE): the RAE decoder, where its weights come from,
and the shifted Euler ODE it is sampled with.

The decoder is ``stages.core.model.rae_decoder.RAEDecoder``, its weights RAE's ``model.pt`` (a bare state dict,
read with ``weights_only=True``) given as a local file, a folder holding ``model.pt`` and RAE's
``config.json``, or ``hf://OWNER/REPO/PATH`` on the Hugging Face Hub. Its shape is RAE's decoder config
(--rae-decoder-config: a preset ViTB/ViTL/ViTXL or a config.json; a folder's own config.json wins), with
the token size and grid of the run and RAE's 16 pixels per token. Images are ``clamp(x, 0, 1) · 255``
truncated to uint8, as RAE's ``sample_ddp.py`` writes them for FID.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from stages.core.diffusion.diffusion_variable import TargetTokens
from stages.core.diffusion.time_shift import RAE_ODE_POINTS, shifted_euler_ode
from stages.core.diffusion.token_stats import latent_to_tokens
from stages.core.errors import UsageError
from stages.core.model.rae_decoder import DECODER_PRESETS, DecoderConfig, RAEDecoder, decoder_config, load_decoder

HUB_PREFIX = "hf://"
DECODER_FILE, DECODER_CONFIG = "model.pt", "config.json"
RAE_DECODER_PATCH = 16  # RAE's decoder_patch_size: pixels per token side


def decoder_file(spec: str) -> Path:
    """The local file of --rae-decoder (downloaded into the Hub cache for ``hf://OWNER/REPO/PATH``)."""
    if spec.startswith(HUB_PREFIX):
        parts = spec[len(HUB_PREFIX):].split("/")
        if len(parts) < 3 or not all(parts):
            raise UsageError(f"--rae-decoder {spec}: a Hub file is hf://OWNER/REPO/PATH/model.pt")
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
        except Exception as e:  # offline, no such repository or file, no permission: all mean "not here"
            raise UsageError(f"--rae-decoder {spec}: cannot download it ({type(e).__name__}); download it where "
                             "the Hub is reachable and pass the local file") from None
    path = Path(spec)
    return path / DECODER_FILE if path.is_dir() else path


def decoder_shape(spec: str, config: str, variable: TargetTokens) -> DecoderConfig:
    """RAE's decoder config for the run's tokens: the folder's config.json, else --rae-decoder-config."""
    path = Path(spec) / DECODER_CONFIG if not spec.startswith(HUB_PREFIX) and Path(spec).is_dir() else None
    source = path if path is not None and path.is_file() else config
    dim, grid = variable.shape[0], variable.shape[1]
    if source in DECODER_PRESETS:
        return decoder_config(str(source), patch_size=RAE_DECODER_PATCH, hidden_size=dim, num_patches=grid * grid)
    try:
        raw = json.loads(Path(source).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--rae-decoder-config {source}: neither a preset ({', '.join(DECODER_PRESETS)}) nor a "
                         f"readable config.json ({type(e).__name__})") from None
    known = {f.name for f in fields(DecoderConfig)} - {"hidden_size", "num_patches", "patch_size"}
    patch = raw.get("patch_size")
    try:
        return DecoderConfig(**{k: v for k, v in raw.items() if k in known}, hidden_size=dim, num_patches=grid * grid,
                             patch_size=patch if isinstance(patch, int) else RAE_DECODER_PATCH)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{source}: not an RAE decoder config ({e})") from None


def load_run_decoder(spec: str | None, config: str, variable: TargetTokens, device) -> RAEDecoder:
    if not spec:
        raise UsageError(f"this run diffused the tokens of {variable.name}: pass --rae-decoder (RAE's decoder "
                         "model.pt, a folder with model.pt and config.json, or hf://OWNER/REPO/PATH)")
    return load_decoder(decoder_file(spec), decoder_shape(spec, config, variable), device)


class TokenDecoder:
    """The model's variable -> uint8 (B, 3, H, W) images through the RAE decoder."""

    def __init__(self, variable: TargetTokens, decoder: RAEDecoder, device: torch.device):
        self.variable, self.decoder, self.device = variable, decoder.to(device), device

    @torch.no_grad()
    def __call__(self, latents: Tensor) -> Tensor:
        return self.pixels(self.variable.tokens(latents.to(self.device)))

    @torch.no_grad()
    def pixels(self, tokens: Tensor) -> Tensor:
        images = self.decoder.decode(tokens.to(self.device, torch.float32))
        return (images.clamp(0, 1) * 255).to(torch.uint8)


def check_sampler(sampler: str, variable: TargetTokens) -> None:
    if sampler != "euler":
        raise UsageError(f"--sampler {sampler}: a run on {variable.name}'s tokens is sampled as RAE samples, with "
                         "Euler steps on its shifted time grid; pass --sampler euler")


def sample_tokens(fn, noise: Tensor, variable: TargetTokens, sampler: str, steps: int | None) -> Tensor:
    """RAE's sampler: Euler on the shifted grid of ``steps`` points (RAE's num_steps; default 50)."""
    check_sampler(sampler, variable)
    return shifted_euler_ode(fn, noise, variable.shift, steps or RAE_ODE_POINTS)


def real_token_images(cache: Path, ids, decoder: TokenDecoder) -> tuple[np.ndarray, list[str]]:
    """Samples ``ids`` of ``cache``: their cached tokens through the decoder (what generated images can look like
    at best), uint8 (N, H, W, 3), and their captions or class ids."""
    from cache_schema import FastReader

    reader = FastReader(cache)
    ids = np.asarray(ids, dtype=np.int64)
    meta = reader.read_many(ids, {decoder.variable.name: None, "caption": None, "label": None})
    batch = {decoder.variable.name: torch.from_numpy(np.ascontiguousarray(meta[decoder.variable.name]))}
    images = decoder.pixels(latent_to_tokens(decoder.variable.raw(batch)))
    captions = [str(c) or (f"class {int(lab)}" if int(lab) >= 0 else "")
                for c, lab in zip(meta["caption"], meta["label"], strict=True)]
    return images.permute(0, 2, 3, 1).cpu().numpy(), captions
