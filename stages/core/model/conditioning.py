"""From a batch of cached features to the model's conditioning keywords, with dropout to the null
condition (the learned null caption or the null class) for classifier-free guidance."""

from __future__ import annotations

import torch

CONDITIONINGS = ("class", "text", "none")


class Conditioner:
    """Turns a batch (``label``, or ``text`` + ``text_mask``) into ``{"y": ...}`` or
    ``{"text": ..., "text_mask": ...}``; with a generator, each sample's condition is replaced by the
    null one with probability ``dropout``."""

    def __init__(self, cond: str, model, dropout: float):
        if cond not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning {cond!r}; choose one of {CONDITIONINGS}")
        self.cond, self.model, self.dropout = cond, model, dropout

    def drops(self, n: int, generator: torch.Generator | None,
              device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Which of ``n`` samples get the null condition (None: no dropout, and nothing drawn)."""
        if generator is None or self.dropout == 0 or self.cond == "none":
            return None
        return torch.rand(n, generator=generator, device=device) < self.dropout

    def __call__(self, batch: dict, generator: torch.Generator | None = None, drop: torch.Tensor | None = None) -> dict:
        """``drop``: the samples to drop, drawn beforehand (else drawn here from ``generator``)."""
        if drop is None and generator is not None:
            drop = self.drops(batch["moments"].shape[0], generator, batch["moments"].device)
        if self.cond == "class":
            y = batch["label"]
            return {"y": y if drop is None else torch.where(drop, torch.full_like(y, self.model.null_class), y)}
        if self.cond == "text":
            text, mask = batch["text"].float(), batch["text_mask"]
            if text.shape[1] == 0:  # every caption in the batch has zero tokens: attend to one masked slot
                text = text.new_zeros(text.shape[0], 1, text.shape[2])
                mask = mask.new_zeros(mask.shape[0], 1)
            if drop is not None:
                null, null_mask = self.model.null_text(text.shape[0], text.shape[1])
                text = torch.where(drop[:, None, None], null.to(text.dtype), text)
                mask = torch.where(drop[:, None], null_mask, mask)
            return {"text": text, "text_mask": mask}
        return {}
