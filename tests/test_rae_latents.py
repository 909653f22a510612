"""RAE's latent normalisation, against hand transcriptions of bytetriper/RAE@a4d18c4 (cited per function)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from stages.core.diffusion.token_stats import (
    RAE_EPS,
    LatentStats,
    StatsAccumulator,
    latent_to_tokens,
    load_stats,
    save_stats,
    strip_layernorm_affine,
    tokens_to_latent,
)
from stages.core.errors import UsageError

# ---- transcriptions of bytetriper/RAE@a4d18c4db766419cbe7cb8c02cd9f7ceb0ec9041 ----------------------


def rae_encode_tail(z, latent_mean, latent_var, eps=1e-5):
    """src/stage1/rae.py:87-94 (reshape_to_2d, then do_normalization), applied to the encoder's tokens."""
    b, n, c = z.shape
    h = w = int(math.sqrt(n))
    z = z.transpose(1, 2).view(b, c, h, w)
    return (z - latent_mean) / torch.sqrt(latent_var + eps)


def rae_decode_head(z, latent_mean, latent_var, eps=1e-5):
    """src/stage1/rae.py:98-105: undo the normalisation, back to (B, N, C) tokens for the decoder."""
    z = z * torch.sqrt(latent_var + eps) + latent_mean
    b, c, h, w = z.shape
    return z.view(b, c, h * w).transpose(1, 2)


class RaeStatsLayer:
    """src/calculate_stat.py:73-95, LayerNormwStatistics in training mode (running statistics over dim 0)."""

    def __init__(self, input_shape, momentum=0.1):
        self.momentum = momentum
        self.running_mean = torch.zeros(*input_shape)
        self.running_var = torch.ones(*input_shape)

    def __call__(self, x):
        mean = x.mean(dim=0, keepdim=False)
        var = x.var(dim=0, keepdim=False, unbiased=False)
        m = self.momentum
        self.running_mean.mul_(1 - m).add_(mean, alpha=m)
        self.running_var.mul_(1 - m).add_(var, alpha=m)


def rae_sync_across_ranks(means, variances):
    """src/calculate_stat.py:155-172, _sync_mean_var_across_ranks with the all_reduce sums written out."""
    world_size = len(means)
    mean_sum = sum(m.float() for m in means)
    mean_sq_sum = sum(m.float() * m.float() for m in means)
    var_sum = sum(v.float() for v in variances)
    mean_global = mean_sum / world_size
    var_of_mean = mean_sq_sum / world_size - mean_global * mean_global
    var_global = torch.clamp(var_sum / world_size + var_of_mean, min=0.0)
    return mean_global, var_global


# ---- tests ------------------------------------------------------------------------------------------


def _tokens(batch=6, side=4, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, side * side, dim, generator=g) * 3 + 1.5


def _stats(side=4, dim=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, side, side, generator=g), torch.rand(dim, side, side, generator=g) * 4 + 0.01


def test_normalisation_matches_rae_encode():
    tokens = _tokens()
    mean, var = _stats()
    ours = LatentStats(mean, var).normalize(tokens_to_latent(tokens))
    torch.testing.assert_close(ours, rae_encode_tail(tokens, mean, var), rtol=0, atol=0)
    assert RAE_EPS == 1e-5  # src/stage1/rae.py:32, the default no RAE config overrides


