"""Fitting the demo's tiny VAE to the demo images, so that decoded samples show shapes and colours.

A random-init VAE decodes any latent to texture, and gradient descent from a random init needs far more
than the minute a demo can spend on 2 CPU cores (the conv/GroupNorm stack learns colour last). So the fit
starts from a block-colour autoencoder built into the same ``AutoencoderKL``: every latent pixel holds the
mean colour of its 8x8 block (channels R, G, B; the fourth is 0) and the decoder paints it back, with a
near-zero posterior std. Every residual branch and attention output starts at zero, so the network is that
map exactly (up to GroupNorm's per-image scale, kept below 1% by a constant channel), and a short fit on the
demo images then trains those branches to sharpen it. Last, ``shift_factor`` and ``scaling_factor`` are set
to the mean and 1 / std of the latents over the images (as FLUX's and Stable Diffusion's were), so the
diffusion model sees zero-mean, unit-variance latents.

GroupNorm normalises each group per image; a colour survives it only beside a large constant in the same
group, and with both signs of every channel (x and -x) the group mean stays 0 and SiLU(n) - SiLU(-n) = n
undoes the nonlinearity exactly. Hence the demo VAE uses one norm group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models import AutoencoderKL  # diffusers' top level shows type checkers its no-torch dummy
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution

from .adam_fit import adam_fit

CONSTANT = 20.0  # the constant channel: GroupNorm's scale then varies by < 1% with the image
LOGVAR = -10.0  # posterior std exp(-5) ~ 0.007: the block colours, barely blurred by sampling
SIGNALS = 4  # carried channels: R, G, B and the constant; each also negated


def _bias(conv: torch.nn.Conv2d) -> torch.Tensor:
    if conv.bias is None:
        raise ValueError("the block-colour start needs a VAE whose convolutions have biases")
    return conv.bias


@torch.no_grad()
def _identity_conv(conv: torch.nn.Conv2d, sign_pairs: bool = False) -> None:
    """``conv`` passes its first 2 * SIGNALS input channels through (centre tap), the rest of its output zero."""
    bias = _bias(conv)
    conv.weight.zero_()
    bias.zero_()
    k = conv.kernel_size[0] // 2
    for c in range(min(2 * SIGNALS, conv.in_channels, conv.out_channels)):
        conv.weight[c, c, k, k] = 1.0


@torch.no_grad()
def _average_conv(conv: torch.nn.Conv2d) -> None:
    """A stride-2 3x3 conv (after diffusers' (0, 1, 0, 1) padding) as a 2x2 average of each carried channel."""
    bias = _bias(conv)
    conv.weight.zero_()
    bias.zero_()
    for c in range(2 * SIGNALS):
        conv.weight[c, c, :2, :2] = 0.25


@torch.no_grad()
def _signed_colours(conv: torch.nn.Conv2d) -> None:
    """Channels [R, G, B, K, -R, -G, -B, -K] from the first three input channels and a constant K."""
    if conv.bias is None:
        raise ValueError("the signed-colour convolution needs a bias (for the constant channel K)")
    conv.weight.zero_()
    conv.bias.zero_()
    for c in range(3):
        conv.weight[c, c, 1, 1] = 1.0
        conv.weight[c + SIGNALS, c, 1, 1] = -1.0
    conv.bias[SIGNALS - 1], conv.bias[2 * SIGNALS - 1] = CONSTANT, -CONSTANT


def _identity_blocks(module: torch.nn.Module) -> None:
    """Residual branches and attention outputs to zero, shortcuts to identity: each block passes its input."""
    for name, sub in module.named_modules():
        if name.endswith("conv2") and isinstance(sub, torch.nn.Conv2d):
            sub.weight.zero_()
            _bias(sub).zero_()
        elif name.endswith("conv_shortcut") and isinstance(sub, torch.nn.Conv2d):
            _identity_conv(sub)
        elif name.endswith("to_out.0") and isinstance(sub, torch.nn.Linear):
            sub.weight.zero_()
            sub.bias.zero_()


def _resampling_convs(blocks: torch.nn.ModuleList, samplers: str) -> Iterator[torch.nn.Conv2d]:
    """The conv of each down- or upsampler (``samplers``: diffusers' attribute name) of ``blocks``."""
    for block in blocks:
        # diffusers' DownEncoderBlock2D/UpDecoderBlock2D: a ModuleList of Down/Upsample2D (a conv each) or None
        for sampler in cast("torch.nn.ModuleList | None", getattr(block, samplers)) or []:
            yield cast(torch.nn.Conv2d, sampler.conv)


@torch.no_grad()
def block_colour_init(vae: AutoencoderKL) -> AutoencoderKL:
    """Make ``vae`` the block-colour autoencoder described in the module docstring."""
    enc, dec = vae.encoder, vae.decoder
    if any(m.num_groups != 1 for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)):
        raise ValueError("the block-colour start needs a VAE with norm_num_groups=1")
    if vae.config["latent_channels"] < 3:
        raise ValueError("the block-colour start needs at least 3 latent channels")
    _identity_blocks(vae)
    # encoder input: [R, G, B, K, -R, -G, -B, -K]
    _signed_colours(enc.conv_in)
    for conv in _resampling_convs(enc.down_blocks, "downsamplers"):
        _average_conv(conv)
    # encoder output: GroupNorm(1) divides by sigma = sqrt(sum of squares / channels) ~ K * sqrt(2 / C)
    channels = enc.conv_norm_out.num_channels
    sigma = CONSTANT * math.sqrt(2 / channels)
    enc.conv_out.weight.zero_()
    _bias(enc.conv_out).zero_()
    latent = vae.config["latent_channels"]
    for c in range(3):
        enc.conv_out.weight[c, c, 1, 1] = sigma  # sigma * (SiLU(n) - SiLU(-n)) = sigma * n = colour
        enc.conv_out.weight[c, c + SIGNALS, 1, 1] = -sigma
    _bias(enc.conv_out)[latent:] = LOGVAR
    if vae.quant_conv is not None:
        _identity_conv(vae.quant_conv)
        vae.quant_conv.weight[latent:, latent:, 0, 0] = torch.eye(latent)
    if vae.post_quant_conv is not None:
        vae.post_quant_conv.weight.zero_()
        _bias(vae.post_quant_conv).zero_()
        vae.post_quant_conv.weight[:, :, 0, 0] = torch.eye(latent)
    # decoder input: the latent colours, signed, beside the constant
    _signed_colours(dec.conv_in)
    for conv in _resampling_convs(dec.up_blocks, "upsamplers"):
        _identity_conv(conv)  # after nearest-neighbour upsampling: the block colour, painted
    # AutoencoderKL builds its Decoder with the default norm_type "group" (a SpatialNorm only in other VAEs)
    sigma = CONSTANT * math.sqrt(2 / cast(torch.nn.GroupNorm, dec.conv_norm_out).num_channels)
    dec.conv_out.weight.zero_()
    _bias(dec.conv_out).zero_()
    for c in range(3):
        dec.conv_out.weight[c, c, 1, 1] = sigma
        dec.conv_out.weight[c, c + SIGNALS, 1, 1] = -sigma
    return vae


