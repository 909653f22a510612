"""The shape of a DiT-DH network (RAE's ``DiTwDDTHead``), kept free of torch like ``model_config``.

Field names are RAE's ``stage_2.params`` keys, so a config's values can be copied over as they are;
presets are RAE's ImageNet-256 configs (``configs/stage2/training/ImageNet256/DiTDH-{S,XL}_DINOv2-B.yaml``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast


def _int_pair(values: Iterable[int]) -> tuple[int, int]:
    """(body, head) as ints, from any sequence (a TOML list, a JSON array); ``validate`` refuses another length."""
    return cast("tuple[int, int]", tuple(int(v) for v in values))


@dataclass
class DDTConfig:
    input_size: int = 16  # latent height and width (tokens per side at patch 1)
    patch_size: int = 1  # RAE's head only works at 1 (its patch embedding expects C·p² input channels)
    in_channels: int = 768  # latent channels, also the output channels
    hidden_size: tuple[int, int] = (1152, 2048)  # (encoder body, wide head)
    depth: tuple[int, int] = (28, 2)
    num_heads: tuple[int, int] = (16, 16)
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # > 0 adds the null-class row; dropping labels is the caller's job here
    num_classes: int = 1000
    use_qknorm: bool = False
    use_swiglu: bool = True
    use_rope: bool = True
    use_rmsnorm: bool = True
    use_pos_embed: bool = True  # fixed 2-D sin-cos table added to the body's input (not learned)
    preset: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.hidden_size = _int_pair(self.hidden_size)
        self.depth = _int_pair(self.depth)
        heads = self.num_heads
        self.num_heads = (int(heads), int(heads)) if isinstance(heads, int) else _int_pair(heads)
        self.validate()

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def latent_dim(self) -> int:
        """Elements per sample, C·h·w: the ``dim`` of RAE's time shift."""
        return self.in_channels * self.input_size * self.input_size

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent option."""
        if self.patch_size != 1:
            raise ValueError(f"patch_size={self.patch_size}: DiT-DH as RAE builds it takes patch size 1 only")
        for name in ("hidden_size", "depth", "num_heads"):
            value = getattr(self, name)
            if len(value) != 2 or min(value) < 1:
                raise ValueError(f"{name}={value} must be two positive ints (body, head)")
        for width, heads in zip(self.hidden_size, self.num_heads, strict=True):
            if width % heads or (width // heads) % 4:
                raise ValueError(f"hidden size {width} with {heads} heads: the head size must be a multiple of 4 "
                                 "(2-D RoPE rotates channel pairs in two halves)")
        if self.input_size < 1 or self.in_channels < 1 or self.num_classes < 1 or self.mlp_ratio <= 0:
            raise ValueError("input_size, in_channels, num_classes and mlp_ratio must be positive")
        if not 0 <= self.class_dropout_prob < 1:
            raise ValueError(f"class_dropout_prob={self.class_dropout_prob} must be in [0, 1)")
        if self.use_pos_embed and self.hidden_size[0] % 4:
            raise ValueError(f"hidden size {self.hidden_size[0]} must be a multiple of 4 for the sin-cos table")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> DDTConfig:
        if name not in DDT_PRESETS:
            raise ValueError(f"unknown DiT-DH preset {name!r}; known: {', '.join(DDT_PRESETS)}")
        return cls(preset=name, **{**DDT_PRESETS[name], **overrides})


DDT_PRESETS: dict[str, dict] = {
    "DiTDH-S": dict(hidden_size=(384, 2048), depth=(12, 2), num_heads=(6, 16)),
    "DiTDH-XL": dict(hidden_size=(1152, 2048), depth=(28, 2), num_heads=(16, 16)),
}


@dataclass
class LightningDiTConfig:
    """RAE's ``LightningDiT`` (``src/stage2/models/lightningDiT.py``): one width, its blocks, any patch size."""

    input_size: int = 16
    patch_size: int = 1
    in_channels: int = 768
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    use_qknorm: bool = False
    use_swiglu: bool = True
    use_rope: bool = True
    use_rmsnorm: bool = True

    def __post_init__(self) -> None:
        self.validate()

    @property
    def latent_dim(self) -> int:
        return self.in_channels * self.input_size * self.input_size

    def validate(self) -> None:
        if self.patch_size < 1 or self.input_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} must divide input_size={self.input_size}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"hidden_size={self.hidden_size} with {self.num_heads} heads: the head size must be a "
                             "multiple of 4 (2-D RoPE rotates channel pairs in two halves)")
        if self.hidden_size % 4 or min(self.depth, self.in_channels, self.num_classes) < 1 or self.mlp_ratio <= 0:
            raise ValueError("hidden_size must be a multiple of 4; depth, in_channels, num_classes, mlp_ratio positive")
        if not 0 <= self.class_dropout_prob < 1:
            raise ValueError(f"class_dropout_prob={self.class_dropout_prob} must be in [0, 1)")
