"""A transcription of official REPA (github.com/sihyun-yu/REPA) for comparing this project with it on
identical tensors: ``models/sit.py`` (SiT, with timm's PatchEmbed/Attention/Mlp written out under the
same parameter names), ``samplers.py`` (``euler_sampler`` with Heun and the guidance interval),
``generate.py``'s pixel conversion and ``train.py``'s checkpoint layout. Only what the tests use is here.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# -- models/sit.py ----------------------------------------------------------------------------------


def build_mlp(hidden_size, projector_dim, z_dim):
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                         nn.SiLU(), nn.Linear(projector_dim, z_dim))


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def positional_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        return self.mlp(self.positional_embedding(t, self.frequency_embedding_size).to(t.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels, train):
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):  # timm.layers.PatchEmbed(img, patch, in_chans, embed_dim, bias=True)
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):  # timm Attention(dim, num_heads, qkv_bias=True), fused path
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):  # timm Mlp with GELU(tanh), drop 0
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


class SiT(nn.Module):
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, decoder_hidden_size=768,
                 encoder_depth=8, depth=28, num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                 use_cfg=False, z_dims=(768,), projector_dim=2048):
        super().__init__()
        self.in_channels = self.out_channels = in_channels
        self.patch_size, self.num_heads, self.encoder_depth = patch_size, num_heads, encoder_depth
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.projectors = nn.ModuleList([build_mlp(hidden_size, projector_dim, z) for z in z_dims])
        self.final_layer = FinalLayer(decoder_hidden_size, patch_size, self.out_channels)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], int(num_patches**0.5))
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))

    def unpatchify(self, x):
        c, p = self.out_channels, self.x_embedder.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(shape=(x.shape[0], c, h * p, w * p))

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        n, t_, d = x.shape
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        zs = None
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if (i + 1) == self.encoder_depth:
                zs = [projector(x.reshape(-1, d)).reshape(n, t_, -1) for projector in self.projectors]
        return self.unpatchify(self.final_layer(x, c)), zs


def train_checkpoint(net: SiT, ema: SiT, steps: int, **args) -> dict:
    """What REPA's train.py saves at a checkpointing step (``args``: its argparse namespace)."""
    return {"model": net.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": argparse.Namespace(**args),
            "steps": steps}


# -- samplers.py: euler_sampler ----------------------------------------------------------------------


def euler_sampler(model, latents, y, num_steps=20, heun=False, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0,
                  null_class=1000):
    _dtype = latents.dtype
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x_next = latents.to(torch.float64)
    y_null = torch.tensor([null_class] * y.size(0))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:], strict=True)):
        x_cur = x_next
        if cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high:
            model_input, y_cur = torch.cat([x_cur] * 2), torch.cat([y, y_null])
        else:
            model_input, y_cur = x_cur, y
        time_input = torch.ones(model_input.size(0)).to(dtype=torch.float64) * t_cur
        d_cur = model(model_input.to(_dtype), time_input.to(_dtype), y_cur)[0].to(torch.float64)
        if cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high:
            d_cur_cond, d_cur_uncond = d_cur.chunk(2)
            d_cur = d_cur_uncond + cfg_scale * (d_cur_cond - d_cur_uncond)
        x_next = x_cur + (t_next - t_cur) * d_cur
        if heun and (i < num_steps - 1):
            if cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high:
                model_input, y_cur = torch.cat([x_next] * 2), torch.cat([y, y_null])
            else:
                model_input, y_cur = x_next, y
            time_input = torch.ones(model_input.size(0)).to(dtype=torch.float64) * t_next
            d_prime = model(model_input.to(_dtype), time_input.to(_dtype), y_cur)[0].to(torch.float64)
            if cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high:
                d_prime_cond, d_prime_uncond = d_prime.chunk(2)
                d_prime = d_prime_uncond + cfg_scale * (d_prime_cond - d_prime_uncond)
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


# -- generate.py: pixels ------------------------------------------------------------------------------


def to_uint8(samples):
    samples = (samples + 1) / 2.0
    return torch.clamp(255.0 * samples, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)
