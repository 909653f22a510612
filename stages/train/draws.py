"""The random draws of one optimizer step, as functions of (seed, step, position in the global batch).

A step's global batch holds ``D = batch_size / K`` distinct images (``K``: --batch-multiplicity), cut into
``processes x grad_accum`` equal pieces; micro-batch ``m`` of rank ``r`` is piece ``m * processes + r``
(``piece_index``, as ``EpochBatchSampler`` serves them). Row ``q = k * D + p`` of the global batch is copy ``k``
of the image at position ``p``, as if the whole global batch were repeated ``K`` times (repa-rf's ``.repeat``).
Per step, one generator seeded with (seed, step) draws, in this order: the posterior noise of each of the ``D``
images (one latent per image, shared by its copies), then ``t``, the path noise and the condition-dropout coins of
each of the ``K * D`` rows, and with REG the path noise of each row's class token.
Every process draws the whole global batch and keeps its rows, so what row ``q`` gets depends on neither the
number of processes nor on gradient accumulation: those only change how the global batch is split.

Why one generator for the whole batch rather than one per sample: both are pure functions of the position,
but drawing per sample costs a generator and a kernel launch per sample and tensor (about 4 x 256 launches a
step on a GPU), while the whole batch is four launches whatever its size. On the CPU (one thread, batch 256,
4x32x32 latents) drawing the whole global batch takes 8.0 ms and 256 per-sample generators 9.6 ms; a process of
a two-process run would draw half of the latter, against a step that takes seconds on a CPU at that size. The
memory is the global batch's noise once per process (8 MiB at batch 256 of 4x32x32 latents, 40 MiB for the
repa-rf preset's 512 rows of 16x32x32 with 4 copies), drawn once per step and sliced per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.core.diffusion.objective import sample_t
from stages.core.diffusion.time_shift import sample_train_t
from stages.core.model.conditioning import Conditioner
from stages.core.runtime.seeding import generator

from .data import piece_index


@dataclass
class StepDraws:
    """The draws of one global batch (``latent_noise``: one per distinct image; the rest: one per row)."""

    latent_noise: torch.Tensor | None  # (D, C, h, w); None: nothing to sample (a target's tokens, RAE)
    t: torch.Tensor  # (K * D,)
    noise: torch.Tensor  # (K * D, C, h, w)
    drop: torch.Tensor | None  # (K * D,) bool: the row's condition is replaced by the null one; None: no dropout
    multiplicity: int
    cls_noise: torch.Tensor | None = None  # (K * D, dim): REG's path noise of each row's class token

    @property
    def distinct(self) -> int:
        return self.t.shape[0] // self.multiplicity

    def piece(self, rank: int, micro: int, world_size: int, grad_accum: int) -> StepDraws:
        """The draws of micro-batch ``micro`` of rank ``rank``: piece ``index = piece_index(...)`` of the global
        batch, its images [index * d, (index + 1) * d), d = D / (world_size * grad_accum), and their rows in the
        order ``tile`` gives them (copy-major)."""
        index, d = piece_index(rank, micro, world_size), self.distinct // (world_size * grad_accum)
        images = torch.arange(index * d, (index + 1) * d, device=self.t.device)
        rows = (torch.arange(self.multiplicity, device=self.t.device)[:, None] * self.distinct + images).reshape(-1)
        return StepDraws(None if self.latent_noise is None else self.latent_noise[images], self.t[rows],
                         self.noise[rows], None if self.drop is None else self.drop[rows], self.multiplicity,
                         None if self.cls_noise is None else self.cls_noise[rows])


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of step ``step``: a pure function of (seed, step), the same on every process."""
    return generator(seed, step, device=device)


def draw_step(seed: int, step: int, distinct: int, multiplicity: int, latent: dict, time_sampling: str,
              conditioner: Conditioner, device: torch.device, cls_dim: int | None = None, posterior: bool = True,
              time_shift: float | None = None) -> StepDraws:
    """Every random draw of step ``step``'s global batch of ``distinct`` images x ``multiplicity`` copies;
    ``latent``: the diffused latent's shape (``channels``, ``size``); ``cls_dim``: with REG, the class token's
    width, whose path noise per row is drawn last. ``posterior`` False (a target's tokens, RAE): no posterior
    noise is drawn; ``time_shift``: t drawn as RAE draws it (``time_shift.sample_train_t``) with that shift."""
    gen = step_generator(seed, step, device)
    shape = (latent["channels"], latent["size"], latent["size"])
    rows = distinct * multiplicity
    latent_noise = torch.randn((distinct, *shape), generator=gen, device=device) if posterior else None
    if time_shift is None:
        t = sample_t(rows, time_sampling, gen, device)
    else:
        t = sample_train_t(rows, time_shift, gen, device, dist=time_sampling)
    noise = torch.randn((rows, *shape), generator=gen, device=device)
    drop = conditioner.drops(rows, gen, device)
    cls_noise = torch.randn((rows, cls_dim), generator=gen, device=device) if cls_dim else None
    return StepDraws(latent_noise, t, noise, drop, multiplicity, cls_noise)
