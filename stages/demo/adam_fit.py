"""The loop every demo fit runs (the VAE, the DINOv2, the RAE decoder): Adam on random batches drawn from one
seeded generator, so a fit is the same on every machine."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def adam_fit(params: Iterable[torch.nn.Parameter], batch_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
             num_items: int, steps: int, batch_size: int, lr: float, seed: int = 0,
             progress: Callable[[int, float], None] | None = None) -> list[float]:
    """``steps`` Adam steps on ``batch_loss(indices, generator)``: ``batch_size`` indices into ``num_items`` drawn
    from the generator, which the loss may draw from further (a VAE's posterior sample). Returns the losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for step in range(steps):
        loss = batch_loss(torch.randint(0, num_items, (batch_size,), generator=g), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress:
            progress(step, losses[-1])
    return losses
