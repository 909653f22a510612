"""LightningDiT's building blocks, as RAE uses them (bytetriper/RAE ``src/stage2/models/model_utils.py``,
``lightningDiT.py``, ``DDT.py``), with RAE's parameter names so its state dicts load as they are.

- :class:`RMSNorm` (the project's, weight and eps 1e-6, computed in float32) replaces LayerNorm;
- :class:`SwiGLUFFN`: ``w3(silu(a) * b)`` with ``[a, b] = w12(x)``, hidden size int(2/3 · mlp_ratio · width);
- :class:`VisionRotaryEmbeddingFast`: EVA-style 2-D RoPE; each head's first half of channels rotates with
  the token's row, the second half with its column, channel pairs (2i, 2i+1) rotated together, frequencies
  10000^(-2i/d) for d = head_dim/2; its cos/sin tables are persistent buffers (they are in RAE's state dicts);
- :class:`NormAttention`: qkv with bias, optional q/k norm, RoPE on q and k, SDPA, output projection;
- :class:`GaussianFourierEmbedding` of the time: sin and cos of 2π·t·W, W ~ N(0, 1) fixed (256), then an MLP;
- :class:`LightningBlock`: adaLN-Zero (shift, scale, gate for attention and MLP) around pre-norms; the
  conditioning is one vector per sample (B, D) or one per token (B, L, D), as DiT-DH's head uses;
- :class:`FinalLayer`: norm, shift/scale modulation, linear.

RAE's ``wo_shift`` option is not offered: its own blocks fail with it (a None shift is added).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.core.model.repa_rf import RMSNorm
from stages.core.model.sit import PatchEmbed  # timm's PatchEmbed as RAE builds it: Conv2d ``proj``, tokens row-major

__all__ = ["PatchEmbed", "LabelEmbedder", "RMSNorm", "SwiGLUFFN", "GeluMlp", "VisionRotaryEmbeddingFast",
           "NormAttention", "GaussianFourierEmbedding", "LightningBlock", "FinalLayer", "modulate", "swiglu_hidden"]


def swiglu_hidden(width: int, mlp_ratio: float) -> int:
    """LightningDiT's SwiGLU hidden size: two thirds of the plain MLP's, rounded down as RAE rounds it."""
    return int(2 / 3 * int(width * mlp_ratio))


def _per_token(mod: Tensor, length: int) -> Tensor:
    """(B, D) or (B, L, D) modulation -> broadcastable against (B, length, D); L must divide length."""
    if mod.dim() == 2:
        return mod.unsqueeze(1)
    if mod.shape[1] not in (1, length):
        if length % mod.shape[1]:
            raise ValueError(f"{length} tokens cannot share {mod.shape[1]} modulation rows")
        mod = mod.repeat_interleave(length // mod.shape[1], dim=1)
    return mod


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x·(1 + scale) + shift, per sample or per token."""
    return x * (1 + _per_token(scale, x.shape[1])) + _per_token(shift, x.shape[1])


class SwiGLUFFN(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(width, 2 * hidden)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class GeluMlp(nn.Module):
    """timm's Mlp with tanh-approximated GELU (``use_swiglu: false``); names fc1, fc2."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _rotate_pairs(x: Tensor) -> Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class VisionRotaryEmbeddingFast(nn.Module):
    freqs_cos: Tensor
    freqs_sin: Tensor
    """2-D rotary embedding for a ``side`` x ``side`` token grid and heads of ``2 * dim`` channels."""

    def __init__(self, dim: int, side: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        positions = torch.arange(side) / side * side  # RAE's ft_seq_len = pt_seq_len grid
        angles = (positions[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # (side, dim)
        rows = angles[:, None, :].expand(side, side, dim)
        cols = angles[None, :, :].expand(side, side, dim)
        table = torch.cat([rows, cols], dim=-1).reshape(side * side, 2 * dim)
        self.register_buffer("freqs_cos", table.cos())
        self.register_buffer("freqs_sin", table.sin())

    def forward(self, x: Tensor) -> Tensor:
        """x (B, heads, L, head_dim), L a multiple of the grid's token count."""
        cos, sin = self.freqs_cos, self.freqs_sin
        if x.shape[2] != cos.shape[0]:
            repeat = x.shape[2] // cos.shape[0]
            cos, sin = cos.repeat_interleave(repeat, dim=0), sin.repeat_interleave(repeat, dim=0)
        return x * cos + _rotate_pairs(x) * sin


class NormAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, qk_norm: bool = False, use_rmsnorm: bool = True):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.qkv = nn.Linear(width, 3 * width)
        norm = (lambda: RMSNorm(self.head_dim)) if use_rmsnorm else (lambda: nn.LayerNorm(self.head_dim))
        self.q_norm = norm() if qk_norm else nn.Identity()
        self.k_norm = norm() if qk_norm else nn.Identity()
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, rope: VisionRotaryEmbeddingFast | None = None) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class GaussianFourierEmbedding(nn.Module):
    W: Tensor
    """Time embedding: MLP(sin(2π·t·W), cos(2π·t·W)), W a fixed N(0, scale²) draw (a persistent buffer)."""

    def __init__(self, width: int, embedding_size: int = 256, scale: float = 1.0):
        super().__init__()
        self.register_buffer("W", torch.normal(0.0, scale, (embedding_size,)))
        self.mlp = nn.Sequential(nn.Linear(2 * embedding_size, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        angles = t[:, None] * self.W[None, :] * 2 * math.pi
        return self.mlp(torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1))


def _norm(width: int, use_rmsnorm: bool) -> nn.Module:
    return RMSNorm(width) if use_rmsnorm else nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)


class LightningBlock(nn.Module):
    """One LightningDiT block: x += gate·attn(mod(norm(x))); x += gate·mlp(mod(norm(x)))."""

    mlp: SwiGLUFFN | GeluMlp

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0, use_qknorm: bool = False,
                 use_swiglu: bool = True, use_rmsnorm: bool = True):
        super().__init__()
        self.norm1 = _norm(width, use_rmsnorm)
        self.norm2 = _norm(width, use_rmsnorm)
        self.attn = NormAttention(width, num_heads, qk_norm=use_qknorm, use_rmsnorm=use_rmsnorm)
        if use_swiglu:
            self.mlp = SwiGLUFFN(width, swiglu_hidden(width, mlp_ratio))
        else:
            self.mlp = GeluMlp(width, int(width * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: Tensor, c: Tensor, rope: VisionRotaryEmbeddingFast | None = None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        length = x.shape[1]
        x = x + _per_token(gate_msa, length) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + _per_token(gate_mlp, length) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_features: int, use_rmsnorm: bool = True):
        super().__init__()
        self.norm_final = _norm(width, use_rmsnorm)
        self.linear = nn.Linear(width, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class LabelEmbedder(nn.Module):
    """Class table with the null-class row (id ``num_classes``) when label dropout is used, as RAE's."""

    def __init__(self, num_classes: int, width: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), width)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)

