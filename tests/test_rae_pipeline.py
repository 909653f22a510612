"""The RAE blocks composed as RAE's sampler composes them: noise -> guided shifted Euler ODE with DiT-DH ->
de-normalised latent -> tokens -> decoder pixels, against bytetriper/RAE@a4d18c4 src/sample.py:65-105
transcribed here on the transcriptions of tests/rae_reference.py and tests/test_rae_*.py."""

from __future__ import annotations

import torch

from stages.core.diffusion.samplers import guided
from stages.core.diffusion.time_shift import shift_factor, shifted_euler_ode
from stages.core.diffusion.token_stats import LatentStats, latent_to_tokens
from stages.core.model.ddt import DiTwDDTHead
from stages.core.model.ddt_config import DDTConfig
from stages.core.model.rae_decoder import DecoderConfig, load_decoder
from tests import rae_reference as ref
from tests.test_rae_ddt import TINY, _randomised
from tests.test_rae_decoder import TINY as TINY_DECODER
from tests.test_rae_decoder import _randomised as _randomised_decoder
from tests.test_rae_latents import rae_decode_head
from tests.test_rae_time_shift import rae_ode_sample, rae_shift


def rae_sample(model, decoder, z, class_labels, stats, guidance_scale, t_min, t_max, shift):
    """src/sample.py:70-105 (cfg method, scale > 1), with RAE.decode written out (rae.py:97-109)."""
    n = len(class_labels)
    y = torch.tensor(class_labels)
    z = torch.cat([z, z], 0)
    y = torch.cat([y, torch.tensor([model.y_embedder.num_classes] * n)], 0)
    def model_fwd(x, t):
        return ref.ddt_forward_with_cfg(model, x, t, y, guidance_scale, (t_min, t_max))
    samples = rae_ode_sample(z, model_fwd, 50, shift)[-1]
    samples, _ = samples.chunk(2, dim=0)
    return ref.rae_decode_pixels(decoder, rae_decode_head(samples, stats.mean, stats.var))


def test_sampling_through_the_decoder_matches_rae(tmp_path):
    torch.manual_seed(0)
    theirs = _randomised(ref.DiTwDDTHead(patch_size=1, **TINY), 1).eval()
    ours = DiTwDDTHead(DDTConfig(**TINY))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval()
    tiny_decoder = {**TINY_DECODER, "hidden_size": TINY["in_channels"]}  # reads the 6-channel latent's tokens
    their_decoder = _randomised_decoder(ref.rae_decoder_for(
        tiny_decoder["hidden_size"], tiny_decoder["patch_size"], tiny_decoder["num_patches"],
        decoder_hidden_size=tiny_decoder["decoder_hidden_size"],
        decoder_num_hidden_layers=tiny_decoder["decoder_num_hidden_layers"],
        decoder_num_attention_heads=tiny_decoder["decoder_num_attention_heads"],
        decoder_intermediate_size=tiny_decoder["decoder_intermediate_size"]), 9)
    path = tmp_path / "model.pt"
    torch.save(their_decoder.state_dict(), path)
    decoder_config = DecoderConfig(**tiny_decoder)
    decoder = load_decoder(path, decoder_config)

    g = torch.Generator().manual_seed(3)
    stats = LatentStats(torch.randn(6, 4, 4, generator=g), torch.rand(6, 4, 4, generator=g) + 0.1)
    noise = torch.randn(2, 6, 4, 4, generator=g)
    labels = [1, 4]
    s = shift_factor(6 * 4 * 4, base=8)
    assert s == rae_shift(6 * 4 * 4, 8)

    with torch.no_grad():
        expected = rae_sample(theirs, their_decoder, noise, labels, stats, 1.7, 0.1, 0.8, s)
        fn = guided(lambda x, t, cond: ours.velocity(x, t, cond["y"]), {"y": torch.tensor(labels)},
                    {"y": torch.full((1,), ours.null_class)}, cfg=1.7, low=0.1, high=0.8)
        latent = shifted_euler_ode(fn, noise, s)
        got = decoder.decode(latent_to_tokens(stats.denormalize(latent)))
    assert got.shape == (2, 3, 8, 8)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
