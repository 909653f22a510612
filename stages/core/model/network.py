"""One entry point to the network families: build a model from its config, count its parameters."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stages.core.model.ddt import DiTwDDTHead
from stages.core.model.lightning_dit_model import LightningDiT
from stages.core.model.model_config import ModelConfig
from stages.core.model.repa_rf import RepaRFDiT
from stages.core.model.sit import SiT

PROJECTOR_PREFIXES = ("projectors.", "repa_transforms.")


class _TrainingInterface:
    """RAE's networks behind the interface the objective and samplers call: ``forward(x, t, y=None)`` returns
    ``(velocity, [])`` (no REPA projector; ``projectors`` is empty), with RAE's parameter names unchanged."""

    def _add_interface(self) -> None:
        self.projectors = nn.ModuleList()  # holds nothing, adds no state-dict entry

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> tuple[Tensor, list]:
        """``y`` None: an unconditional network, every sample of label 0 (its table's only class)."""
        if y is None:
            y = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return super().forward(x, t, y), []


class DiTDHNetwork(_TrainingInterface, DiTwDDTHead):
    def __init__(self, config):
        super().__init__(config)
        self._add_interface()


class LightningDiTNetwork(_TrainingInterface, LightningDiT):
    def __init__(self, config):
        super().__init__(config)
        self._add_interface()


def build_model(config: ModelConfig) -> nn.Module:
    """The network ``config.arch`` names, freshly initialised (seed the global generator first)."""
    if config.arch == "dit-dh":
        return DiTDHNetwork(config.rae_config())
    if config.arch == "lightning-dit":
        return LightningDiTNetwork(config.rae_config())
    return RepaRFDiT(config) if config.arch == "repa-rf" else SiT(config)


def count_parameters(model: nn.Module, include_projector: bool = False) -> int:
    """Number of parameters, by default without the REPA projectors (the convention of the SiT/REPA papers)."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if include_projector or not name.startswith(PROJECTOR_PREFIXES)
    )
