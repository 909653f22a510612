"""The part of DiT's initialisation every adaLN network here shares (SiT, LightningDiT, DiT-DH)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, cast

from torch import nn


def init_patch_embedding(proj: nn.Conv2d) -> None:
    """The patch embedding is a linear map over flattened patches, so it is initialised like one: xavier-uniform
    weights, zero bias."""
    weight = proj.weight
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)


def init_time_mlp(mlp: nn.Sequential) -> None:
    """N(0, 0.02) weights for the linears of the time embedding's MLP, in order; biases keep PyTorch's default."""
    for layer in mlp:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=0.02)


class FinalLayer(Protocol):
    adaLN_modulation: nn.Sequential
    linear: nn.Linear


def _zero(layer: nn.Module) -> None:
    linear = cast(nn.Linear, layer)  # every adaLN modulation ends in a Linear
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)


def zero_modulations_and_output(blocks: Iterable[nn.Module], final_layer: FinalLayer) -> None:
    """adaLN-Zero: each block's modulation and the final layer's modulation and projection start at zero, so
    every block starts as the identity and the network's first output is 0."""
    for block in blocks:
        _zero(cast(nn.Sequential, block.adaLN_modulation)[-1])  # (SiLU, Linear) in every block
    _zero(final_layer.adaLN_modulation[-1])
    _zero(final_layer.linear)
