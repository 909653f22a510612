"""RAE's latent: frozen encoder tokens laid out as an image and normalised by dataset statistics.

RAE (bytetriper/RAE, ``src/stage1/rae.py``) turns the encoder's patch tokens (B, N, C) into a latent
(B, C, h, w) with h = w = sqrt(N), then normalises it element-wise,

    z' = (z - mean) / sqrt(var + eps),  eps = 1e-5,

with ``mean`` and ``var`` of shape (C, h, w): one statistic per channel *and* token position, taken over
the images only (``src/calculate_stat.py`` accumulates them with a BatchNorm-like layer over the batch
axis). Decoding inverts it, z = z' * sqrt(var + eps) + mean. RAE's own estimate is a momentum-0.1 running
average over batches of population statistics; :class:`StatsAccumulator` computes the exact population
mean and variance of the same shape over a whole cache instead (the quantity RAE's estimate tracks), and
:func:`load_stats` reads RAE's released ``stat.pt`` (``{"mean", "var"}``), so either can be used.

Where this plugs in: training on cached tokens turns each batch of tokens into a latent with
:func:`tokens_to_latent` and normalises it with :meth:`LatentStats.normalize` before the flow objective;
sampling inverts both (:meth:`LatentStats.denormalize`, :func:`latent_to_tokens`) before the RAE decoder.
The statistics are computed once per cache (an accumulator fed every cached sample, both views when the
cache holds flips, as RAE's statistics are taken over randomly flipped images) and written with
:func:`save_stats` in RAE's own format.

RAE's encoder (``Dinov2withNorm`` with ``normalize: true``) drops the affine weight and bias of DINOv2's
final LayerNorm; a cache holding DINOv2's ``last_hidden_state`` keeps them, and
:func:`strip_layernorm_affine` undoes them with the encoder's two LayerNorm vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from stages.core.errors import UsageError
from stages.core.files.tensor_files import load_tensors

RAE_EPS = 1e-5  # RAE.__init__'s default ``eps``; no RAE config overrides it


def tokens_to_latent(tokens: Tensor) -> Tensor:
    """(B, N, C) patch tokens in row-major order -> (B, C, h, w), h = w = sqrt(N)."""
    b, n, c = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(b, c, side, side)


def latent_to_tokens(latent: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h*w, C), the inverse of :func:`tokens_to_latent`."""
    b, c, h, w = latent.shape
    return latent.reshape(b, c, h * w).transpose(1, 2)


