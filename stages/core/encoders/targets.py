"""Alignment-target image encoders: DINOv2 (every size, with or without registers), and the vision towers
of CLIP and SigLIP, each with its own preprocessing as its authors define it.

DINOv2 is prepared as official REPA prepares it (``features.dino_preprocess``: 224 px per 256 px of crop,
ImageNet mean/std), so its patch grid is the latent token grid. CLIP and SigLIP get what their image
processor does (resolution, mean/std), applied to the encode crop. Their token grid is their input size
over their patch size; when it is not the cache's token grid the target is refused, or, with an input
size given, resized to it with the position embedding interpolated (transformers'
``interpolate_pos_encoding``) and that is recorded in the preprocessing.

Patch tokens are taken after the model's final LayerNorm: DINOv2's ``layernorm``, SigLIP's
``post_layernorm`` (its output), CLIP's ``post_layernorm`` (which transformers applies to the class token
only, applied here to every token). Class tokens: DINOv2's class token then its register tokens, CLIP's
class token; SigLIP has none.
"""

from __future__ import annotations

from typing import cast

import torch

from ..errors import UsageError
from .features import dino_preprocess, dino_preprocess_description
from .library_noise import quiet_transformers
from .load import (
    DINO_MODEL_TYPES,
    EncoderLoadError,
    ModelSource,
    _fail,
    dino_geometry,
    hf_config,
    load_dino,
    weights_hash,
)
from .processor_pixels import ProcessorPixels

VISION_TOWER_TYPES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}


def target_kind(src: ModelSource) -> str:
    """dinov2, clip or siglip, from the model's config; a one-line error for anything else."""
    cfg = hf_config("target encoder", src)
    if cfg.model_type in DINO_MODEL_TYPES:
        return "dinov2"
    if cfg.model_type in VISION_TOWER_TYPES:
        return VISION_TOWER_TYPES[cfg.model_type]
    raise EncoderLoadError(f"--target-model '{src.describe()}' is a {cfg.model_type} model; an alignment target is "
                           "a DINOv2, CLIP or SigLIP model (e.g. facebook/dinov2-large, openai/clip-vit-large-patch14)")


class TargetEncoder:
    """One alignment target on one device: ``encode(uint8 (B, 3, res, res))`` -> (patch tokens, class tokens)."""

    def __init__(self, src: ModelSource, resolution: int, grid: int, device: torch.device, dtype: torch.dtype,
                 class_tokens: bool = False, input_size: int | None = None, pos_embed: str = "antialias-once"):
        self.src, self.device, self.dtype = src, device, dtype
        self.kind = target_kind(src)
        self.resolution = resolution
        self.interpolate = False
        if self.kind == "dinov2":
            if input_size is not None:
                raise UsageError("--target-input-size: DINOv2 targets are prepared as official REPA prepares them "
                                 "(224 px per 256 px of crop); drop the option")
            info = dino_geometry(hf_config("DINOv2", src), resolution)
            self.model = load_dino(src, dtype, device, pos_embed_grid=info["grid"], pos_embed=pos_embed)
            self.preprocess = dino_preprocess_description(pos_embed)
            self.patch, self.size, self.extra = info["patch_size"], info["input_size"], 1 + info["registers"]
            self.registers = info["registers"]
        else:
            self._load_tower(src, input_size)
        self.grid = self.size // self.patch
        if self.grid != grid:
            fix = (f"pass --target-input-size {grid * self.patch} to resize its input to the cache's grid (its "
                   "position embedding is then interpolated)" if self.kind != "dinov2"
                   else "encode the cache at another --resolution")
            raise UsageError(f"--target-model '{src.describe()}' sees a {self.grid}x{self.grid} token grid "
                             f"({self.size} px, patch {self.patch}) but the cache's token grid is {grid}x{grid}; {fix}")
        self.tokens = self.grid * self.grid
        self.dim = int(self.model.config.hidden_size)
        self.class_tokens = self.extra if class_tokens else 0
        if class_tokens and not self.extra:
            raise UsageError(f"--class-tokens: '{src.describe()}' is a {self.kind} model, which has no class token; "
                             "drop --class-tokens")

    def _load_tower(self, src: ModelSource, input_size: int | None) -> None:
        from transformers import AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

        cls = CLIPVisionModel if self.kind == "clip" else SiglipVisionModel
        try:
            with quiet_transformers():  # the text tower's weights go unused; what the vision tower lacks is checked
                loaded = cls.from_pretrained(src.id, dtype=self.dtype, output_loading_info=True, **src.kwargs())
            processor = AutoImageProcessor.from_pretrained(src.id, **src.kwargs())
        except Exception as e:
            raise _fail("target encoder", src, e) from e
        # With output_loading_info transformers returns (model, loading info), though it annotates the model only;
        # typed as a Module because PreTrainedModel.to is typed through @wraps(nn.Module.to), unbound.
        model, info = cast("tuple[torch.nn.Module, dict]", loaded)
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise EncoderLoadError(f"--target-model '{src.describe()}' lacks {len(missing)} weight(s) of its "
                                   f"{self.kind} vision tower (first: {missing[0]}); pass a trained CLIP or SigLIP "
                                   "checkpoint")
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.pixels = ProcessorPixels(processor, self.device, self.dtype, f"--target-model '{src.describe()}'",
                                      input_size)
        self.size = self.pixels.input_size
        self.patch = int(self.model.config.patch_size)
        native = int(self.model.config.image_size)
        self.interpolate = self.size != native
        self.preprocess = self.pixels.describe() + (
            f"; position embedding interpolated from {native // self.patch} to {self.size // self.patch} per side"
            if self.interpolate else "")
        self.extra = 1 if self.kind == "clip" else 0
        self.registers = 0
        tower = getattr(self.model, "vision_model", self.model)  # transformers 4 nests it, 5 does not
        self.norm = tower.post_layernorm if self.kind == "clip" else None

    def final_layernorm(self) -> dict | None:
        """DINOv2's final LayerNorm ``{"weight", "bias"}`` as float lists (what the cached tokens went through
        last), None for the other kinds."""
        if self.kind != "dinov2":
            return None
        norm = self.model.layernorm
        return {"weight": norm.weight.detach().float().cpu().tolist(),
                "bias": norm.bias.detach().float().cpu().tolist()}

    def identity(self) -> dict:
        return {"class": type(self.model).__name__, "weights": weights_hash(self.model)}

    def info(self) -> dict:
        """What the manifest records of the target's geometry."""
        return {"kind": self.kind, "dim": self.dim, "tokens": self.tokens, "grid": [self.grid, self.grid],
                "patch_size": self.patch, "input_size": self.size, "registers": self.registers,
                "class_tokens": self.class_tokens}

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 (B, 3, res, res) on the device -> patch tokens (B, tokens, dim) and class tokens
        (B, class_tokens, dim) or None, in the encoder's dtype."""
        if self.kind == "dinov2":
            hidden = self.model(pixel_values=dino_preprocess(images, self.resolution).to(self.dtype)).last_hidden_state
        else:
            out = self.model(pixel_values=self.pixels(images), interpolate_pos_encoding=self.interpolate)
            hidden = out.last_hidden_state if self.norm is None else self.norm(out.last_hidden_state)
        patches = hidden[:, self.extra :]
        return patches, (hidden[:, : self.class_tokens] if self.class_tokens else None)
