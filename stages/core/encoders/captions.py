"""Caption encoding: the one definition used to write the cache and to encode prompts at sampling time,
so that both see the same tokens."""

from __future__ import annotations

import torch

from ..errors import UsageError


def encode_captions(tokenizer, text_encoder, captions: list[str], max_tokens: int, device: torch.device):
    """(hidden (B, L, D), attention mask (B, L)) with right padding, captions truncated to ``max_tokens``."""
    if tokenizer.padding_side != "right":
        raise UsageError("the text tokenizer pads on the left; set padding_side='right' in its config")
    tok = tokenizer(captions, max_length=max_tokens, truncation=True, padding="longest", return_tensors="pt")
    ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
    return text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask
