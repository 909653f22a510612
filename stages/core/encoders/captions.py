"""Caption encoding: the one definition used to write the cache and to encode prompts at sampling time,
so that both see the same tokens."""

from __future__ import annotations

import torch

from ..errors import UsageError


def encode_captions(
    tokenizer, text_encoder, captions: list[str], max_tokens: int, device: torch.device, attention: str = "masked"
):
    """(hidden (B, L, D), mask (B, L) of the positions that are tokens) with right padding, captions
    truncated to ``max_tokens``.

    ``attention="masked"``: the encoder sees the attention mask and the mask marks the real tokens.
    ``"unmasked"`` (repa-rf's way): padded to ``max_tokens``, encoded from the ids alone, and
    every position, pads included, is a token (the mask is all ones).
    """
    if tokenizer.padding_side != "right":
        raise UsageError("the text tokenizer pads on the left; set padding_side='right' in its config")
    if attention == "unmasked":
        tok = tokenizer(captions, max_length=max_tokens, truncation=True, padding="max_length", return_tensors="pt")
        ids = tok["input_ids"].to(device)
        return text_encoder(input_ids=ids).last_hidden_state, torch.ones_like(tok["attention_mask"]).to(device)
    if attention != "masked":
        raise UsageError(f"unknown --text-attention {attention!r}; choose masked or unmasked")
    tok = tokenizer(captions, max_length=max_tokens, truncation=True, padding="longest", return_tensors="pt")
    ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
    return text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask
