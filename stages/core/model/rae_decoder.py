"""RAE's pixel decoder (bytetriper/RAE ``src/stage1/decoders/decoder.py``, ``GeneralDecoder``): an MAE-style
ViT that maps encoder tokens back to an image, with RAE's parameter names so its released decoder weights
(``models/decoders/.../model.pt``, the bare ``GeneralDecoder`` state dict) load as they are.

tokens (B, N, C) -> Linear to the decoder width -> a learned CLS token in front -> + fixed 2-D sin-cos
position table (zero CLS row) -> pre-norm ViT layers (LayerNorm eps 1e-12, exact GELU, q/k/v with bias)
-> LayerNorm -> Linear to patch²·3 pixels per token -> CLS dropped -> unpatchify. The output is in the
encoder's normalised pixel space; :meth:`RAEDecoder.decode` undoes the encoder's ImageNet mean/std, giving
images in [0, 1] (up to what the decoder produces), as ``RAE.decode`` does. A token count other than the
table's is resized bilinearly to it first (``interpolate_latent``).

Where this plugs in: sampling denormalises the DiT-DH output (``token_stats.LatentStats.denormalize``),
lays it out as tokens (``token_stats.latent_to_tokens``) and calls :meth:`RAEDecoder.decode`; weights come
from :func:`load_decoder` (a local file, ``torch.load(weights_only=True)``). Tests and the demo use a tiny
random-initialised decoder of the same class (:data:`DECODER_PRESETS` or any :class:`DecoderConfig`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.core.files.tensor_files import load_released_weights
from stages.core.model.sit import sincos_pos_embed_2d

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's image processor, which RAE reads its pixel statistics from
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DecoderConfig:
    """Field names are those of RAE's decoder ``config.json`` (a ViTMAEConfig), plus the token grid."""

    hidden_size: int = 768  # the encoder's token size (RAE overrides the json's with the encoder's)
    decoder_hidden_size: int = 1152
    decoder_num_hidden_layers: int = 28
    decoder_num_attention_heads: int = 16
    decoder_intermediate_size: int = 4096
    patch_size: int = 16  # pixels per token side (RAE's decoder_patch_size)
    num_patches: int = 256  # tokens per image (the encoder's grid)
    num_channels: int = 3
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        side = math.isqrt(self.num_patches)
        if side * side != self.num_patches:
            raise ValueError(f"num_patches={self.num_patches} is not a square grid")
        if self.decoder_hidden_size % self.decoder_num_attention_heads:
            raise ValueError(f"decoder_hidden_size={self.decoder_hidden_size} is not divisible by "
                             f"{self.decoder_num_attention_heads} heads")
        if self.decoder_hidden_size % 4:
            raise ValueError(f"decoder_hidden_size={self.decoder_hidden_size} must be a multiple of 4 (sin-cos table)")

    @property
    def image_size(self) -> int:
        """patch_size · sqrt(num_patches), as RAE sets the decoder config's image_size."""
        return self.patch_size * math.isqrt(self.num_patches)


DECODER_PRESETS: dict[str, dict] = {  # RAE's configs/decoder/ViT{B,L,XL}/config.json
    "ViTB": dict(decoder_hidden_size=768, decoder_num_hidden_layers=12, decoder_num_attention_heads=12,
                 decoder_intermediate_size=3072),
    "ViTL": dict(decoder_hidden_size=1024, decoder_num_hidden_layers=24, decoder_num_attention_heads=16,
                 decoder_intermediate_size=4096),
    "ViTXL": dict(decoder_hidden_size=1152, decoder_num_hidden_layers=28, decoder_num_attention_heads=16,
                  decoder_intermediate_size=4096),
}


class _SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width, bias=bias)
        self.key = nn.Linear(width, width, bias=bias)
        self.value = nn.Linear(width, width, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = (proj(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)


class _Dense(nn.Module):
    """A module holding one ``dense`` Linear: the names of transformers' ViT sub-layers."""

    def __init__(self, fan_in: int, fan_out: int):
        super().__init__()
        self.dense = nn.Linear(fan_in, fan_out)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int, bias: bool):
        super().__init__()
        self.attention = _SelfAttention(width, heads, bias)
        self.output = _Dense(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.output.dense(self.attention(x))


class DecoderLayer(nn.Module):
    """transformers' ViTLayer: x += attn(LN(x)); x += fc2(gelu(fc1(LN(x))))."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        width = config.decoder_hidden_size
        self.attention = _Attention(width, config.decoder_num_attention_heads, config.qkv_bias)
        self.intermediate = _Dense(width, config.decoder_intermediate_size)
        self.output = _Dense(config.decoder_intermediate_size, width)
        self.layernorm_before = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class RAEDecoder(nn.Module):
    decoder_pos_embed: Tensor

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        width = config.decoder_hidden_size
        self.decoder_embed = nn.Linear(config.hidden_size, width)
        table = sincos_pos_embed_2d(width, math.isqrt(config.num_patches))
        # fixed, so a buffer; persistent because RAE's released state dicts carry it
        self.register_buffer("decoder_pos_embed", torch.cat([torch.zeros(1, width), table]).unsqueeze(0))
        self.decoder_layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_num_hidden_layers))
        self.decoder_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.decoder_pred = nn.Linear(width, config.patch_size ** 2 * config.num_channels)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, width))

    def _resize_tokens(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        if n == self.config.num_patches:
            return x
        side, target = math.isqrt(n), math.isqrt(self.config.num_patches)
        grid = x.reshape(b, side, side, c).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(target, target), mode="bilinear", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(b, target * target, c)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, N, hidden_size) tokens -> (B, num_patches, patch²·channels) pixel patches (normalised space)."""
        x = self._resize_tokens(self.decoder_embed(tokens))
        x = torch.cat([self.trainable_cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.decoder_pos_embed
        for layer in self.decoder_layers:
            x = layer(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def unpatchify(self, patches: Tensor) -> Tensor:
        """(B, N, p·p·C) -> (B, C, H, W), channels last within a patch as MAE lays them out."""
        p, channels = self.config.patch_size, self.config.num_channels
        side = math.isqrt(patches.shape[1])
        x = patches.reshape(patches.shape[0], side, side, p, p, channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(patches.shape[0], channels, side * p, side * p)

    def decode(self, tokens: Tensor) -> Tensor:
        """(B, N, C) encoder tokens -> images (B, 3, H, W) in the [0, 1] pixel scale."""
        images = self.unpatchify(self(tokens))
        mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return images * std + mean


def decoder_config(preset: str = "ViTXL", **overrides) -> DecoderConfig:
    if preset not in DECODER_PRESETS:
        raise ValueError(f"unknown decoder preset {preset!r}; known: {', '.join(DECODER_PRESETS)}")
    return DecoderConfig(**{**DECODER_PRESETS[preset], **overrides})


def load_decoder(path: Path | str, config: DecoderConfig, device: torch.device | str = "cpu") -> RAEDecoder:
    """RAE's released decoder weights (a bare state dict, or a training checkpoint's ``ema``/``model``) in a
    decoder of ``config``; every key must match, else one error line naming the first differences."""
    return load_released_weights(lambda: RAEDecoder(config), path, "an RAE decoder state dict (model.pt)",
                                 "pick the decoder preset the weights were trained as (ViTB, ViTL, ViTXL) and the "
                                 "encoder's token size and grid", device)
