"""Which cache target a run on tokens (RAE) diffuses, checked once for training and for an imported RAE model.

RAE's latent is a square grid of fp16 patch tokens of DINOv2 with registers; a cache that lacks the target,
stores it as int8 or on another grid is refused in one line naming the command that provides it.
"""

from __future__ import annotations

from pathlib import Path

from cache_schema import Manifest
from stages.core.diffusion.diffusion_variable import LayerNormAffine, TargetTokens
from stages.core.diffusion.token_stats import LatentStats
from stages.core.errors import UsageError

RAE_TARGET_MODEL = "facebook/dinov2-with-registers-base"


def add_target_command(cache: Path | str, name: str) -> str:
    return f"`repa encode --cache {cache} --add-target {name} --target-model {RAE_TARGET_MODEL}`"


def token_target(manifest: Manifest, cache: Path | str, name: str) -> dict:
    """The manifest record of target ``name`` (--diffuse), after checking RAE's latent can be made from it."""
    if name not in manifest.target_names():
        raise UsageError(f"--diffuse {name}: cache {cache} holds no target {name!r} (it has "
                         f"{', '.join(manifest.target_names())}); add its tokens with "
                         f"{add_target_command(cache, name)}")
    if manifest.codec != "fp16":
        raise UsageError(f"--diffuse {name}: cache {cache} stores its tokens as {manifest.codec} (per-token "
                         "scales), not the fp16 tokens RAE's latent is made of; encode a cache with `repa encode "
                         f"--feature-codec fp16` and add the target to it with {add_target_command(cache, name)}")
    record = manifest.target(name)
    rows, cols = record["grid"]
    if rows != cols or rows * cols != record["tokens"]:
        raise UsageError(f"--diffuse {name}: target {name} of cache {cache} has a {rows}x{cols} token grid; "
                         "RAE's latent is a square grid of patch tokens: add a DINOv2 target with "
                         f"{add_target_command(cache, name)}")
    return record


def target_tokens(name: str, record: dict, stats: LatentStats | None = None) -> TargetTokens:
    """RAE's variable of target ``name`` (its manifest record), with the final LayerNorm's vectors it records."""
    return TargetTokens(name, record["dim"], record["grid"][0], stats,
                        layernorm=LayerNormAffine.from_record(record.get("layernorm")))
