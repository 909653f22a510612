"""The shape and conditioning of a network, for every family (``stages.core.model.network`` builds it).

Kept free of torch so configs, presets and their checks load without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

from stages.core.model.ddt_config import DDTConfig, LightningDiTConfig
from stages.core.model.model_presets import MODEL_PRESETS

COND_MODES = ("class", "text", "none")
# official REPA's SiT; repa-rf's (cloneofsimo/repa-rf) CC12M DiT; RAE's DiT-DH and LightningDiT
ARCHS = ("sit", "repa-rf", "dit-dh", "lightning-dit")
RAE_ARCHS = ("dit-dh", "lightning-dit")
# Any value > 0 gives RAE's networks their null-class row; dropping labels is the conditioner's job.
RAE_NULL_ROW = 0.1
DEFAULT_HEAD_DIM = 64


class _RAEShape(TypedDict):
    """The fields DDTConfig and LightningDiTConfig both take."""

    input_size: int
    patch_size: int
    in_channels: int
    mlp_ratio: float
    class_dropout_prob: float
    num_classes: int


@dataclass
class ModelConfig:
    """Give ``head_dim`` or ``num_heads``; the other is derived."""

    preset: str | None = None  # name in MODEL_PRESETS this config started from, for logs and checkpoints
    arch: str = "sit"  # network family: "sit" (DiT/SiT, as official REPA) or "repa-rf" (repa-rf's DiT)
    width: int = 768  # hidden size of every token
    depth: int = 12  # number of transformer blocks
    head_dim: int | None = None  # channels per attention head (default 64 when num_heads is not given)
    num_heads: int | None = None  # attention heads; must equal width // head_dim when both are given
    patch_size: int = 2  # latent pixels per patch side
    in_channels: int = 4  # latent channels (4 for SD-VAE, 16 for the FLUX VAE); also the output channels
    input_size: int = 32  # latent height and width
    cond: str = "class"  # "class" (label embedding), "text" (caption cross-attention) or "none"
    num_classes: int = 1000  # class labels for cond="class"; one extra row is the null class for CFG
    text_dim: int | None = None  # caption embedding size for cond="text"
    text_mask: bool = True  # cross-attention masks padded caption tokens (repa-rf's DiT does not)
    repa_dims: tuple[int, ...] = ()  # token size of each alignment target, one projector each; () disables REPA
    align_layer: int = 8  # 1-based block whose output the projectors read
    align_layers: tuple[int, ...] = ()  # per projector, when the targets are aligned at different blocks
    projector_dim: int = 2048  # hidden size of SiT's REPA projector MLP (repa-rf's projector is width wide)
    mlp_ratio: float = 4.0  # MLP hidden size as a multiple of width
    # The REPA family (stages.core.diffusion.family), sit only:
    class_token_dim: int = 0  # REG: size of the target class token the model also denoises (0: none)
    projector_type: str = "mlp"  # "conv": iREPA's Conv2d projector over the token grid
    projector_kernel: int = 1  # its kernel size (odd)
    hidden_layer: int = 0  # 1-based block whose output forward also returns (the dispersive loss); 0: none
    # DiT-DH's wide head (RAE), dit-dh only: its width, blocks and heads (width/depth/num_heads are the body's)
    head_width: int = 0
    head_depth: int = 0
    head_heads: int = 0

    def __post_init__(self) -> None:
        self.repa_dims = tuple(int(d) for d in self.repa_dims)
        self.align_layers = tuple(int(d) for d in self.align_layers)
        if self.head_dim is None and self.num_heads is None:
            self.head_dim = DEFAULT_HEAD_DIM
        if self.head_dim is not None and self.width % self.head_dim != 0:
            raise ValueError(f"width={self.width} is not divisible by head_dim={self.head_dim}")
        if self.num_heads is not None and self.width % self.num_heads != 0:
            raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}")
        if self.num_heads is None:
            assert self.head_dim is not None  # the default when neither was given
            self.num_heads = self.width // self.head_dim
        if self.head_dim is None:
            self.head_dim = self.width // self.num_heads
        self.validate()

    @property
    def heads(self) -> int:
        """``num_heads``, which ``__post_init__`` derives from ``head_dim`` when it is not given."""
        assert self.num_heads is not None, "ModelConfig.__post_init__ sets num_heads"
        return self.num_heads

    @property
    def caption_dim(self) -> int:
        """``text_dim``, which ``validate`` requires of a caption-conditioned config (cond='text')."""
        if self.text_dim is None:
            raise ValueError(f"cond={self.cond!r}: this network takes no captions (text_dim is not set)")
        return self.text_dim

    @property
    def repa(self) -> bool:
        return bool(self.repa_dims)

    @property
    def extra_outputs(self) -> bool:
        """Whether forward returns a third element (the class token's velocity, a block's hidden state)."""
        return bool(self.class_token_dim or self.hidden_layer)

    @property
    def projector_layers(self) -> tuple[int, ...]:
        """The 1-based block each projector reads."""
        return self.align_layers or (self.align_layer,) * len(self.repa_dims)

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent option."""
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r} must be one of {ARCHS}")
        if self.width <= 0 or self.width % 4 != 0:
            # the 2-D sin-cos position embedding splits width into 4 equal sin/cos blocks
            raise ValueError(f"width={self.width} must be a positive multiple of 4")
        head_dim, num_heads = self.head_dim, self.num_heads
        if head_dim is None or num_heads is None or head_dim * num_heads != self.width:
            raise ValueError(
                f"head_dim={self.head_dim} x num_heads={self.num_heads} does not equal width={self.width}"
            )
        if self.depth < 1:
            raise ValueError(f"depth={self.depth} must be at least 1")
        if self.patch_size < 1 or self.input_size % self.patch_size != 0:
            raise ValueError(f"patch_size={self.patch_size} must divide input_size={self.input_size}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels={self.in_channels} must be at least 1")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio={self.mlp_ratio} must be positive")
        if self.cond not in COND_MODES:
            raise ValueError(f"cond={self.cond!r} must be one of {COND_MODES}")
        if self.arch == "repa-rf" and self.cond != "text":
            raise ValueError(f"cond={self.cond!r}: the repa-rf DiT is conditioned on captions only (cond='text')")
        if self.cond == "class" and self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes} must be at least 1 for cond='class'")
        if self.cond == "text" and (self.text_dim is None or self.text_dim < 1):
            raise ValueError(f"text_dim={self.text_dim} must be a positive int for cond='text'")
        if self.repa_dims:
            if min(self.repa_dims) < 1 or self.projector_dim < 1:
                raise ValueError(
                    f"repa_dims={self.repa_dims} and projector_dim={self.projector_dim} must be positive"
                )
            if self.align_layers and len(self.align_layers) != len(self.repa_dims):
                raise ValueError(f"align_layers={self.align_layers}: one block per alignment target "
                                 f"({len(self.repa_dims)})")
            if not all(1 <= layer <= self.depth for layer in (self.align_layer, *self.align_layers)):
                raise ValueError(
                    f"align_layer={self.align_layers or self.align_layer} must be between 1 and depth={self.depth} "
                    "(1-based: align_layer=k aligns the output of the k-th block)"
                )

        if self.projector_type not in ("mlp", "conv"):
            raise ValueError(f"projector_type={self.projector_type!r} must be mlp or conv")
        if self.projector_kernel < 1 or self.projector_kernel % 2 == 0:
            raise ValueError(f"projector_kernel={self.projector_kernel} must be a positive odd number")
        if self.class_token_dim < 0 or not 0 <= self.hidden_layer <= self.depth:
            raise ValueError(f"class_token_dim={self.class_token_dim} must be >= 0 and hidden_layer="
                             f"{self.hidden_layer} between 0 and depth={self.depth}")
        if self.arch != "sit" and (self.class_token_dim or self.hidden_layer or self.projector_type != "mlp"):
            raise ValueError(f"arch={self.arch!r}: the class token, conv projector and hidden-state output are "
                             "those of the sit family")
        if self.arch in RAE_ARCHS:
            if self.cond == "text" or self.repa_dims:
                raise ValueError(f"arch={self.arch!r} is RAE's network, class-conditional or unconditional, without a "
                                 f"REPA projector (cond={self.cond!r}, {len(self.repa_dims)} projector(s)); train it "
                                 "with --method sit and --cond class or none")
            self.rae_config()  # its own checks (patch size, head sizes for RoPE)
        elif self.head_width or self.head_depth or self.head_heads:
            raise ValueError(f"head_width/head_depth/head_heads belong to arch 'dit-dh', not {self.arch!r}")

    def rae_config(self) -> DDTConfig | LightningDiTConfig:
        """The DDTConfig / LightningDiTConfig of an RAE network (``stages.core.model.network`` builds it)."""
        common = _RAEShape(input_size=self.input_size, patch_size=self.patch_size, in_channels=self.in_channels,
                           mlp_ratio=self.mlp_ratio, class_dropout_prob=RAE_NULL_ROW,
                           num_classes=self.num_classes if self.cond == "class" else 1)  # unconditional: one label, 0
        if self.arch == "dit-dh":
            if min(self.head_width, self.head_depth, self.head_heads) < 1:
                raise ValueError("arch 'dit-dh' needs its head's width, depth and heads (a DiTDH-* preset sets them)")
            return DDTConfig(hidden_size=(self.width, self.head_width), depth=(self.depth, self.head_depth),
                             num_heads=(self.heads, self.head_heads), preset=self.preset, **common)
        if self.arch == "lightning-dit":
            return LightningDiTConfig(hidden_size=self.width, depth=self.depth, num_heads=self.heads, **common)
        raise ValueError(f"arch={self.arch!r} is not one of RAE's networks {RAE_ARCHS}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        """The preset's shape with any field overridden, e.g. ``from_preset("SiT-XL/2", repa_dims=(768,))``."""
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {', '.join(MODEL_PRESETS)}")
        fields = dict(MODEL_PRESETS[name])
        if "head_dim" in overrides and "num_heads" not in overrides:
            fields.pop("num_heads", None)  # an explicit head size replaces the preset's head count
        fields.update(overrides)
        return cls(preset=name, **fields)