# Adam's first steps move every weight by about lr; beyond ~1e-4 that shakes the exact start more than
# a short fit recovers.
FIT_LR = 5e-5


def fit_vae(vae: AutoencoderKL, images: np.ndarray, steps: int, batch_size: int = 16, lr: float = FIT_LR,
            seed: int = 0, progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Fit ``vae`` (from ``block_colour_init``) to uint8 (N, H, W, 3) ``images`` for ``steps`` Adam steps on the
    reconstruction error of posterior samples, then set its ``shift_factor`` and ``scaling_factor``; returns
    the losses."""
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1

    def batch_loss(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = x_all[idx]
        # AutoencoderKLOutput and DecoderOutput (return_dict=True): diffusers' forward-hook decorator erases the types
        posterior: DiagonalGaussianDistribution = vae.encode(x).latent_dist
        decoded: DecoderOutput = vae.decode(posterior.sample(generator=g))
        return F.mse_loss(decoded.sample, x)

    vae.train()
    losses = adam_fit(vae.parameters(), batch_loss, len(x_all), steps, batch_size, lr, seed, progress)
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(x_all[i : i + 64]).latent_dist.mean for i in range(0, len(x_all), 64)])
    colours = means[:, :3]  # the fourth channel is (near) constant: it says nothing of the scale
    shift = float(colours.mean())
    vae.register_to_config(shift_factor=shift, scaling_factor=float(1.0 / (colours - shift).std()))
    return losses


def prepared_demo_samples(sources: Iterable[str], resolution: int, limit: int) -> Iterator[tuple[dict, np.ndarray]]:
    """(sample, crop) of up to ``limit`` demo samples, ADM-cropped to ``resolution`` as the demo encodes them
    (full JPEG decode)."""
    from stages.core.encoders.images import Prepared, prepare_sample
    from stages.core.encoders.tars import expand_source, iter_tar

    count = 0
    for url in sources:
        for tar in expand_source(url):
            for sample in iter_tar(tar):
                prepared = prepare_sample(sample, resolution, 64_000_000, False)
                if isinstance(prepared, Prepared):
                    yield sample, prepared.image
                    count += 1
                if count >= limit:
                    return


def demo_images(sources: Iterable[str], resolution: int, limit: int) -> np.ndarray:
    """Up to ``limit`` images of the demo shards, ADM-cropped to ``resolution`` as `repa encode` crops them."""
    return np.stack([image for _, image in prepared_demo_samples(sources, resolution, limit)])


def fit_demo_vae(vae_dir: Path, source: str, resolution: int, steps: int, batch_size: int = 16,
                 max_images: int = 1024, seed: int = 0, progress=None) -> list[float]:
    """Rebuild the VAE saved in ``vae_dir`` as the block-colour autoencoder, fit it to the demo shards
    ``source`` and save it back (same folder, same classes: the encode stage loads it as before)."""
    vae = AutoencoderKL.from_pretrained(vae_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        block_colour_init(vae)
        losses = fit_vae(vae, demo_images([source], resolution, max_images), steps, batch_size, seed=seed,
                         progress=progress)
    vae.save_pretrained(vae_dir)
    return losses
