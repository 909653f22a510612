"""A VAE whose config holds per-channel ``latents_mean``/``latents_std`` (REPA-E's diffusers releases) is normalised
per channel from encode through training to decoding, as REPA-E's SiT normalises its latents."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from stages.core.diffusion.objective import latent_normalisation, sample_latents
from stages.core.encoders.load import EncoderLoadError, vae_geometry

CHANNELS = 4
MEAN = [0.5, -1.0, 0.25, 2.0]
STD = [2.0, 0.5, 1.5, 4.0]


@pytest.fixture(scope="module")
def stats_cache(tmp_path_factory, tiny_models, labelled_shards):
    """48 samples encoded with a tiny VAE whose config carries per-channel latent statistics."""
    from diffusers import AutoencoderKL

    from stages.encode.config import EncodeConfig
    from stages.encode.run import run_encode

    root = tmp_path_factory.mktemp("stats-vae")
    vae = AutoencoderKL.from_pretrained(tiny_models["vae"])
    vae.register_to_config(latents_mean=MEAN, latents_std=STD)
    vae.save_pretrained(root / "vae")
    cache = root / "cache"
    run_encode(EncodeConfig(source=str(labelled_shards[0]), cache=cache, resolution=64, vae=str(root / "vae"),
                            dino=str(tiny_models["dino"]), batch_size=16, num_workers=0))
    return cache


def test_the_cache_records_the_vaes_channel_statistics(stats_cache):
    from cache_schema import read_manifest
    from cache_schema.operations.info import describe

    manifest = read_manifest(stats_cache)
    assert manifest.latent["latents_mean"] == MEAN and manifest.latent["latents_std"] == STD
    vae_line = next(line for line in describe(manifest) if line.startswith("vae "))
    assert "per channel" in vae_line and "scale=" not in vae_line


def test_training_normalises_each_channel_by_its_mean_and_std(stats_cache):
    from cache_schema import CacheReader

    reader = CacheReader(stats_cache)
    moments = torch.from_numpy(reader.sample(0)["moments"]).float()[None]
    noise = torch.randn(1, CHANNELS, *moments.shape[2:], generator=torch.Generator().manual_seed(0))
    got = sample_latents(moments, *latent_normalisation(reader.manifest.latent), noise=noise)
    # REPA-E @ 3ad8046 train_ldm_only.py:68-71 samples z = mean + std * n from the cached moments; models/sit.py:
    # 218-219, 262-265, 318 then applies a frozen BatchNorm2d(affine=False, eps=1e-4) with running_mean = the
    # channel mean and running_var = std^2: (z - mean_c) / sqrt(std_c^2 + 1e-4)
    z = moments[:, :CHANNELS] + moments[:, CHANNELS:] * noise
    bn = torch.nn.BatchNorm2d(CHANNELS, eps=1e-4, affine=False).eval()
    bn.running_mean.copy_(torch.tensor(MEAN))
    bn.running_var.copy_(torch.tensor(STD) ** 2)
    theirs = bn(z)
    exact = torch.stack([(z[:, c] - MEAN[c]) / STD[c] for c in range(CHANNELS)], dim=1)
    torch.testing.assert_close(got, exact)
    # the BatchNorm's eps is the only difference: relative 1e-4 / (2 std^2) at most
    torch.testing.assert_close(got, theirs, rtol=1e-4 / (2 * min(STD) ** 2) + 1e-6, atol=1e-6)


def test_the_decoder_gives_the_vae_its_raw_latents_back(stats_cache):
    from cache_schema import read_manifest
    from stages.sample.decode import LatentDecoder

    decoder = LatentDecoder(read_manifest(stats_cache), torch.device("cpu"))
    seen = []
    decoder.vae.decode = lambda z: seen.append(z) or SimpleNamespace(sample=torch.zeros(len(z), 3, 8, 8))
    raw = torch.randn(2, CHANNELS, 8, 8, generator=torch.Generator().manual_seed(1))
    normalised = torch.stack([(raw[:, c] - MEAN[c]) / STD[c] for c in range(CHANNELS)], dim=1)
    decoder(normalised)
    torch.testing.assert_close(seen[0], raw)


def test_a_vae_without_channel_statistics_keeps_its_scalar_factors():
    cfg = dict(latent_channels=CHANNELS, block_out_channels=[8, 8, 16, 16], scaling_factor=0.18215, latents_mean=None,
               latents_std=None)
    assert latent_normalisation(vae_geometry(cfg)) == (0.18215, 0.0)


@pytest.mark.parametrize("mean, std", [(MEAN[:3], STD[:3]), (MEAN, None), (MEAN, [1.0, 0.0, 1.0, 1.0])])
def test_malformed_channel_statistics_are_refused_in_one_line(mean, std):
    cfg = dict(_name_or_path="some/vae", latent_channels=CHANNELS, block_out_channels=[8, 8], latents_mean=mean,
               latents_std=std)
    with pytest.raises(EncoderLoadError) as err:
        vae_geometry(cfg)
    assert "some/vae" in str(err.value) and "latents_mean" in str(err.value) and "\n" not in str(err.value)


def test_training_and_validation_draw_their_latents_with_the_channel_statistics(stats_cache, tmp_path, monkeypatch):
    import math

    from stages.core.diffusion import diffusion_variable
    from stages.train.loop import run_train

    from .test_train import tiny_train

    factors = []

    def recording(moments, scale, shift, **kw):
        factors.append((scale, shift))
        return sample_latents(moments, scale, shift, **kw)

    monkeypatch.setattr(diffusion_variable, "sample_latents", recording)  # training and validation both draw here
    result = run_train(tiny_train(stats_cache, tmp_path / "run", batch_size=4))
    assert math.isfinite(result.final_val["denoise"])
    assert len(factors) > 6  # every step and every validation batch
    for scale, shift in factors:
        torch.testing.assert_close(scale.flatten().cpu(), 1.0 / torch.tensor(STD))
        torch.testing.assert_close(shift.flatten().cpu(), torch.tensor(MEAN))
