"""One entry point to the network families: build a model from its config, count its parameters."""

from __future__ import annotations

from torch import nn

from stages.core.model.model_config import ModelConfig
from stages.core.model.repa_rf import RepaRFDiT
from stages.core.model.sit import SiT

PROJECTOR_PREFIXES = ("projectors.", "repa_transforms.")


def build_model(config: ModelConfig) -> nn.Module:
    """The network ``config.arch`` names, freshly initialised (seed the global generator first)."""
    return RepaRFDiT(config) if config.arch == "repa-rf" else SiT(config)


def count_parameters(model: nn.Module, include_projector: bool = False) -> int:
    """Number of parameters, by default without the REPA projectors (the convention of the SiT/REPA papers)."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if include_projector or not name.startswith(PROJECTOR_PREFIXES)
    )
