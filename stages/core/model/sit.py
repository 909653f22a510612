"""SiT: the DiT architecture trained as a velocity (rectified-flow) model, with optional REPA projectors.

The network follows facebookresearch/DiT: patch embedding plus fixed 2-D sin-cos positions, a stack of
adaLN-Zero transformer blocks conditioned on the time (and class or caption) vector, a modulated final
layer and an unpatchify back to latent shape. Differences from DiT:

- the output has as many channels as the input (a velocity, no learned sigma);
- time is the rectified-flow time t in [0, 1], embedded as is (as SiT and official REPA do);
- ``cond="text"`` adds cross-attention to caption tokens in every block (9-way adaLN) and a pooled caption
  vector to the time embedding; ``cond="none"`` is unconditional;
- REPA: one projector MLP per alignment target maps the hidden state after block ``align_layer`` (1-based)
  to the dimension of that frozen encoder's patch tokens, for the alignment loss (``stages.core.diffusion.objective``);
  iREPA's Conv2d over the token grid instead with ``projector_type="conv"``;
- REG (``class_token_dim``): the noised class token of the target enters as one extra token in front of the
  patch tokens, LayerNorm(Linear(cls)) with a zero position row, and its velocity is read out by its own
  linear head after the final modulated norm (the names are REG's: ``cls_projectors2``, ``wg_norm``,
  ``final_layer.linear_cls``; ``pos_embed`` has the extra row, so REG's checkpoints load as they are);
- ``hidden_layer``: forward also returns that block's output (for the dispersive loss).

Parameter names and shapes are those of official REPA's ``models/sit.py`` (``projectors.k.*`` included), so
its checkpoints load as they are (``repa import-checkpoint``).

``forward`` has no data-dependent Python control flow, so the model compiles as one graph.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.core.diffusion.family import ConvProjector
from stages.core.model.dit_init import init_patch_embedding, init_time_mlp, zero_modulations_and_output
from stages.core.model.model_config import ModelConfig

#################################################################################
#               Embedding layers for timesteps, labels and captions             #
#################################################################################


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation of tokens (B, N, D) by per-sample vectors (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Cuts latents (B, C, H, W) into p x p patches and projects each to a token (B, H*W/p^2, D)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Embeds rectified-flow time t in [0, 1] as SiT and official REPA do: a sinusoid of t itself (not of
    t * 1000 as DiT's integer steps), cosines first, then an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """Sinusoidal embedding (B, dim) of (possibly fractional) positions t (B,)."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t.float()[:, None] * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: Tensor) -> Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(cast(nn.Linear, self.mlp[0]).weight.dtype))


