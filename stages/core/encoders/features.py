"""The encoders of stage one, batched on the GPU: VAE moments, DINOv2 patch tokens, caption hidden states.

Preprocessing follows official REPA (its ``preprocess_raw_image``): both encoders see the same centre crop;
the VAE gets it in [-1, 1]; DINOv2 gets it /255, ImageNet-normalised, then bicubic-resized to
224 px per 256 px, so its 14-px patch grid lines up with the latent token grid, and DINOv2's position
embedding is resampled once to that grid, by one of two formulas (``EncoderSpec.dino_pos_embed``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cache_schema.format.layout import flip_name
from stages.core.data.codec import quantize_int8

from ..errors import UsageError
from .captions import encode_captions
from .load import (
    ModelSource,
    dino_geometry,
    hf_config,
    load_dino,
    load_text_encoder,
    load_vae,
    text_geometry,
    vae_geometry,
    weights_hash,
)
from .similarity import SimilarityModel

# Which stored feature of a sample is not finite: bits of FeatureEncoders.encode's "nonfinite".
NONFINITE_BITS = {"moments": 1, "dino": 2, "text": 4, "similarity": 8}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dino_preprocess(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 (B, 3, res, res) -> normalised float (B, 3, 224*res/256, 224*res/256), as official REPA."""
    x = images.float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    size = 224 * resolution // 256
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


DINO_PREPROCESS_DESCRIPTION = "uint8/255, imagenet mean/std, bicubic resize to 224*res/256 (align_corners=False)"


def dino_preprocess_description(pos_embed: str) -> str:
    """What the fingerprint records of the DINOv2 preprocessing. Caches from before the per-call table was
    computed here recorded the bare description: whichever formula their transformers used, so their
    fingerprint differs from a cache made now."""
    if pos_embed == "bicubic-per-call":
        return DINO_PREPROCESS_DESCRIPTION + ("; position embedding as DINOv2 interpolates it per call (bicubic, "
                                              "scale (grid+0.1)/n; with registers: antialias, to the grid)")
    if pos_embed == "antialias-once":
        return (DINO_PREPROCESS_DESCRIPTION
                + "; position embedding resampled once to the patch grid (bicubic, antialias)")
    raise UsageError(f"unknown --dino-pos-embed {pos_embed!r}; choose antialias-once or bicubic-per-call")


@dataclass
class EncoderSpec:
    vae: ModelSource
    dino: ModelSource
    text: ModelSource | None
    max_text_tokens: int
    resolution: int
    dino_pos_embed: str = "antialias-once"  # or "bicubic-per-call"
    text_attention: str = "masked"  # or "unmasked"
    similarity: ModelSource | None = None  # CLIP/SigLIP model scoring image-caption similarity
    class_tokens: bool = False  # also return DINOv2's class and register tokens ("dino_cls")
    flips: bool = False  # also return the image features of the horizontally flipped crop ("moments_flip", ...)


