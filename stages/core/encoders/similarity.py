"""Image-caption similarity with a CLIP or SigLIP model: scored in the encode pass, stored per sample, filtered on.

The model sees the same centre crop as the VAE and DINOv2 (no second read of the tars), prepared on the
device as its image processor would: resized (bicubic, antialiased) to the processor's size, centre-cropped
when the processor crops, rescaled and normalised. Captions are padded to the model's maximum length, as
the SigLIP processor and repa-rf do. The score is the cosine of the normalised image and text
embeddings (what repa-rf compared with 0.05), not the logit-scaled one.
"""

from __future__ import annotations

import torch

from .load import EncoderLoadError, ModelSource, _fail, hf_config, weights_hash
from .processor_pixels import ProcessorPixels

SIMILARITY_MODEL_TYPES = ("clip", "siglip")


class SimilarityModel:
    """A CLIP/SigLIP model, its tokenizer and its image preprocessing, on one device."""

    def __init__(self, src: ModelSource, dtype: torch.dtype, device: torch.device):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        cfg = hf_config("similarity model", src)
        if cfg.model_type not in SIMILARITY_MODEL_TYPES:
            raise EncoderLoadError(f"--similarity-model '{src.describe()}' is a {cfg.model_type} model; it must be a "
                                   "CLIP or SigLIP model (e.g. google/siglip-large-patch16-256)")
        try:
            self.model = AutoModel.from_pretrained(src.id, dtype=dtype, **src.kwargs())
            self.tokenizer = AutoTokenizer.from_pretrained(src.id, **src.kwargs())
            processor = AutoImageProcessor.from_pretrained(src.id, **src.kwargs())
        except Exception as e:
            raise _fail("similarity model", src, e) from e
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.device, self.dtype = device, dtype
        self.max_tokens = int(cfg.text_config.max_position_embeddings)
        self.pixels = ProcessorPixels(processor, device, dtype, f"--similarity-model '{src.describe()}'")

    def describe_preprocess(self) -> str:
        """What the fingerprint records of how the crop reaches the model."""
        return f"{self.pixels.describe()}; captions padded to {self.max_tokens} tokens"

    def identity(self) -> dict:
        return {"class": type(self.model).__name__, "weights": weights_hash(self.model),
                "tokenizer": type(self.tokenizer).__name__, "vocab_size": len(self.tokenizer),
                "preprocess": self.describe_preprocess()}

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Cosine similarity of each image with its caption, float32 (B,)."""
        tok = self.tokenizer(captions, padding="max_length", max_length=self.max_tokens, truncation=True,
                             return_tensors="pt")
        text = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        out = self.model(pixel_values=self.pixels(images), **text)
        return (out.image_embeds.float() * out.text_embeds.float()).sum(dim=-1)