class LabelEmbedder(nn.Module):
    """Class-label table with one extra row, ``num_classes``, the null class for classifier-free guidance.

    Label dropout is the caller's job: it passes the null id for dropped labels.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


class CaptionEmbedder(nn.Module):
    """Projects caption token embeddings (B, L, text_dim) to context tokens and a pooled vector.

    Padded tokens (mask False) are zeroed before anything reads them, so their content can never leak into
    the output. A learned null token stands in for dropped captions (classifier-free guidance).
    """

    def __init__(self, text_dim: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(text_dim, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.pool_proj = nn.Linear(hidden_size, hidden_size)
        self.null_token = nn.Parameter(torch.zeros(1, text_dim))

    def forward(self, text: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns context (B, L, D), the SDPA attention mask (B, 1, 1, L) and the pooled vector (B, D)."""
        text = text.masked_fill(~mask.unsqueeze(-1), 0.0)
        context = self.norm(self.proj(text))
        weights = mask.unsqueeze(-1).to(context.dtype)
        pooled = (context * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        # A caption without real tokens would make every attention logit -inf and the softmax NaN. Letting
        # such a row attend to its zeroed padding instead gives one fixed vector, whatever the padding held.
        attn_mask = mask | ~mask.any(dim=-1, keepdim=True)
        return context, attn_mask[:, None, None, :], self.pool_proj(pooled)

    def null_text(self, batch_size: int, seq_len: int = 1) -> tuple[Tensor, Tensor]:
        """The null caption for a batch: the learned token, then ``seq_len - 1`` padded positions."""
        tokens = self.null_token.new_zeros(batch_size, seq_len, self.null_token.shape[-1])
        tokens[:, 0] = self.null_token
        mask = torch.zeros(batch_size, seq_len, dtype=torch.bool, device=tokens.device)
        mask[:, 0] = True
        return tokens, mask


#################################################################################
#                                 Core SiT model                                #
#################################################################################


class Mlp(nn.Module):
    """Two-layer feed-forward network with tanh-approximated GELU, as in DiT."""

    def __init__(self, hidden_size: int, mlp_hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden_size)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, N, H*d) -> (B, H, N, d)."""
    batch, tokens, width = x.shape
    return x.reshape(batch, tokens, num_heads, width // num_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, H, N, d) -> (B, N, H*d)."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


class Attention(nn.Module):
    """Multi-head self-attention over image tokens with a fused qkv projection."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (_split_heads(part, self.num_heads) for part in self.qkv(x).chunk(3, dim=-1))
        return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens (queries) to caption tokens (keys/values), padding masked."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor, context: Tensor, attn_mask: Tensor | None) -> Tensor:
        """attn_mask (B, 1, 1, L) boolean, True where a caption token may be attended to; None: every one."""
        q = _split_heads(self.q(x), self.num_heads)
        k, v = (_split_heads(part, self.num_heads) for part in self.kv(context).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(_merge_heads(out))


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning, optionally cross-attending to caption tokens.

    The conditioning vector yields shift/scale/gate triples for self-attention and MLP (6-way adaLN), plus
    one for the cross-attention when present (9-way). Zero-initialised, every gate starts closed, so each
    block starts as the identity.
    """

    norm_cross: nn.LayerNorm | None
    cross_attn: CrossAttention | None

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, cross_attention: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        if cross_attention:
            self.norm_cross = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.cross_attn = CrossAttention(hidden_size, num_heads)
        else:
            self.norm_cross = self.cross_attn = None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.num_modulations = 9 if cross_attention else 6
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, self.num_modulations * hidden_size)
        )

    def forward(
        self, x: Tensor, c: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        mods = self.adaLN_modulation(c).chunk(self.num_modulations, dim=-1)
        shift_msa, scale_msa, gate_msa = mods[:3]
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.norm_cross is not None and self.cross_attn is not None:  # both or neither
            shift_xa, scale_xa, gate_xa = mods[3:6]
            queries = modulate(self.norm_cross(x), shift_xa, scale_xa)
            x = x + gate_xa.unsqueeze(1) * self.cross_attn(queries, context, context_mask)
        shift_mlp, scale_mlp, gate_mlp = mods[-3:]
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated norm and linear map from each token to its p x p x C patch of velocity."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, class_token_dim: int = 0):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear_cls = nn.Linear(hidden_size, class_token_dim) if class_token_dim else None  # REG's head

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return self.linear(self.modulated(x, c))

    def modulated(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return modulate(self.norm_final(x), shift, scale)


def build_projector(hidden_size: int, projector_dim: int, out_dim: int) -> nn.Sequential:
    """REPA projector: Linear · SiLU · Linear · SiLU · Linear, applied to every token."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, out_dim),
    )