def test_inverse_matches_rae_decode_and_round_trips():
    tokens = _tokens(seed=2)
    mean, var = _stats(seed=3)
    stats = LatentStats(mean, var)
    z = torch.randn(6, 8, 4, 4, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(latent_to_tokens(stats.denormalize(z)), rae_decode_head(z, mean, var), rtol=0, atol=0)
    back = latent_to_tokens(stats.denormalize(stats.normalize(tokens_to_latent(tokens))))
    torch.testing.assert_close(back, tokens, rtol=1e-5, atol=1e-5)


def test_statistics_are_per_channel_and_position_as_rae_computes_them():
    """One batch through RAE's layer with momentum 1 gives that batch's statistics, shape (C, h, w); the
    accumulator fed the same samples in uneven chunks gives the same, as the latent's layout."""
    tokens = _tokens(batch=11, seed=5)
    latent = rae_encode_tail(tokens, torch.tensor(0.0), torch.tensor(1.0), eps=0.0)  # RAE's latent before stats
    layer = RaeStatsLayer(latent.shape[1:], momentum=1.0)
    layer(latent)
    acc = StatsAccumulator()
    for chunk in (tokens[:2], tokens[2:7], tokens[7:]):
        acc.update(tokens_to_latent(chunk))
    stats = acc.result()
    assert stats.mean.shape == (8, 4, 4)
    torch.testing.assert_close(stats.mean, layer.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.var, layer.running_var, rtol=1e-5, atol=1e-6)


def test_merged_ranks_match_rae_cross_rank_combination():
    """Equal shards per rank (as DistributedSampler gives): RAE's mean-of-variances plus variance-of-means
    equals the accumulators merged across ranks."""
    tokens = _tokens(batch=12, seed=6)
    shards = tokens.chunk(4)
    means, variances, accs = [], [], []
    for shard in shards:
        layer = RaeStatsLayer((8, 4, 4), momentum=1.0)
        layer(tokens_to_latent(shard))
        means.append(layer.running_mean.clone())
        variances.append(layer.running_var.clone())
        acc = StatsAccumulator()
        acc.update(tokens_to_latent(shard))
        accs.append(acc)
    total = accs[0]
    for acc in accs[1:]:
        total.merge(acc)
    mean, var = rae_sync_across_ranks(means, variances)
    stats = total.result()
    torch.testing.assert_close(stats.mean, mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.var, var, rtol=1e-5, atol=1e-5)


def test_released_stat_file_loads_and_normalises_as_rae(tmp_path):
    mean, var = _stats(seed=7)
    path = tmp_path / "stat.pt"
    torch.save({"mean": mean.cpu(), "var": var.cpu()}, path)  # src/calculate_stat.py:335-340
    stats = load_stats(path, shape=(8, 4, 4))
    tokens = _tokens(seed=8)
    torch.testing.assert_close(stats.normalize(tokens_to_latent(tokens)), rae_encode_tail(tokens, mean, var),
                               rtol=0, atol=0)


def test_missing_mean_means_zero_as_rae(tmp_path):
    _, var = _stats(seed=9)
    path = tmp_path / "var-only.pt"
    torch.save({"var": var}, path)
    tokens = _tokens(seed=10)
    # src/stage1/rae.py:66 and 92: stats.get('mean') is None -> latent_mean = 0
    torch.testing.assert_close(load_stats(path).normalize(tokens_to_latent(tokens)),
                               rae_encode_tail(tokens, 0, var), rtol=0, atol=0)


def test_saved_statistics_reload(tmp_path):
    acc = StatsAccumulator()
    acc.update(tokens_to_latent(_tokens(seed=11)))
    stats = acc.result()
    save_stats(tmp_path / "s.pt", stats)
    raw = torch.load(tmp_path / "s.pt", weights_only=True)
    assert set(raw) == {"mean", "var"}
    again = load_stats(tmp_path / "s.pt", shape=(8, 4, 4))
    torch.testing.assert_close(again.mean, stats.mean, rtol=0, atol=0)
    torch.testing.assert_close(again.var, stats.var, rtol=0, atol=0)


@pytest.mark.parametrize("content, message", [
    ({"mean": argparse.Namespace(a=1), "var": torch.ones(1)}, "not a loadable"),
    ([torch.ones(1)], "not latent statistics"),
    ({"mean": torch.zeros(8, 5, 5), "var": torch.ones(8, 5, 5)}, "does not fit the latent"),
    ({"mean": torch.zeros(8, 4, 4), "var": -torch.ones(8, 4, 4)}, "negative"),
])
def test_bad_statistics_files_are_refused_in_one_line(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(UsageError) as err:
        load_stats(path, shape=(8, 4, 4))
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_statistics_file_is_refused(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_stats(tmp_path / "absent.pt")


def test_strip_affine_recovers_rae_layernorm_without_affine():
    """src/stage1/encoders/dinov2.py:22-25 removes the final LayerNorm's weight and bias; a cache of
    DINOv2's last_hidden_state has them applied."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(3, 16, 32, generator=g) * 2
    weight = torch.rand(32, generator=g) + 0.2
    bias = torch.randn(32, generator=g)
    rae_tokens = F.layer_norm(x, (32,), None, None, 1e-6)
    cached = F.layer_norm(x, (32,), weight, bias, 1e-6)
    torch.testing.assert_close(strip_layernorm_affine(cached, weight, bias), rae_tokens, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="zero"):
        strip_layernorm_affine(cached, torch.zeros(32), bias)
