"""DiT-DH (RAE's ``DiTwDDTHead``, bytetriper/RAE ``src/stage2/models/DDT.py``): a LightningDiT body with a
wide, shallow head, for diffusion on encoder tokens. Parameter names are RAE's, so a released RAE stage-2
checkpoint (its ``ema`` state dict, or the bare state dict) loads with ``strict=True``.

Forward, for x (B, C, h, w) at patch 1 and t (B,), y (B,):

1. c = silu(t_emb(t) + y_emb(y)), one vector per sample;
2. body: s = s_embedder(x) + pos_embed, then depth[0] blocks of width hidden[0] conditioned on c, RoPE
   on the h x w grid; then s = silu(t_emb(t) + s) per token;
3. s_projector (hidden[0] -> hidden[1]); head: x = x_embedder(x) (the noisy input again), depth[1]
   blocks of width hidden[1] conditioned per token on s, with their own RoPE; final layer conditioned on s.

Label dropout for classifier-free guidance is the caller's job (as for the project's SiT): it passes
``null_class`` for a dropped label. RAE drops inside the forward in training mode with its global RNG at
``class_dropout_prob``; the project's conditioning draws the same Bernoulli from its own seeded generator.

Where this plugs in: ``stages.core.model.network.build_model`` can build it from a :class:`DDTConfig`, and
``repa import-checkpoint`` reads RAE's files with the checks of :func:`load_ddt`. RAE's forward is
:meth:`DiTwDDTHead.velocity`; ``forward`` returns ``(velocity, [])`` (no REPA projector), so the training
objective's REPA term is absent.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from stages.core.files.tensor_files import load_released_weights
from stages.core.model.ddt_config import DDTConfig
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


class DiTwDDTHead(RAENetwork):
    config: DDTConfig
    family = "DiT-DH"
    pos_embed: Tensor  # with use_pos_embed
    enc_feat_rope: VisionRotaryEmbeddingFast | None
    dec_feat_rope: VisionRotaryEmbeddingFast | None

    # Where inputs enter: muP-style parameter groups keep their lr unscaled.
    input_params = ("x_embedder.", "s_embedder.", "y_embedder.")

    def __init__(self, config: DDTConfig):
        super().__init__()
        config.validate()
        self.config = config
        body, head = config.hidden_size
        heads_body, heads_head = config.num_heads
        channels = config.in_channels
        side = config.input_size // config.patch_size
        self.x_embedder = PatchEmbed(config.patch_size, channels, head)
        self.s_embedder = PatchEmbed(config.patch_size, channels, body)
        self.s_projector = nn.Linear(body, head) if body != head else nn.Identity()
        self.t_embedder = GaussianFourierEmbedding(body)
        self.y_embedder = LabelEmbedder(config.num_classes, body, config.class_dropout_prob)
        self.final_layer = FinalLayer(head, channels, use_rmsnorm=config.use_rmsnorm)
        if config.use_pos_embed:
            # fixed, so a buffer; persistent so it is in the state dict as RAE's frozen parameter is
            self.register_buffer("pos_embed", sincos_pos_embed_2d(body, side).unsqueeze(0))
        if config.use_rope:
            self.enc_feat_rope = VisionRotaryEmbeddingFast(body // heads_body // 2, side)
            self.dec_feat_rope = VisionRotaryEmbeddingFast(head // heads_head // 2, side)
        else:
            self.enc_feat_rope = self.dec_feat_rope = None
        block = partial(LightningBlock, mlp_ratio=config.mlp_ratio, use_qknorm=config.use_qknorm,
                        use_swiglu=config.use_swiglu, use_rmsnorm=config.use_rmsnorm)
        self.blocks = nn.ModuleList(
            [block(body, heads_body) for _ in range(config.depth[0])]
            + [block(head, heads_head) for _ in range(config.depth[1])]
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """RAE's initialisation: PyTorch's defaults except xavier patch embeddings, N(0, 0.02) label table and
        time MLP weights, zeroed adaLN and output layers (DDT.py ``initialize_weights`` without xavier_uniform_init)."""
        for embedder in (self.x_embedder, self.s_embedder):
            init_patch_embedding(embedder.proj)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        init_time_mlp(self.t_embedder.mlp)
        zero_modulations_and_output(self.blocks, self.final_layer)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, C, h, w) at patch 1."""
        side = math.isqrt(x.shape[1])
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)

    def velocity(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Velocity (B, C, h, w) at latents x (B, C, h, w), times t (B,), labels y (B,) (``null_class`` = dropped)."""
        t_emb = self.t_embedder(t)
        c = nn.functional.silu(t_emb + self.y_embedder(y))
        depth_body = self.config.depth[0]
        s = self.s_embedder(x)
        if self.config.use_pos_embed:
            s = s + self.pos_embed
        for block in self.blocks[:depth_body]:
            s = block(s, c, self.enc_feat_rope)
        s = self.s_projector(nn.functional.silu(t_emb.unsqueeze(1) + s))
        h = self.x_embedder(x)
        for block in self.blocks[depth_body:]:
            h = block(h, s, self.dec_feat_rope)
        return self.unpatchify(self.final_layer(h, s))


def count_ddt_parameters(model: nn.Module, frozen: bool = True) -> int:
    """Trainable parameters, plus (``frozen``) the fixed tables RAE keeps as frozen parameters (the position
    embedding and the Fourier time frequencies), which its parameter counts include."""
    total = sum(p.numel() for p in model.parameters())
    if frozen:
        total += sum(b.numel() for name, b in model.named_buffers() if name.rsplit(".", 1)[-1] in ("pos_embed", "W"))
    return total


def load_ddt(path: Path | str, config: DDTConfig, device: torch.device | str = "cpu") -> DiTwDDTHead:
    """A released RAE stage-2 file in a DiT-DH of ``config``: the bare state dict, or a training checkpoint
    ``{"model", "ema", ...}`` of which the EMA is taken (as RAE's ``instantiate_from_config`` does); every key
    and shape must match (RAE loads with ``strict=True``), else one error line."""
    return load_released_weights(lambda: DiTwDDTHead(config), path,
                                 "an RAE stage-2 state dict or checkpoint (stage2_model.pt)",
                                 "pick the DiT-DH preset the weights were trained as (DiTDH-S, DiTDH-XL) and the "
                                 "latent's channels and grid", device)
