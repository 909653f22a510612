"""A transcription of repa-rf (github.com/cloneofsimo/repa-rf): its DiT (``model.py``, einops
written out) and its optimiser setup (``get_mup_setup``), for comparing this project with it on identical
tensors. Parameter names are repa-rf's."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x_dtype = x.dtype
        x = x.float()
        norm = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * norm * self.weight).to(dtype=x_dtype)


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=True, is_self_attn=True, cross_attn_input_size=None):
        super().__init__()
        self.num_heads = num_heads
        self.is_self_attn = is_self_attn
        if is_self_attn:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        else:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.context_kv = nn.Linear(cross_attn_input_size, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, context=None):
        b, length, _ = x.shape
        if self.is_self_attn:
            q, k, v = self.qkv(x).reshape(b, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        else:
            q = self.q(x).reshape(b, length, self.num_heads, -1).transpose(1, 2)
            k, v = self.context_kv(context).reshape(b, context.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, length, -1))


class DiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qkv_bias=True, cross_attn_input_size=None):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.self_attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = RMSNorm(hidden_size)
        self.cross_attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=qkv_bias, is_self_attn=False,
                                    cross_attn_input_size=cross_attn_input_size)
        self.norm3 = RMSNorm(hidden_size)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 9 * hidden_size, bias=True))
        self.adaLN_modulation[-1].weight.data.zero_()
        self.adaLN_modulation[-1].bias.data.zero_()

    def forward(self, x, context, c):
        (shift_sa, scale_sa, gate_sa, shift_ca, scale_ca, gate_ca,
         shift_mlp, scale_mlp, gate_mlp) = self.adaLN_modulation(c).chunk(9, dim=1)
        norm_x = self.norm1(x) * (1 + scale_sa[:, None, :]) + shift_sa[:, None, :]
        x = x + gate_sa[:, None, :] * self.self_attn(norm_x)
        norm_x = self.norm2(x) * (1 + scale_ca[:, None, :]) + shift_ca[:, None, :]
        x = x + gate_ca[:, None, :] * self.cross_attn(norm_x, context)
        norm_x = self.norm3(x) * (1 + scale_mlp[:, None, :]) + shift_mlp[:, None, :]
        return x + gate_mlp[:, None, :] * self.mlp(norm_x)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size=16, in_channels=3, embed_dim=768):
        super().__init__()
        self.patch_proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.patch_proj(x).flatten(2).transpose(1, 2)


class DiT(nn.Module):
    def __init__(self, in_channels=4, patch_size=2, depth=28, num_heads=16, mlp_ratio=4.0, cross_attn_input_size=128,
                 hidden_size=1152, repa_target_layers=(6,), repa_target_dim=1536):
        super().__init__()
        self.in_channels, self.out_channels, self.patch_size = in_channels, in_channels, patch_size
        self.hidden_size = hidden_size
        self.positional_embedding = nn.Parameter(torch.zeros(1, 1024, hidden_size))
        self.patch_embed = PatchEmbed(patch_size, in_channels, hidden_size)
        self.time_embed = nn.Sequential(nn.Linear(hidden_size, 4 * hidden_size), nn.SiLU(),
                                        nn.Linear(4 * hidden_size, hidden_size))
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, cross_attn_input_size=cross_attn_input_size)
            for _ in range(depth)])
        self.repa_target_layers = list(repa_target_layers)
        self.repa_transforms = nn.ModuleList([
            nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, repa_target_dim))
            for _ in repa_target_layers])
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))
        self.final_norm = RMSNorm(hidden_size)
        self.final_proj = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        for m in (self.final_modulation[-1], self.final_proj):
            m.weight.data.zero_()
            m.bias.data.zero_()

    def forward(self, x, context, timesteps):
        b, c, h, w = x.shape
        x = self.patch_embed(x)
        x = x + self.positional_embedding.repeat(b, 1, 1)[:, : x.shape[1], :]
        t_emb = self.time_embed(timestep_embedding(timesteps, self.hidden_size).to(x.device, dtype=x.dtype))
        repa_feats, repa_idx = [], 0
        for idx, block in enumerate(self.blocks):
            x = block(x, context, t_emb)
            if idx in self.repa_target_layers:
                repa_feats.append(self.repa_transforms[repa_idx](x))
                repa_idx += 1
        final_shift, final_scale = self.final_modulation(t_emb).chunk(2, dim=1)
        x = self.final_norm(x) * (1 + final_scale[:, None, :]) + final_shift[:, None, :]
        x = self.final_proj(x)
        p, hp, wp = self.patch_size, h // self.patch_size, w // self.patch_size
        x = x.reshape(b, hp, wp, p, p, self.out_channels)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(b, self.out_channels, h, w), repa_feats

    def get_mup_setup(self, learning_rate, weight_decay, constant_param_classes):
        no_decay_name_list = ["bias", "norm"]
        groups: dict = {}
        for n, p in self.named_parameters():
            if any(nd in n for nd in no_decay_name_list):
                lr_value, wd_value = learning_rate * 0.1, 0.0
            else:
                hidden_dim = p.shape[-1]
                lr_value, wd_value = learning_rate * (32 / hidden_dim), weight_decay * hidden_dim / 1024
            if any(cp in n for cp in constant_param_classes):
                lr_value, wd_value = learning_rate * 0.1, 0.0
            groups.setdefault((lr_value, wd_value), []).append(p)
        return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


CONSTANT_PARAM_NAMES = ["patch_proj", "context_kv", "positional_embedding"]


def seed_dit(width: int, depth: int = 9, head_dim: int = 64, text_dim: int = 4096, repa_dim: int = 1536) -> DiT:
    """As repa-rf's trainer builds it (block index 6 aligned)."""
    return DiT(in_channels=16, patch_size=2, depth=depth, num_heads=width // head_dim, mlp_ratio=4.0,
               cross_attn_input_size=text_dim, hidden_size=width, repa_target_layers=[6], repa_target_dim=repa_dim)


def seed_interpolate_pos_encoding(pos_embed: torch.Tensor, height: int, width: int, patch_size: int = 14,
                                  offset: float = 0.1) -> torch.Tensor:
    """repa-rf's DINOv2 position table for an input of ``height`` x ``width`` pixels (repa-rf@b94fc1a ``dinov2.py``,
    ``DinoVisionTransformer.interpolate_pos_encoding``, lines ~204-236; its ``w, h`` are the input's dims 2 and 3):
    the table as is when the patch count and the sides match, else the M x M patch part bicubic (no antialias,
    align_corners=False) at scale factors ((rows + offset) / M, (cols + offset) / M), in float32."""
    n = pos_embed.shape[1] - 1
    rows, cols = height // patch_size, width // patch_size
    if rows * cols == n and height == width:
        return pos_embed
    m = int(math.sqrt(n))
    assert m * m == n
    table = pos_embed.float()
    grid = table[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, mode="bicubic", align_corners=False,
                         scale_factor=((rows + offset) / m, (cols + offset) / m))
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, table.shape[-1])
    return torch.cat([table[:, :1], grid], dim=1).to(pos_embed.dtype)
