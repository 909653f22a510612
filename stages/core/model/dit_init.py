"""The part of DiT's initialisation every adaLN network here shares (SiT, LightningDiT, DiT-DH)."""

from __future__ import annotations

from typing import cast

from torch import nn


def zero_modulations_and_output(blocks, final_layer: nn.Module) -> None:
    """adaLN-Zero: each block's modulation and the final layer's modulation and projection start at zero, so
    every block starts as the identity and the network's first output is 0."""
    for block in blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    for layer in (cast(nn.Sequential, final_layer.adaLN_modulation)[-1], final_layer.linear):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
