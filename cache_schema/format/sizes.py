"""Bytes a cached sample takes, from its geometry and codec: what `repa encode --dry-run` and the planning table
(docs/planning.md) both report. Arrays as ``layout`` stores them: moments fp16 (mean and std of every latent
channel), patch tokens fp16 or int8 with one fp16 scale per token, caption tokens likewise plus 8 bytes of span."""

from __future__ import annotations

FEATURE_BYTES = {"fp16": 2, "int8": 1}
MASKED_CAPTION_TOKENS = 32  # real tokens of a web alt-text caption, about; unmasked captions store every position


def token_bytes(tokens: int, dim: int, codec: str) -> int:
    """``tokens`` feature vectors of ``dim`` values in ``codec`` (int8: plus an fp16 scale per token)."""
    return tokens * (dim * FEATURE_BYTES[codec] + (2 if codec == "int8" else 0))


def caption_tokens(max_tokens: int, unmasked: bool) -> int:
    """Caption positions stored per sample: every position when unmasked, else the real tokens (assumed)."""
    return max_tokens if unmasked else min(max_tokens, MASKED_CAPTION_TOKENS)


def sample_bytes(latent_channels: int, latent_size: int, dino_tokens: int, dino_dim: int, codec: str = "fp16",
                 text_dim: int | None = None, text_tokens: int = 0, similarity: bool = False,
                 flips: bool = False, class_tokens: int = 0) -> dict[str, int]:
    """Bytes per sample by array group: moments, dino, (dino_cls: class and register tokens, fp16 whatever the
    codec), (text), (similarity), (flips: the image features again)."""
    out = {"moments": 2 * latent_channels * latent_size**2 * 2, "dino": token_bytes(dino_tokens, dino_dim, codec)}
    if class_tokens:
        out["dino_cls"] = token_bytes(class_tokens, dino_dim, "fp16")
    if text_dim:
        out["text"] = token_bytes(text_tokens, text_dim, codec) + 8
    if similarity:
        out["similarity"] = 4
    if flips:
        out["flips"] = out["moments"] + out["dino"] + out.get("dino_cls", 0)
    return out
