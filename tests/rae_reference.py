"""Hand transcriptions of RAE's stage-2 network (bytetriper/RAE@a4d18c4db766419cbe7cb8c02cd9f7ceb0ec9041),
written from the cited lines for the tests to compare the project's modules with; not used by the product.
einops calls are written out as the tensor operations they denote; timm's PatchEmbed and Mlp (which RAE
imports) as timm defines them (a Conv2d ``proj`` then flatten/transpose; fc1, act, fc2).
"""

from __future__ import annotations

import math
from copy import deepcopy
from math import sqrt
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REF = "bytetriper/RAE@a4d18c4"


# src/stage2/models/model_utils.py:17-18
def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# model_utils.py:20-35, broadcat for the two-tensor case it is used for
def broadcat(tensors, dim=-1):
    shape = [max(s) for s in zip(*(t.shape for t in tensors), strict=True)]
    expanded = []
    for t in tensors:
        target = list(shape)
        target[dim] = t.shape[dim]
        expanded.append(t.expand(*target))
    return torch.cat(expanded, dim=dim)


# model_utils.py:38-42: rearrange '... (d r) -> ... d r' (r=2), stack(-x2, x1), back
def rotate_half(x):
    x = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x1, x2 = x.unbind(dim=-1)
    x = torch.stack((-x2, x1), dim=-1)
    return x.reshape(*x.shape[:-2], -1)


# model_utils.py:43-87 (numpy, float64 then float32)
def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega
    pos = pos.reshape(-1)
    out = np.einsum("m,d->md", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


# model_utils.py:139-198 (freqs_for='lang', theta 10000, ft_seq_len = pt_seq_len)
class VisionRotaryEmbeddingFast(nn.Module):
    def __init__(self, dim, pt_seq_len=16, theta=10000):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
        ft_seq_len = pt_seq_len
        t = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len
        freqs = torch.einsum("..., f -> ... f", t, freqs)
        freqs = freqs[..., :, None].expand(*freqs.shape, 2).reshape(*freqs.shape[:-1], -1)  # '... n -> ... (n r)'
        freqs = broadcat((freqs[:, None, :], freqs[None, :, :]), dim=-1)
        self.register_buffer("freqs_cos", freqs.cos().view(-1, freqs.shape[-1]))
        self.register_buffer("freqs_sin", freqs.sin().view(-1, freqs.shape[-1]))

    def forward(self, t):
        _, _, Lt, _ = t.shape
        L, _ = self.freqs_cos.shape
        repeat = Lt // L
        freqs_cos, freqs_sin = self.freqs_cos, self.freqs_sin
        if repeat != 1:
            freqs_cos = freqs_cos.repeat_interleave(repeat, dim=0)
            freqs_sin = freqs_sin.repeat_interleave(repeat, dim=0)
        return t * freqs_cos + rotate_half(t) * freqs_sin


# model_utils.py:252-272
class SwiGLUFFN(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, bias=True):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


# model_utils.py:275-318
class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self._norm(x.float()).type_as(x) * self.weight


# model_utils.py:321-382 (fused path)
class NormAttention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, norm_layer=nn.LayerNorm, use_rmsnorm=False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        if use_rmsnorm:
            norm_layer = RMSNorm
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = rope(q)
            k = rope(k)
        x = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


# model_utils.py:385-408
class GaussianFourierEmbedding(nn.Module):
    def __init__(self, hidden_size, embedding_size=256, scale=1.0):
        super().__init__()
        self.W = nn.Parameter(torch.normal(0, scale, (embedding_size,)), requires_grad=False)
        self.mlp = nn.Sequential(nn.Linear(embedding_size * 2, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))

    def forward(self, t):
        t = t[:, None] * self.W[None, :] * 2 * torch.pi
        return self.mlp(torch.cat([torch.sin(t), torch.cos(t)], dim=-1))


# model_utils.py:411-438
class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# timm.models.vision_transformer.PatchEmbed (norm Identity, flatten, NCHW -> NLC)
class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim, bias=True):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


