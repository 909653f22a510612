"""The training objective: rectified flow on cached VAE moments plus the REPA alignment loss.

Rectified flow (the SiT "linear" path): x_t = (1 - t) x + t eps, the model predicts v = eps - x, and
the denoising loss is the mean over (C, H, W) of (v_hat - v)^2. Latents are drawn from the cached
posterior every step, z = mean + std * n, then normalised with the VAE's shift and scaling factors (or its
per-channel mean and standard deviation where its config holds them).

REPA: the projector's tokens are compared with the frozen encoder's patch tokens by cosine
similarity; the loss is the mean over tokens of -cos. Total loss = denoise + lambda * REPA. With several
targets (one projector each) REPA is the mean of their losses, as official REPA's loss.py averages over its
encoders; a weight per target then replaces lambda: denoise + mean_k(lambda_k * REPA_k).

REPA's successors (``stages.core.diffusion.family``) add to this: REG's class-token velocity loss, the dispersive loss,
iREPA's normalised targets and HASTE's early stop of the alignment term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from stages.core.diffusion.family import FamilySettings, alignment_inputs, dispersive_loss

NUM_T_BINS = 10


def latent_normalisation(latent: dict) -> tuple[float | Tensor, float | Tensor]:
    """(scale, shift) with normalised = (z - shift) * scale, from a manifest's ``latent`` record.

    The VAE's scalar ``scaling_factor``/``shift_factor``, or, where its config gave per-channel
    ``latents_mean``/``latents_std``, (1 / std, mean) as (1, C, 1, 1) float32 tensors: REPA-E's SiT
    normalises each channel by its dataset mean and standard deviation (a frozen BatchNorm).
    """
    if latent.get("latents_mean") is None:
        return latent["scaling_factor"], latent["shift_factor"]
    mean = torch.tensor(latent["latents_mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(latent["latents_std"], dtype=torch.float32).view(1, -1, 1, 1)
    return 1.0 / std, mean


def sample_latents(
    moments: Tensor,
    scaling_factor: float | Tensor,
    shift_factor: float | Tensor,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """moments (B, 2C, h, w) = [mean, std] -> normalised latent sample (B, C, h, w) in float32.

    The posterior noise is ``noise`` when given (validation's fixed draws), else drawn from ``generator``.
    The factors are scalars or per-channel (1, C, 1, 1) tensors (``latent_normalisation``).
    """
    mean, std = moments.float().chunk(2, dim=1)
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    if isinstance(scaling_factor, Tensor):
        scaling_factor = scaling_factor.to(mean.device)
    if isinstance(shift_factor, Tensor):
        shift_factor = shift_factor.to(mean.device)
    return (mean + std * noise - shift_factor) * scaling_factor


def sample_t(batch: int, mode: str, generator: torch.Generator, device: torch.device) -> Tensor:
    if mode == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    if mode == "logit-normal":
        return torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    raise ValueError(f"unknown time sampling {mode!r}; choose uniform or logit-normal")


def interpolate(x: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, v): the point on the linear path at time t and the velocity target."""
    tt = t.view(-1, *([1] * (x.dim() - 1)))
    return (1 - tt) * x + tt * noise, noise - x


def denoise_loss_per_sample(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over all but the batch axis of the squared error, in float32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def repa_loss_per_sample(projected: Tensor, target: Tensor) -> Tensor:
    """Mean over tokens of -cos(projected, target), per sample: (B, N, D) x (B, N, D) -> (B,).

    Computed in float32: the target usually comes from the cache in float16 and the projection in bf16.
    """
    cosine = (F.normalize(projected.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(dim=-1)
    return -cosine.mean(dim=-1)


@dataclass
class LossTerms:
    """Per-sample terms of one forward pass; ``repa`` is None for a model without a projector."""

    denoise: Tensor  # (B,)
    repa: Tensor | None  # (B,) -cos averaged over targets, or None
    per_target: Tensor | None = None  # (targets, B) -cos of each target
    align: float = 1.0  # 0: the REPA term is not minimised (HASTE, after its stop step)
    extra: Tensor | None = None  # scalar: the weighted terms of the REPA family (REG, dispersive), or None

    def total(self, repa_lambda: float, lambdas: list[float] | None = None) -> Tensor:
        """The scalar that is minimised: mean denoising loss + lambda * mean REPA loss, or with a weight
        per target, + the mean over targets of lambda_k * mean REPA loss of target k."""
        loss = self.denoise.mean()
        if self.repa is not None and lambdas is not None:
            per_target = self.per_target
            if per_target is None:
                raise ValueError("a REPA weight per target needs the per-target terms (per_target)")
            weights = torch.tensor(lambdas, device=per_target.device, dtype=per_target.dtype)
            loss = loss + self.align * (weights * per_target.mean(dim=1)).mean()
        elif self.repa is not None:
            loss = loss + self.align * repa_lambda * self.repa.mean()
        if self.extra is not None:
            loss = loss + self.extra
        return loss

    def cosine(self) -> Tensor:
        """Per-sample REPA cosine (zeros without REPA), detached, for logging."""
        return torch.zeros_like(self.denoise) if self.repa is None else -self.repa.detach()


def alignment_targets(batch: dict, names: list[str] | tuple[str, ...] = ("dino",)) -> list[Tensor]:
    """The frozen encoders' tokens of targets ``names`` (the order of the model's projectors) that the batch carries."""
    return [batch[name] for name in names if name in batch]


def loss_terms(forward, x: Tensor, noise: Tensor, t: Tensor, cond: dict, targets: list[Tensor],
               family: FamilySettings | None = None, cls: Tensor | None = None,
               cls_noise: Tensor | None = None) -> LossTerms:
    """Both losses for clean latents ``x``, path noise ``noise`` and times ``t``.

    ``forward(x_t, t, **cond) -> (velocity, [projected tokens per target])`` is the model; ``targets``
    the frozen encoders' tokens, one per projector. With several targets the REPA loss is their mean,
    as official REPA averages over its encoders.

    ``family`` adds REPA's successors: with a class-token weight (REG), the clean class token ``cls`` (B, D)
    is noised with ``cls_noise`` at the same ``t``, fed to the model, and the mean squared error of its
    velocity is added with that weight; with a dispersive weight, the dispersive loss of the hidden state
    the model returns; ``family.align`` False keeps the REPA term out of the total.
    """
    family = family or FamilySettings()
    x_t, v = interpolate(x, noise, t)
    extra_inputs: dict[str, Tensor] = {}
    cls_v: Tensor | None = None
    if family.class_token:
        if cls is None or cls_noise is None:
            raise ValueError("a class-token weight (REG) needs the clean class token and its noise")
        cls_t, cls_v = interpolate(cls.float(), cls_noise, t)
        extra_inputs["cls_token"] = cls_t
    out = forward(x_t, t, **cond, **extra_inputs)
    pred, projected = out[0], out[1]
    outputs = out[2] if len(out) > 2 else {}
    repa = per_target = None
    if projected:
        if len(projected) != len(targets):
            raise ValueError(f"{len(projected)} projectors but {len(targets)} alignment targets")
        per_target = torch.stack([repa_loss_per_sample(p, tgt) for p, tgt in zip(projected, targets, strict=True)])
        repa = per_target.mean(dim=0)
    extra = None
    if cls_v is not None:  # set exactly when family.class_token
        extra = family.class_token_weight * denoise_loss_per_sample(outputs["cls"], cls_v).mean()
    if family.dispersive_lambda > 0:
        term = family.dispersive_lambda * dispersive_loss(outputs["hidden"], family.dispersive_tau)
        extra = term if extra is None else extra + term
    return LossTerms(denoise_loss_per_sample(pred, v), repa, per_target, float(family.align), extra)


def batch_loss_terms(forward, batch: dict, x: Tensor, noise: Tensor, t: Tensor, cond: dict, names,
                     family: FamilySettings | None = None, generator: torch.Generator | None = None,
                     cls_noise: Tensor | None = None) -> LossTerms:
    """``loss_terms`` of a batch of cached features: the alignment targets ``names`` (in projector order),
    transformed as ``family`` says, and REG's class token, noised with ``cls_noise`` when given (validation's
    fixed draws), else with a draw from ``generator`` taken after every other draw of the step."""
    family = family or FamilySettings()
    targets, cls = alignment_inputs(batch, names, family)
    if cls is not None and cls_noise is None:
        cls_noise = torch.randn(cls.shape, generator=generator, device=cls.device)
    return loss_terms(forward, x, noise, t, cond, targets, family, cls, cls_noise)


def bin_by_t(values: Tensor, t: Tensor, bins: int = NUM_T_BINS) -> tuple[Tensor, Tensor]:
    """(sum per bin, count per bin) of per-sample values, bins of equal width over t in [0, 1]."""
    idx = (t.float() * bins).long().clamp_(0, bins - 1)
    sums = torch.zeros(bins, device=values.device, dtype=torch.float64).index_add_(0, idx, values.double())
    counts = torch.zeros(bins, device=values.device, dtype=torch.float64).index_add_(
        0, idx, torch.ones_like(values, dtype=torch.float64)
    )
    return sums, counts
