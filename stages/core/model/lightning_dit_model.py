"""LightningDiT as RAE ships it (bytetriper/RAE ``src/stage2/models/lightningDiT.py``), a model family of its
own built from the blocks of :mod:`stages.core.model.lightning_dit`, with RAE's parameter names.

x_embedder(x) + fixed sin-cos table -> blocks conditioned on c = t_emb(t) + y_emb(y) (no SiLU in front, unlike
DiT-DH) with 2-D RoPE on the patch grid -> final layer -> unpatchify. Initialisation as RAE's: xavier-uniform
linears, then the DiT-style embeddings and zeroed adaLN and output layers. Label dropout is the caller's job
(``null_class``), as for :class:`stages.core.model.ddt.DiTwDDTHead`. RAE's ``learn_sigma`` (an unused second half of
the output) is not offered. RAE's forward is :meth:`LightningDiT.velocity`; ``forward`` is the training
interface of :class:`stages.core.model.rae_network.RAENetwork`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stages.core.model.ddt_config import LightningDiTConfig
from stages.core.model.dit_init import init_patch_embedding, init_time_mlp, zero_modulations_and_output
from stages.core.model.lightning_dit import (
    FinalLayer,
    GaussianFourierEmbedding,
    LabelEmbedder,
    LightningBlock,
    PatchEmbed,
    VisionRotaryEmbeddingFast,
)
from stages.core.model.rae_network import RAENetwork
from stages.core.model.sit import sincos_pos_embed_2d


class LightningDiT(RAENetwork):
    config: LightningDiTConfig
    family = "LightningDiT"
    pos_embed: Tensor

    input_params = ("x_embedder.", "y_embedder.")

    def __init__(self, config: LightningDiTConfig):
        super().__init__()
        config.validate()
        self.config = config
        width, p = config.hidden_size, config.patch_size
        side = config.input_size // p
        self.x_embedder = PatchEmbed(p, config.in_channels, width)
        self.t_embedder = GaussianFourierEmbedding(width)
        self.y_embedder = LabelEmbedder(config.num_classes, width, config.class_dropout_prob)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(width, side).unsqueeze(0))
        self.feat_rope = VisionRotaryEmbeddingFast(width // config.num_heads // 2, side) if config.use_rope else None
        self.blocks = nn.ModuleList(
            LightningBlock(width, config.num_heads, mlp_ratio=config.mlp_ratio, use_qknorm=config.use_qknorm,
                           use_swiglu=config.use_swiglu, use_rmsnorm=config.use_rmsnorm)
            for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(width, p * p * config.in_channels, use_rmsnorm=config.use_rmsnorm)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        init_patch_embedding(self.x_embedder.proj)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        init_time_mlp(self.t_embedder.mlp)
        zero_modulations_and_output(self.blocks, self.final_layer)

    def unpatchify(self, x: Tensor) -> Tensor:
        p, channels = self.config.patch_size, self.config.in_channels
        side = self.config.input_size // p
        x = x.reshape(x.shape[0], side, side, p, p, channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], channels, side * p, side * p)

    def velocity(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Velocity (B, C, H, W) at x (B, C, H, W), t (B,), labels y (B,) (``null_class`` = dropped)."""
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            tokens = block(tokens, c, self.feat_rope)
        return self.unpatchify(self.final_layer(tokens, c))