# timm.layers.Mlp (fc1, act, fc2; no dropout, no norm)
class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, act_layer):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


# src/stage2/models/DDT.py:17-63
def DDTModulate(x, shift, scale):
    B, Lx, D = x.shape
    _, L, _ = shift.shape
    repeat = Lx // L
    if repeat != 1:
        shift = shift.repeat_interleave(repeat, dim=1)
        scale = scale.repeat_interleave(repeat, dim=1)
    return x * (1 + scale) + shift


def DDTGate(x, gate):
    B, Lx, D = x.shape
    _, L, _ = gate.shape
    repeat = Lx // L
    if repeat != 1:
        gate = gate.repeat_interleave(repeat, dim=1)
    return x * gate


# DDT.py:66-152 (wo_shift False)
class LightningDDTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, use_qknorm=False, use_swiglu=True, use_rmsnorm=True):
        super().__init__()
        if not use_rmsnorm:
            self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        else:
            self.norm1 = RMSNorm(hidden_size)
            self.norm2 = RMSNorm(hidden_size)
        self.attn = NormAttention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=use_qknorm,
                                  use_rmsnorm=use_rmsnorm)
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        if use_swiglu:
            self.mlp = SwiGLUFFN(hidden_size, int(2 / 3 * mlp_hidden_dim))
        else:
            self.mlp = Mlp(hidden_size, mlp_hidden_dim, act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c, feat_rope=None):
        if len(c.shape) < len(x.shape):
            c = c.unsqueeze(1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + DDTGate(self.attn(DDTModulate(self.norm1(x), shift_msa, scale_msa), rope=feat_rope), gate_msa)
        x = x + DDTGate(self.mlp(DDTModulate(self.norm2(x), shift_mlp, scale_mlp)), gate_mlp)
        return x


# DDT.py:155-180
class DDTFinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels, use_rmsnorm=False):
        super().__init__()
        if not use_rmsnorm:
            self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        else:
            self.norm_final = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        if len(c.shape) < len(x.shape):
            c = c.unsqueeze(1)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(DDTModulate(self.norm_final(x), shift, scale))


