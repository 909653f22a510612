"""The choices REPA's successors add to the objective (``stages.core.diffusion.family`` computes them), free of torch so
configs load without it."""

from __future__ import annotations

from dataclasses import dataclass

TARGET_NORMS = ("none", "zscore")
PROJECTOR_TYPES = ("mlp", "conv")


@dataclass(frozen=True)
class FamilySettings:
    """The objective's additions to REPA; the defaults add nothing."""

    class_token_weight: float = 0.0  # REG: weight of the class token's velocity loss (0: no class token)
    target_norm: str = "none"  # iREPA: "zscore" normalises the target tokens over the token axis
    zscore_alpha: float = 1.0  # iREPA: share of the token mean that is subtracted
    dispersive_lambda: float = 0.0  # weight of the dispersive loss (0: off)
    dispersive_tau: float = 1.0  # its temperature
    align: bool = True  # False: the alignment loss is not applied this step (HASTE's early stop)

    @property
    def class_token(self) -> bool:
        return self.class_token_weight > 0