class FeatureEncoders:
    """All stage-one encoders on one device, with the geometry and identity the manifest records."""

    def __init__(
        self, spec: EncoderSpec, device: torch.device, dtype: torch.dtype, compile: bool = False, batch_size: int = 0
    ):
        self.spec, self.device, self.dtype = spec, device, dtype
        dino_preprocess_description(spec.dino_pos_embed)  # an unknown method fails before any weights load
        self.compiled = compile
        self.batch_size = batch_size
        self.vae = load_vae(spec.vae, dtype, device).to(memory_format=torch.channels_last)
        self.latent = vae_geometry(self.vae.config)
        self.dino_info = dino_geometry(hf_config("DINOv2", spec.dino), spec.resolution)
        self.dino = load_dino(spec.dino, dtype, device, pos_embed_grid=self.dino_info["grid"],
                              pos_embed=spec.dino_pos_embed)
        self.dino_info["pos_embed"] = spec.dino_pos_embed
        if spec.class_tokens:
            self.dino_info["class_tokens"] = 1 + self.dino_info["registers"]
        latent_grid = spec.resolution // self.latent["downsample"]
        self.latent["size"] = latent_grid
        self.tokenizer = self.text_encoder = None
        self.text_info = None
        if spec.text is not None:
            self.tokenizer, self.text_encoder = load_text_encoder(spec.text, dtype, device)
            self.text_info = text_geometry(self.text_encoder.config)
        self.similarity = SimilarityModel(spec.similarity, dtype, device) if spec.similarity is not None else None
        self._vae_fn = self._vae_moments
        self._dino_fn = self._dino_hidden
        if compile:
            self._vae_fn = torch.compile(self._vae_moments)
            self._dino_fn = torch.compile(self._dino_hidden)

    def identity(self) -> dict:
        """What identifies each encoder in the fingerprint: class and content hash of the weights."""
        out = {
            "vae": {"class": type(self.vae).__name__, "weights": weights_hash(self.vae)},
            "dino": {"class": type(self.dino).__name__, "weights": weights_hash(self.dino)},
            "text_encoder": None,
            "similarity_model": self.similarity.identity() if self.similarity is not None else None,
        }
        if self.text_encoder is not None and self.tokenizer is not None:  # loaded together
            out["text_encoder"] = {
                "class": type(self.text_encoder).__name__,
                "weights": weights_hash(self.text_encoder),
                "tokenizer": type(self.tokenizer).__name__,
                "vocab_size": len(self.tokenizer),
            }
        return out

    # -- the three encoders -------------------------------------------------------------------
    def _vae_moments(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.to(self.dtype) / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)
        dist = self.vae.encode(x).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1).to(torch.float16)

    def _dino_hidden(self, images: torch.Tensor) -> torch.Tensor:
        """Every token of the last hidden state: class, registers, then patches."""
        x = dino_preprocess(images, self.spec.resolution).to(self.dtype)
        return self.dino(pixel_values=x).last_hidden_state

    def _dino_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The patch tokens."""
        return self._dino_hidden(images)[:, 1 + self.dino_info["registers"] :]

    def _text_tokens(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, mask = encode_captions(
            self.tokenizer, self.text_encoder, captions, self.spec.max_text_tokens, self.device,
            attention=self.spec.text_attention,
        )
        return hidden, mask.sum(dim=1)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, captions: list[str], codec: str) -> dict:
        """images: uint8 (B, res, res, 3) on any device. Returns device tensors for the writer:
        moments, dino (+ dino_scale, + dino_cls), with flips the same for the mirrored crop (``flip_name``), with a
        text encoder the padded text (+ text_scale) with text_lengths, the number of tokens to store per caption
        (every position when unmasked), with a similarity model the image-caption ``similarity`` (float32), and
        ``nonfinite``: per sample, a bit set (``NONFINITE_BITS``) for each stored feature holding a
        non-finite value (fp16 overflow, NaN)."""
        n = images.shape[0]
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        pad = self._pad_for_compile(n)
        if pad:
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        out, bad = self._image_features(x, n, codec)
        if self.spec.flips:
            # The same crop mirrored left-right (x is B, C, H, W), through the same encoders.
            flipped, bad_flipped = self._image_features(x.flip(3), n, codec)
            out.update({flip_name(k): v for k, v in flipped.items()})
            bad |= bad_flipped
        if self.text_encoder is not None:
            hidden, out["text_lengths"] = self._text_tokens(captions)
            if codec == "int8":
                out["text"], out["text_scale"] = quantize_int8(hidden)
            else:
                out["text"] = hidden.to(torch.float16)
            stored = out.get("text_scale", out["text"])
            real = torch.arange(stored.shape[1], device=stored.device) < out["text_lengths"][:, None]
            if stored.dim() == 3:
                real = real[..., None]
            bad |= _nonfinite(torch.where(real, stored, 0)) * NONFINITE_BITS["text"]
        if self.similarity is not None:
            out["similarity"] = self.similarity(x[:n], captions)
            bad |= _nonfinite(out["similarity"][:, None]) * NONFINITE_BITS["similarity"]
        out["nonfinite"] = bad.to(torch.uint8)
        return out

    def _image_features(self, x: torch.Tensor, n: int, codec: str) -> tuple[dict, torch.Tensor]:
        """The VAE moments and DINOv2 tokens of the first ``n`` images of ``x`` (uint8, B, 3, res, res), as
        stored, and per sample the ``NONFINITE_BITS`` of those holding a non-finite value."""
        out = {"moments": self._vae_fn(x)[:n]}
        hidden = self._dino_fn(x)[:n]
        extra = 1 + self.dino_info["registers"]
        dino = hidden[:, extra:]
        if self.spec.class_tokens:
            out["dino_cls"] = hidden[:, :extra].to(torch.float16)
        if codec == "int8":
            out["dino"], out["dino_scale"] = quantize_int8(dino)
        else:
            out["dino"] = dino.to(torch.float16)
        bad = _nonfinite(out["moments"]) * NONFINITE_BITS["moments"]
        bad |= _nonfinite(out.get("dino_scale", out["dino"])) * NONFINITE_BITS["dino"]
        if "dino_cls" in out:
            bad |= _nonfinite(out["dino_cls"]) * NONFINITE_BITS["dino"]
        return out, bad

    def _pad_for_compile(self, n: int) -> int:
        # A compiled graph is specialised to its batch size; pad short batches instead of recompiling.
        return max(self.batch_size - n, 0) if self.compiled else 0


def _nonfinite(x: torch.Tensor) -> torch.Tensor:
    """Per sample (first axis): 1 where any stored value is inf or NaN (as the writer will store it)."""
    return (~torch.isfinite(x)).flatten(1).any(dim=1).to(torch.int64)