# DDT.py:183-362 (use_rope True; initialize_weights with xavier_uniform_init False)
class DiTwDDTHead(nn.Module):
    def __init__(self, input_size=1, patch_size=1, in_channels=768, hidden_size=(1152, 2048), depth=(28, 2),
                 num_heads=(16, 16), mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, use_qknorm=False,
                 use_swiglu=True, use_rope=True, use_rmsnorm=True, use_pos_embed=True):
        super().__init__()
        self.in_channels = in_channels
        self.encoder_hidden_size, self.decoder_hidden_size = hidden_size
        self.num_heads = [num_heads, num_heads] if isinstance(num_heads, int) else list(num_heads)
        self.num_decoder_blocks = depth[1]
        self.num_encoder_blocks = depth[0]
        self.num_blocks = depth[0] + depth[1]
        patch_size = [patch_size, patch_size]
        self.s_patch_size, self.x_patch_size = patch_size
        s_channel_per_token = in_channels * self.s_patch_size * self.s_patch_size
        x_channel_per_token = in_channels * self.x_patch_size * self.x_patch_size
        self.x_embedder = PatchEmbed(input_size, self.x_patch_size, x_channel_per_token, self.decoder_hidden_size)
        self.s_embedder = PatchEmbed(input_size, self.s_patch_size, s_channel_per_token, self.encoder_hidden_size)
        self.x_channel_per_token = x_channel_per_token
        self.s_projector = (nn.Linear(self.encoder_hidden_size, self.decoder_hidden_size)
                            if self.encoder_hidden_size != self.decoder_hidden_size else nn.Identity())
        self.t_embedder = GaussianFourierEmbedding(self.encoder_hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, self.encoder_hidden_size, class_dropout_prob)
        self.final_layer = DDTFinalLayer(self.decoder_hidden_size, 1, x_channel_per_token, use_rmsnorm=use_rmsnorm)
        if use_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.s_embedder.num_patches, self.encoder_hidden_size),
                                          requires_grad=False)
        self.use_pos_embed = use_pos_embed
        enc_num_heads, dec_num_heads = self.num_heads
        self.enc_feat_rope = VisionRotaryEmbeddingFast(self.encoder_hidden_size // enc_num_heads // 2,
                                                       int(sqrt(self.s_embedder.num_patches)))
        self.dec_feat_rope = VisionRotaryEmbeddingFast(self.decoder_hidden_size // dec_num_heads // 2,
                                                       int(sqrt(self.x_embedder.num_patches)))
        self.blocks = nn.ModuleList([
            LightningDDTBlock(self.encoder_hidden_size if i < self.num_encoder_blocks else self.decoder_hidden_size,
                              enc_num_heads if i < self.num_encoder_blocks else dec_num_heads,
                              mlp_ratio=mlp_ratio, use_qknorm=use_qknorm, use_rmsnorm=use_rmsnorm,
                              use_swiglu=use_swiglu)
            for i in range(self.num_blocks)])
        self.initialize_weights()

    def initialize_weights(self):
        for embedder in (self.x_embedder, self.s_embedder):
            w = embedder.proj.weight.data
            nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
            nn.init.constant_(embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        if self.use_pos_embed:
            pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], int(self.s_embedder.num_patches ** 0.5))
            self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        c = self.x_channel_per_token
        p = self.x_embedder.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(shape=(x.shape[0], c, h * p, h * p))

    def forward(self, x, t, y):
        t = self.t_embedder(t)
        y = self.y_embedder(y, self.training)
        c = F.silu(t + y)
        s = self.s_embedder(x)
        if self.use_pos_embed:
            s = s + self.pos_embed
        for i in range(self.num_encoder_blocks):
            s = self.blocks[i](s, c, feat_rope=self.enc_feat_rope)
        t = t.unsqueeze(1).repeat(1, s.shape[1], 1)
        s = F.silu(t + s)
        s = self.s_projector(s)
        x = self.x_embedder(x)
        for i in range(self.num_encoder_blocks, self.num_blocks):
            x = self.blocks[i](x, s, feat_rope=self.dec_feat_rope)
        x = self.final_layer(x, s)
        return self.unpatchify(x)


# ---- the stage-1 decoder: src/stage1/decoders/decoder.py ------------------------------------------------


def mae_2d_sincos_pos_embed(embed_dim, grid_size, add_cls_token=False):
    """decoder.py:114-172 (the same table as model_utils.py's, with an optional zero CLS row)."""
    pos_embed = get_2d_sincos_pos_embed(embed_dim, grid_size)
    if add_cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


class ViTMAESelfAttention(nn.Module):
    """decoder.py:334-391 (the eager attention ViTMAELayer uses, line 507), dropout 0."""

    def __init__(self, config):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = int(config.hidden_size / config.num_attention_heads)
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size, bias=config.qkv_bias)
        self.key = nn.Linear(config.hidden_size, self.all_head_size, bias=config.qkv_bias)
        self.value = nn.Linear(config.hidden_size, self.all_head_size, bias=config.qkv_bias)

    def transpose_for_scores(self, x):
        x = x.view(x.size()[:-1] + (self.num_attention_heads, self.attention_head_size))
        return x.permute(0, 2, 1, 3)

    def forward(self, hidden_states):
        query_layer = self.transpose_for_scores(self.query(hidden_states))
        key_layer = self.transpose_for_scores(self.key(hidden_states))
        value_layer = self.transpose_for_scores(self.value(hidden_states))
        scores = torch.matmul(query_layer, key_layer.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        probs = F.softmax(scores, dim=-1)
        context = torch.matmul(probs, value_layer).permute(0, 2, 1, 3).contiguous()
        return context.view(context.size()[:-2] + (self.all_head_size,))


class ViTMAESelfOutput(nn.Module):  # decoder.py:427-442
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, input_tensor):
        return self.dense(hidden_states)