class SiT(nn.Module):
    """Diffusion transformer predicting the rectified-flow velocity, with one REPA projector per target."""

    # Where inputs enter (patches, captions, labels): muP-style parameter groups keep their lr unscaled.
    input_params = ("x_embedder.", "caption_embedder.proj.", "y_embedder.", "cls_projectors2.")

    pos_embed: Tensor
    cls_projectors2: nn.Linear | None
    wg_norm: nn.LayerNorm | None

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()  # configs are mutable dataclasses; re-check what was changed after construction
        self.config = config
        hidden = config.width
        self.num_patches = (config.input_size // config.patch_size) ** 2

        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = LabelEmbedder(config.num_classes, hidden) if config.cond == "class" else None
        self.caption_embedder = CaptionEmbedder(config.caption_dim, hidden) if config.cond == "text" else None
        # fixed, so a buffer; persistent so a model built on the meta device loads it from a checkpoint
        grid = config.input_size // config.patch_size
        pos_embed = sincos_pos_embed_2d(hidden, grid)
        self.leading = 1 if config.class_token_dim else 0  # REG's class token, in front of the patch tokens
        if self.leading:
            pos_embed = torch.cat([pos_embed.new_zeros(1, hidden), pos_embed])
            self.cls_projectors2 = nn.Linear(config.class_token_dim, hidden)
            self.wg_norm = nn.LayerNorm(hidden, eps=1e-6)
        else:
            self.cls_projectors2 = self.wg_norm = None
        self.register_buffer("pos_embed", pos_embed.unsqueeze(0))

        self.blocks = nn.ModuleList(
            SiTBlock(hidden, config.heads, config.mlp_ratio, cross_attention=config.cond == "text")
            for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(hidden, config.patch_size, config.in_channels, config.class_token_dim)
        if config.projector_type == "conv":
            self.projectors = nn.ModuleList(ConvProjector(hidden, d, config.projector_kernel) for d in config.repa_dims)
        else:
            self.projectors = nn.ModuleList(build_projector(hidden, config.projector_dim, d) for d in config.repa_dims)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        """Label id of the null class that classifier-free guidance substitutes for dropped labels."""
        return self.config.num_classes

    def null_text(self, batch_size: int, seq_len: int = 1) -> tuple[Tensor, Tensor]:
        """(tokens (B, seq_len, text_dim), mask (B, seq_len)) of the learned null caption, for CFG."""
        if self.caption_embedder is None:
            raise ValueError(f"null_text needs cond='text', this model has cond={self.config.cond!r}")
        return self.caption_embedder.null_text(batch_size, seq_len)

    def initialize_weights(self) -> None:
        """DiT initialisation: xavier linears, N(0, 0.02) embeddings, zeroed adaLN and output layers."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        init_patch_embedding(self.x_embedder.proj)
        init_time_mlp(self.t_embedder.mlp)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        if self.caption_embedder is not None:
            nn.init.normal_(self.caption_embedder.null_token, std=0.02)
        zero_modulations_and_output(self.blocks, self.final_layer)
        if self.final_layer.linear_cls is not None:
            nn.init.zeros_(self.final_layer.linear_cls.weight)
            nn.init.zeros_(self.final_layer.linear_cls.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        p, channels = self.config.patch_size, self.config.in_channels
        grid = self.config.input_size // p
        x = x.reshape(x.shape[0], grid, grid, p, p, channels)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], channels, grid * p, grid * p)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        text: Tensor | None = None,
        text_mask: Tensor | None = None,
        cls_token: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor]] | tuple[Tensor, list[Tensor], dict]:
        """Velocity prediction and REPA-projected tokens.

        x: latents (B, C, H, W); t: rectified-flow time (B,) in [0, 1]; y: class ids (B,) for cond="class"
        (``null_class`` for dropped labels); text (B, L, text_dim) and text_mask (B, L), True = real token,
        for cond="text" (a missing mask, or ``config.text_mask`` False, means every token is attended to).
        Returns (velocity (B, C, H, W), one (B, num_patches, dim) tensor per alignment target, [] without REPA).
        With ``config.extra_outputs`` a third element, {"cls": the class token's velocity (B, class_token_dim)
        or None, "hidden": the output of block ``hidden_layer`` or None}; REG's model needs ``cls_token`` (B,
        class_token_dim), the noised class token, and its projected tokens are [class token, patch tokens].
        """
        tokens = self.x_embedder(x)
        if self.cls_projectors2 is not None and self.wg_norm is not None:  # REG's, both or neither
            if cls_token is None:
                raise ValueError("this model denoises a class token too (REG): pass the noised cls_token")
            cls = self.wg_norm(self.cls_projectors2(cls_token.to(self.cls_projectors2.weight.dtype)))
            tokens = torch.cat([cls.unsqueeze(1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + self.pos_embed
        c = self.t_embedder(t)
        context = context_mask = None
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("cond='class' needs class ids y")
            c = c + self.y_embedder(y)
        if self.caption_embedder is not None:
            if text is None:
                raise ValueError("cond='text' needs caption embeddings text (use null_text for none)")
            attend_all = text_mask is None or not self.config.text_mask
            if attend_all:
                text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
            context, context_mask, pooled = self.caption_embedder(text, text_mask)
            if attend_all:  # no mask at all, so SDPA may pick its flash kernel (which takes none)
                context_mask = None
            c = c + pooled

        projected: list[Tensor | None] = [None] * len(self.projectors)
        layers = self.config.projector_layers[: len(projected)]  # none when loaded without projectors
        conv = self.config.projector_type == "conv"
        hidden = None
        for index, block in enumerate(self.blocks, start=1):
            tokens = block(tokens, c, context, context_mask)
            for k, layer in enumerate(layers):
                if layer == index:
                    projected[k] = self.projectors[k](tokens, self.leading) if conv else self.projectors[k](tokens)
            if index == self.config.hidden_layer:
                hidden = tokens
        # ModelConfig.validate() puts every projector's block within 1..depth, so no entry is left None.
        if not self.config.extra_outputs:
            return self.unpatchify(self.final_layer(tokens, c)), cast(list[Tensor], projected)
        cls_velocity = None
        linear_cls = self.final_layer.linear_cls
        if linear_cls is not None:  # REG's head, there exactly when self.leading is 1
            tokens = self.final_layer.modulated(tokens, c)
            cls_velocity = linear_cls(tokens[:, 0])
            out = self.final_layer.linear(tokens[:, self.leading:])
        else:
            out = self.final_layer(tokens, c)
        return self.unpatchify(out), cast(list[Tensor], projected), {"cls": cls_velocity, "hidden": hidden}


#################################################################################
#                       Positional embedding, parameter counts                  #
#################################################################################


def sincos_pos_embed_1d(dim: int, positions: Tensor) -> Tensor:
    """(M,) positions -> (M, dim): sines then cosines of geometrically spaced frequencies."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D sin-cos embedding (grid_size**2, dim) in row-major token order, as in DiT/MAE."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    # DiT/MAE put the column (width) coordinate in the first half of the channels
    embedding = torch.cat(
        [sincos_pos_embed_1d(dim // 2, cols.reshape(-1)), sincos_pos_embed_1d(dim // 2, rows.reshape(-1))],
        dim=1,
    )
    return embedding.float()
