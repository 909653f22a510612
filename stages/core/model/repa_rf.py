"""repa-rf's CC12M DiT (cloneofsimo/repa-rf, ``model.py``), for reproducing its experiments.

What sets it apart from SiT, all kept here because they are the experiment:

- RMSNorm with a learned weight (eps 1e-6, computed in float32) before attention, cross-attention, MLP
  and the final projection; no LayerNorm anywhere;
- a learned position embedding of 1024 slots, zero-initialised, of which the first N tokens are used;
- the time embedding is a sinusoid of the raw t with ``width`` channels (cosines first), then
  Linear(w, 4w) · SiLU · Linear(4w, w); captions do not enter the conditioning vector;
- every block: self-attention (qkv with bias, output projection without), cross-attention whose keys and
  values come straight from the caption states through ``context_kv`` (text_dim -> 2w, no caption
  projection, no pooling), and an MLP with exact GELU; a 9-way adaLN, zero-initialised;
- the final layer modulates an RMSNorm (shift, then scale) and projects with a zero-initialised Linear;
- the REPA projector is Linear(w, w) · SiLU · Linear(w, dim), named ``repa_transforms``;
- PyTorch's default initialisation everywhere else (no DiT-style xavier init).

Parameter names follow repa-rf's, so its state dicts load as they are. Where repa-rf hard-codes the
alignment block (index 6, i.e. ``align_layer=7``) and attends to padded caption tokens without a mask,
those are settings here (``align_layer``, ``text_mask=False``). The seed predicts x - eps where SiT predicts
eps - x: one is the other with the output sign flipped, which a zero-initialised output layer and a
sign-symmetric optimiser (AdamW) learn identically, so the project's objective is kept.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.core.model.model_config import ModelConfig

MAX_POSITIONS = 1024  # repa-rf's fixed table size


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(dtype)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, width: int, patch_size: int):
        super().__init__()
        self.patch_proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.patch_proj(x).flatten(2).transpose(1, 2)


def _heads(x: Tensor, parts: int, num_heads: int) -> tuple[Tensor, ...]:
    """(B, L, parts*H*d) -> parts tensors (B, H, L, d): the packed layout is part, head, channel."""
    b, length, _ = x.shape
    x = x.reshape(b, length, parts, num_heads, -1).permute(2, 0, 3, 1, 4)
    return tuple(x.unbind(0))


class Attention(nn.Module):
    """Self-attention (``qkv``) or cross-attention (``q`` from the tokens, ``context_kv`` from the captions)."""

    def __init__(self, width: int, num_heads: int, context_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        if context_dim is None:
            self.qkv = nn.Linear(width, 3 * width)
        else:
            self.q = nn.Linear(width, width)
            self.context_kv = nn.Linear(context_dim, 2 * width)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        if context is None:
            q, k, v = _heads(self.qkv(x), 3, self.num_heads)
        else:
            (q,) = _heads(self.q(x), 1, self.num_heads)
            k, v = _heads(self.context_kv(context), 2, self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_ratio: float, context_dim: int):
        super().__init__()
        self.norm1 = RMSNorm(width)
        self.self_attn = Attention(width, num_heads)
        self.norm2 = RMSNorm(width)
        self.cross_attn = Attention(width, num_heads, context_dim)
        self.norm3 = RMSNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        modulation = nn.Linear(width, 9 * width)
        nn.init.zeros_(modulation.weight)
        nn.init.zeros_(modulation.bias)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), modulation)

    def forward(self, x: Tensor, context: Tensor, c: Tensor, mask: Tensor | None) -> Tensor:
        (shift_sa, scale_sa, gate_sa, shift_ca, scale_ca, gate_ca,
         shift_mlp, scale_mlp, gate_mlp) = self.adaLN_modulation(c).chunk(9, dim=1)
        h = self.norm1(x) * (1 + scale_sa[:, None]) + shift_sa[:, None]
        x = x + gate_sa[:, None] * self.self_attn(h)
        h = self.norm2(x) * (1 + scale_ca[:, None]) + shift_ca[:, None]
        x = x + gate_ca[:, None] * self.cross_attn(h, context, mask)
        h = self.norm3(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp[:, None] * self.mlp(h)


class RepaRFDiT(nn.Module):
    # repa-rf's "constant" parameters: lr x 0.1 and no weight decay in its muP-style groups.
    input_params = ("patch_proj", "context_kv", "positional_embedding")

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        w, p, c = config.width, config.patch_size, config.in_channels
        self.positional_embedding = nn.Parameter(torch.zeros(1, max(MAX_POSITIONS, config.num_patches), w))
        self.patch_embed = PatchEmbed(c, w, p)
        self.time_embed = nn.Sequential(nn.Linear(w, 4 * w), nn.SiLU(), nn.Linear(4 * w, w))
        self.blocks = nn.ModuleList(
            Block(w, config.heads, config.mlp_ratio, config.caption_dim) for _ in range(config.depth)
        )
        self.repa_transforms = nn.ModuleList(
            nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, d)) for d in config.repa_dims
        )
        final_modulation = nn.Linear(w, 2 * w)
        self.final_modulation = nn.Sequential(nn.SiLU(), final_modulation)
        self.final_norm = RMSNorm(w)
        self.final_proj = nn.Linear(w, p * p * c)
        for zeroed in (final_modulation, self.final_proj):
            nn.init.zeros_(zeroed.weight)
            nn.init.zeros_(zeroed.bias)

    @property
    def projectors(self) -> nn.ModuleList:
        return self.repa_transforms

    def null_text(self, batch_size: int, seq_len: int = 1) -> tuple[Tensor, Tensor]:
        """The seed trained no null caption; an all-zero caption stands in for one when asked for (CFG)."""
        tokens = self.final_proj.weight.new_zeros(batch_size, seq_len, self.config.caption_dim)
        return tokens, torch.ones(batch_size, seq_len, dtype=torch.bool, device=tokens.device)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, p*p*C) -> (B, C, H, W); the channel is the fastest index within a patch."""
        p, channels = self.config.patch_size, self.config.in_channels
        grid = self.config.input_size // p
        x = x.reshape(x.shape[0], grid, grid, p, p, channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], channels, grid * p, grid * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, text: Tensor | None = None,
                text_mask: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Same call as SiT's: velocity (B, C, H, W) and one projected (B, N, dim) tensor per target."""
        if text is None:
            raise ValueError("the repa-rf DiT needs caption embeddings text")
        tokens = self.patch_embed(x)
        tokens = tokens + self.positional_embedding[:, : tokens.shape[1]]
        c = self.time_embed(timestep_embedding(t, self.config.width).to(tokens.dtype))
        mask = None
        if self.config.text_mask and text_mask is not None:
            # A caption without any token would make every logit -inf: let it attend to its zero padding.
            mask = (text_mask | ~text_mask.any(dim=-1, keepdim=True))[:, None, None, :]
        projected: list[Tensor | None] = [None] * len(self.repa_transforms)
        layers = self.config.projector_layers[: len(projected)]  # none when loaded without projectors
        for index, block in enumerate(self.blocks, start=1):
            tokens = block(tokens, text, c, mask)
            for k, layer in enumerate(layers):
                if layer == index:
                    projected[k] = self.repa_transforms[k](tokens)
        # ModelConfig.validate() puts every projector's block within 1..depth, so no entry is left None.
        shift, scale = self.final_modulation(c).chunk(2, dim=1)
        tokens = self.final_norm(tokens) * (1 + scale[:, None]) + shift[:, None]
        return self.unpatchify(self.final_proj(tokens)), cast(list[Tensor], projected)