class ViTMAEAttention(nn.Module):  # decoder.py:446-463
    def __init__(self, config):
        super().__init__()
        self.attention = ViTMAESelfAttention(config)
        self.output = ViTMAESelfOutput(config)

    def forward(self, hidden_states):
        return self.output(self.attention(hidden_states), hidden_states)


class ViTMAEIntermediate(nn.Module):  # decoder.py:466-479, hidden_act "gelu" = transformers' exact GELU
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states):
        return F.gelu(self.dense(hidden_states))


class ViTMAEOutput(nn.Module):  # decoder.py:483-495
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states, input_tensor):
        return self.dense(hidden_states) + input_tensor


class ViTMAELayer(nn.Module):  # decoder.py:500-539
    def __init__(self, config):
        super().__init__()
        self.attention = ViTMAEAttention(config)
        self.intermediate = ViTMAEIntermediate(config)
        self.output = ViTMAEOutput(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states):
        hidden_states = self.attention(self.layernorm_before(hidden_states)) + hidden_states
        layer_output = self.intermediate(self.layernorm_after(hidden_states))
        return self.output(layer_output, hidden_states)


def vit_mae_config(**kw):
    """The fields of configs/decoder/ViTXL/config.json that GeneralDecoder reads, overridable."""
    base = dict(hidden_size=768, decoder_hidden_size=1152, decoder_num_hidden_layers=28,
                decoder_num_attention_heads=16, decoder_intermediate_size=4096, num_attention_heads=12,
                intermediate_size=3072, layer_norm_eps=1e-12, qkv_bias=True, num_channels=3, patch_size=16,
                image_size=224)
    base.update(kw)
    return SimpleNamespace(**base)


class GeneralDecoder(nn.Module):
    """decoder.py:542-747 (forward with drop_cls_token=False, interpolate_pos_encoding=False, as RAE.decode)."""

    def __init__(self, config, num_patches):
        super().__init__()
        self.decoder_embed = nn.Linear(config.hidden_size, config.decoder_hidden_size, bias=True)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, config.decoder_hidden_size),
                                              requires_grad=False)
        decoder_config = deepcopy(config)
        decoder_config.hidden_size = config.decoder_hidden_size
        decoder_config.num_hidden_layers = config.decoder_num_hidden_layers
        decoder_config.num_attention_heads = config.decoder_num_attention_heads
        decoder_config.intermediate_size = config.decoder_intermediate_size
        self.decoder_layers = nn.ModuleList([ViTMAELayer(decoder_config)
                                             for _ in range(config.decoder_num_hidden_layers)])
        self.decoder_norm = nn.LayerNorm(config.decoder_hidden_size, eps=config.layer_norm_eps)
        self.decoder_pred = nn.Linear(config.decoder_hidden_size, config.patch_size ** 2 * config.num_channels,
                                      bias=True)
        self.config = config
        self.num_patches = num_patches
        pos = mae_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], int(num_patches ** 0.5), add_cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, decoder_config.hidden_size))

    def interpolate_latent(self, x):
        b, seq_len, c = x.shape
        if seq_len == self.num_patches:
            return x
        h, w = int(seq_len ** 0.5), int(seq_len ** 0.5)
        x = x.reshape(b, h, w, c).permute(0, 3, 1, 2)
        target_size = (int(self.num_patches ** 0.5), int(self.num_patches ** 0.5))
        x = F.interpolate(x, size=target_size, mode="bilinear", align_corners=False)
        return x.permute(0, 2, 3, 1).contiguous().view(b, self.num_patches, c)

    def unpatchify(self, patchified_pixel_values):
        patch_size, num_channels = self.config.patch_size, self.config.num_channels
        num_patches_h = num_patches_w = self.config.image_size // patch_size
        batch_size = patchified_pixel_values.shape[0]
        x = patchified_pixel_values.reshape(batch_size, num_patches_h, num_patches_w, patch_size, patch_size,
                                            num_channels)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(batch_size, num_channels, num_patches_h * patch_size, num_patches_w * patch_size)

    def forward(self, hidden_states):
        x = self.decoder_embed(hidden_states)
        x_ = self.interpolate_latent(x)
        cls_token = self.trainable_cls_token.expand(x_.shape[0], -1, -1)
        hidden_states = torch.cat([cls_token, x_], dim=1) + self.decoder_pos_embed
        for layer_module in self.decoder_layers:
            hidden_states = layer_module(hidden_states)
        logits = self.decoder_pred(self.decoder_norm(hidden_states))
        return logits[:, 1:, :]


