"""What RAE's networks (DiT-DH, LightningDiT) share: their null class, and the interface the objective and the
samplers call. Each network's own math is its ``velocity(x, t, y)``; ``forward`` wraps it."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn


class LabelConfig(Protocol):
    num_classes: int
    class_dropout_prob: float


class RAENetwork(nn.Module):
    """``forward(x, t, y=None)`` returns ``(velocity, [])``: no REPA projector, so ``projectors`` is empty and
    adds no state-dict entry; the parameter names are RAE's."""

    config: LabelConfig
    family = "network"  # as named in its errors

    def __init__(self) -> None:
        super().__init__()
        self.projectors = nn.ModuleList()

    @property
    def null_class(self) -> int:
        """Label id of the null class that classifier-free guidance substitutes for dropped labels: the one after
        the ``num_classes`` real ones, there only when the config drops labels (``class_dropout_prob`` > 0), as in
        RAE's ``LabelEmbedder``."""
        if self.config.class_dropout_prob <= 0:
            raise ValueError(f"this {self.family} has no null class (class_dropout_prob is 0)")
        return self.config.num_classes

    def velocity(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Velocity at latents x, times t (B,), labels y (B,) (``null_class`` = dropped)."""
        raise NotImplementedError

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """``y`` None: an unconditional network, every sample of label 0 (its table's only class)."""
        if y is None:
            y = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.velocity(x, t, y), []
