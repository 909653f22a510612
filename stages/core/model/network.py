"""One entry point to the network families: build a model from its config, count its parameters."""

from __future__ import annotations

from torch import nn

from stages.core.model.ddt import DiTwDDTHead
from stages.core.model.ddt_config import DDTConfig
from stages.core.model.lightning_dit_model import LightningDiT
from stages.core.model.model_config import RAE_ARCHS, ModelConfig
from stages.core.model.repa_rf import RepaRFDiT
from stages.core.model.sit import SiT

PROJECTOR_PREFIXES = ("projectors.", "repa_transforms.")
# What build_model returns: every family is called as model(x, t, **conditioning) -> (velocity, projected) and has
# projectors (empty where it has none) and config.num_classes.
Network = SiT | RepaRFDiT | DiTwDDTHead | LightningDiT
TextNetwork = SiT | RepaRFDiT  # the families that take captions (null_text)


def build_model(config: ModelConfig) -> Network:
    """The network ``config.arch`` names, freshly initialised (seed the global generator first)."""
    if config.arch in RAE_ARCHS:
        rae = config.rae_config()
        return DiTwDDTHead(rae) if isinstance(rae, DDTConfig) else LightningDiT(rae)
    return RepaRFDiT(config) if config.arch == "repa-rf" else SiT(config)


def count_parameters(model: nn.Module, include_projector: bool = False) -> int:
    """Number of parameters, by default without the REPA projectors (the convention of the SiT/REPA papers)."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if include_projector or not name.startswith(PROJECTOR_PREFIXES)
    )
