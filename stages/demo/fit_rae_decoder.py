"""Fitting a tiny RAE decoder to the demo images, so that `make sample PRESET=rae-demo` shows shapes.

RAE's decoders are trained on pixels (with a GAN loss, out of scope here) and released; the demo has none, so
a small ``RAEDecoder`` of the real class is fitted for about a minute on 2 cores to map the demo DINOv2-with-
registers' tokens back to the demo crops. The tokens are made as `repa encode --add-target` makes them (the
same ``TargetEncoder``, crop and preprocessing), rounded to float16 as the cache stores them, and taken without
the final LayerNorm's affine part, as `repa train --diffuse` reads them; the loss is the mean squared error in
the encoder's normalised pixel space, which ``RAEDecoder.decode`` maps back to [0, 1]. The folder written holds
``model.pt`` (the bare state dict, as RAE releases decoders) and RAE's ``config.json`` fields, which
`repa sample --rae-decoder DIR` reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TypedDict

import torch
import torch.nn.functional as F

from stages.core.diffusion.token_stats import strip_layernorm_affine
from stages.core.model.rae_decoder import IMAGENET_MEAN, IMAGENET_STD, DecoderConfig, RAEDecoder

from .adam_fit import adam_fit
from .fit_vae import demo_images


class DecoderWidths(TypedDict):
    decoder_hidden_size: int
    decoder_num_hidden_layers: int
    decoder_num_attention_heads: int
    decoder_intermediate_size: int


DEMO_DECODER = DecoderWidths(decoder_hidden_size=64, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                             decoder_intermediate_size=128)
FIT_LR = 2e-3


@torch.no_grad()
def demo_tokens(dino_dir: Path, images: torch.Tensor, resolution: int) -> torch.Tensor:
    """(N, tokens, dim) affine-free float32 tokens of uint8 (N, 3, res, res) crops, rounded through float16."""
    from stages.core.encoders.load import ModelSource, dino_geometry, hf_config
    from stages.core.encoders.targets import TargetEncoder

    source = ModelSource(str(dino_dir))
    grid = dino_geometry(hf_config("DINOv2", source), resolution)["grid"][0]
    encoder = TargetEncoder(source, resolution, grid, torch.device("cpu"), torch.float32)
    tokens = torch.cat([encoder.encode(images[i : i + 64])[0] for i in range(0, len(images), 64)]).half().float()
    norm = encoder.final_layernorm()
    if norm is None:
        raise ValueError(f"{dino_dir}: not a DINOv2 model; the decoder is fitted on DINOv2's tokens")
    return strip_layernorm_affine(tokens, torch.tensor(norm["weight"]), torch.tensor(norm["bias"]))


def fit_decoder(decoder: RAEDecoder, tokens: torch.Tensor, images: torch.Tensor, steps: int, batch_size: int,
                lr: float = FIT_LR, seed: int = 0, progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Adam on the MSE between ``decoder(tokens)`` and uint8 ``images`` in ImageNet-normalised pixels."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    target = (images.float() / 255 - mean) / std
    decoder.train()
    losses = adam_fit(decoder.parameters(),
                      lambda idx, g: F.mse_loss(decoder.unpatchify(decoder(tokens[idx])), target[idx]),
                      len(tokens), steps, batch_size, lr, seed, progress)
    decoder.eval()
    return losses


def fit_demo_rae_decoder(out: Path, dino_dir: Path, source: str, resolution: int, steps: int, batch_size: int = 32,
                         max_images: int = 1024, seed: int = 0, progress=None) -> list[float]:
    """Fit a demo decoder to the tokens of ``dino_dir`` on the demo shards ``source``; write ``out``/model.pt and
    ``out``/config.json."""
    crops = torch.from_numpy(demo_images([source], resolution, max_images)).permute(0, 3, 1, 2).contiguous()
    tokens = demo_tokens(dino_dir, crops, resolution)
    grid_tokens, dim = tokens.shape[1:]
    side = round(grid_tokens ** 0.5)
    config = DecoderConfig(hidden_size=dim, num_patches=grid_tokens, patch_size=resolution // side, **DEMO_DECODER)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = RAEDecoder(config)
        losses = fit_decoder(decoder, tokens, crops, steps, batch_size, seed=seed, progress=progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(decoder.state_dict(), out / "model.pt")
    (out / "config.json").write_text(json.dumps(asdict(config), indent=1) + "\n")
    return losses