def rae_decoder_for(encoder_hidden, decoder_patch_size, base_patches, **config):
    """src/stage1/rae.py:50-54: the decoder config RAE builds around an encoder."""
    cfg = vit_mae_config(**config)
    cfg.hidden_size = encoder_hidden
    cfg.patch_size = decoder_patch_size
    cfg.image_size = int(decoder_patch_size * sqrt(base_patches))
    return GeneralDecoder(cfg, num_patches=base_patches)


def rae_decode_pixels(decoder, z_tokens, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """src/stage1/rae.py:106-108 (the tokens already de-normalised and laid out as (B, N, C))."""
    x_rec = decoder.unpatchify(decoder(z_tokens))
    encoder_mean = torch.tensor(mean).view(1, 3, 1, 1)
    encoder_std = torch.tensor(std).view(1, 3, 1, 1)
    return x_rec * encoder_std + encoder_mean


# ---- src/stage2/models/lightningDiT.py ----------------------------------------------------------------


class LightningDiTBlock(LightningDDTBlock):
    """lightningDiT.py:12-89: the same layers as DDT.py's block; the per-sample conditioning path."""

    def forward(self, x, c, feat_rope=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=feat_rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class LightningFinalLayer(DDTFinalLayer):
    """lightningDiT.py:90-109."""

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class LightningDiT(nn.Module):
    """lightningDiT.py:111-249 (learn_sigma False)."""

    def __init__(self, input_size=16, patch_size=1, in_channels=768, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, use_qknorm=False, use_swiglu=True,
                 use_rope=True, use_rmsnorm=True):
        super().__init__()
        self.in_channels = self.out_channels = in_channels
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = GaussianFourierEmbedding(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.feat_rope = (VisionRotaryEmbeddingFast(hidden_size // num_heads // 2, input_size // patch_size)
                          if use_rope else None)
        self.blocks = nn.ModuleList([LightningDiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio,
                                                       use_qknorm=use_qknorm, use_swiglu=use_swiglu,
                                                       use_rmsnorm=use_rmsnorm) for _ in range(depth)])
        self.final_layer = LightningFinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm=use_rmsnorm)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], int(self.x_embedder.num_patches ** 0.5))
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        c = self.out_channels
        p = self.x_embedder.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(shape=(x.shape[0], c, h * p, h * p))

    def forward(self, x, t=None, y=None):
        x = self.x_embedder(x) + self.pos_embed
        t = self.t_embedder(t)
        y = self.y_embedder(y, self.training)
        c = t + y
        for block in self.blocks:
            x = block(x, c, feat_rope=self.feat_rope)
        x = self.final_layer(x, c)
        return self.unpatchify(x)


def ddt_forward_with_cfg(model, x, t, y, cfg_scale, cfg_interval=(0, 1)):
    """src/stage2/models/DDT.py:364-389."""
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    model_out = model.forward(combined, t, y)
    eps, rest = model_out[:, : model.in_channels], model_out[:, model.in_channels:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    guid_t_min, guid_t_max = cfg_interval
    t = t[: len(t) // 2]
    half_eps = torch.where(((t >= guid_t_min) & (t <= guid_t_max)).view(-1, *[1] * (len(cond_eps.shape) - 1)),
                           uncond_eps + cfg_scale * (cond_eps - uncond_eps), cond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)