def strip_layernorm_affine(tokens: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """LayerNorm(x) without its affine part, from LayerNorm(x)·weight + bias (float32).

    Exact up to rounding, which the division by ``weight`` magnifies where the weight is small: a float16
    cache rounds each token to about 5e-4 of its value before this is applied.
    """
    weight, bias = weight.float().to(tokens.device), bias.float().to(tokens.device)
    if bool((weight == 0).any()):
        raise ValueError("the LayerNorm weight has zero entries: its input cannot be recovered there")
    return (tokens.float() - bias) / weight


@dataclass
class LatentStats:
    """Element-wise latent statistics; ``mean``/``var`` broadcast against (C, h, w) (RAE's are (C, h, w))."""

    mean: Tensor
    var: Tensor
    eps: float = RAE_EPS

    def normalize(self, latent: Tensor) -> Tensor:
        """(B, C, h, w) encoder latent -> the diffusion model's variable."""
        mean, var = self._on(latent)
        return (latent - mean) / torch.sqrt(var + self.eps)

    def denormalize(self, latent: Tensor) -> Tensor:
        """The diffusion model's variable -> the encoder latent the decoder reads."""
        mean, var = self._on(latent)
        return latent * torch.sqrt(var + self.eps) + mean

    def _on(self, latent: Tensor) -> tuple[Tensor, Tensor]:
        dtype = torch.promote_types(latent.dtype, torch.float32)
        return self.mean.to(latent.device, dtype), self.var.to(latent.device, dtype)

    def check_shape(self, shape: tuple[int, ...], source: str) -> None:
        """One error line unless mean and var broadcast against a latent of ``shape`` (C, h, w)."""
        for name, value in (("mean", self.mean), ("var", self.var)):
            try:
                ok = torch.broadcast_shapes(tuple(value.shape), tuple(shape)) == tuple(shape)
            except RuntimeError:
                ok = False
            if not ok:
                raise UsageError(f"{source}: '{name}' has shape {tuple(value.shape)}, which does not fit the latent "
                                 f"{tuple(shape)} (C, h, w); use statistics computed for this encoder and grid")


def load_stats(path: Path | str, shape: tuple[int, ...] | None = None, eps: float = RAE_EPS) -> LatentStats:
    """RAE's ``stat.pt`` (or one :func:`save_stats` wrote): ``{"mean": ..., "var": ...}``.

    As RAE does, a missing entry means mean 0 or variance 1. ``shape`` (C, h, w), when given, is checked.
    """
    obj = load_tensors(path, "latent statistics ({'mean', 'var'}, as RAE's stat.pt)")
    if not isinstance(obj, dict) or not ({"mean", "var"} & set(obj)):
        raise UsageError(f"{path}: not latent statistics (expected a dict with 'mean' and 'var' tensors, as RAE's "
                         "stat.pt)")
    values = {}
    for name, default in (("mean", 0.0), ("var", 1.0)):
        value = obj.get(name)
        if value is None:
            value = torch.tensor(default)
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise UsageError(f"{path}: '{name}' is {type(value).__name__}, not a floating-point tensor")
        if not bool(torch.isfinite(value).all()):
            raise UsageError(f"{path}: '{name}' has non-finite entries; recompute the statistics")
        values[name] = value.float()
    if bool((values["var"] < 0).any()):
        raise UsageError(f"{path}: 'var' has negative entries; recompute the statistics")
    stats = LatentStats(values["mean"], values["var"], eps)
    if shape is not None:
        stats.check_shape(shape, str(path))
    return stats


def save_stats(path: Path | str, stats: LatentStats) -> None:
    """Write ``{"mean", "var"}`` (float32, CPU) in RAE's ``stat.pt`` format, readable by RAE and :func:`load_stats`."""
    torch.save({"mean": stats.mean.detach().float().cpu(), "var": stats.var.detach().float().cpu()}, Path(path))


class StatsAccumulator:
    """Exact population mean and variance over the batch axis of (B, C, h, w) latents, in float64.

    Batches are combined with Chan et al.'s pairwise update, so the result does not depend on how the
    samples were split into batches or ranks (up to float64 rounding); :meth:`merge` combines
    accumulators of disjoint sample sets (e.g. one per rank).
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, latent: Tensor) -> None:
        x = latent.detach().to(torch.float64)
        n = x.shape[0]
        if n == 0:
            return
        mean = x.mean(dim=0)
        m2 = (x - mean).pow(2).sum(dim=0)
        self._combine(n, mean, m2)

    def merge(self, other: StatsAccumulator) -> None:
        if other.mean is not None and other.m2 is not None:  # None exactly while other.count is 0
            self._combine(other.count, other.mean, other.m2)

    def _combine(self, n: int, mean: Tensor, m2: Tensor) -> None:
        if self.mean is None or self.m2 is None:  # None exactly while self.count is 0
            self.count, self.mean, self.m2 = n, mean.clone(), m2.clone()
            return
        if mean.shape != self.mean.shape:
            raise ValueError(f"latent shape {tuple(mean.shape)} differs from the earlier {tuple(self.mean.shape)}")
        mean = mean.to(self.mean.device)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2.to(self.m2.device) + delta.pow(2) * (self.count * n / total)
        self.count = total

    def result(self, eps: float = RAE_EPS) -> LatentStats:
        if self.mean is None or self.m2 is None:  # None exactly while self.count is 0
            raise ValueError("no samples were accumulated")
        return LatentStats(self.mean.float(), (self.m2 / self.count).float(), eps)
