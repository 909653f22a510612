"""Samplers for the linear (rectified-flow) path and classifier-free guidance.

The model is trained on x_t = (1 - t)·x0 + t·ε and predicts the velocity v = ε - x0, so t = 1 is pure
noise and t = 0 is data. Every sampler here starts from noise at t = 1 and integrates down to t = 0.
They know nothing about models: they call a :data:`VelocityFn` ``v = fn(x, t)`` with ``x`` of shape
(B, ...) and ``t`` a (B,) tensor. :func:`guided` builds such a function from a conditional model.

Integration runs in float32 (float64 if the noise is float64) whatever the noise dtype, and the result
has that dtype; mixed precision inside the model is the caller's business (e.g. ``torch.autocast``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]
"""``v = fn(x, t)``: velocity at state ``x`` (B, ...) and times ``t`` (B,)."""

Conditioning = Mapping[str, Tensor]
"""Opaque per-sample conditioning, batch first: ``{"y": labels}``, ``{"text": ..., "text_mask": ...}``."""

ConditionalModel = Callable[[Tensor, Tensor, Conditioning], Tensor]
"""``v = model(x, t, cond)``: a velocity model that takes its conditioning explicitly."""

ODE_STEPS = 50
SDE_STEPS = 250
SDE_LAST_T = 0.04  # the official REPA SDE grid stops its stochastic steps here; one deterministic step to 0


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _check_steps(steps: int) -> None:
    if steps <= 0:
        raise ValueError(f"--steps must be a positive number of sampling steps, got {steps}")


def _initial_state(noise: Tensor) -> Tensor:
    """The integration state: at least float32 so that many small updates do not round away."""
    return noise.to(torch.promote_types(noise.dtype, torch.float32))


def _times(x: Tensor, t: float) -> Tensor:
    """The (B,) time tensor handed to the velocity function."""
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    """Reshape a (B,) tensor so that it broadcasts against ``like`` (B, ...)."""
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def _intervals(times: list[float]) -> list[tuple[float, float]]:
    return list(zip(times[:-1], times[1:], strict=True))


def _ode_times(steps: int) -> list[float]:
    """Uniform grid t_i = 1 - i/steps; the last entry is exactly 0."""
    return [1.0 - i / steps for i in range(steps + 1)]


def score_from_velocity(v: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
    """Score ∇ log p_t(x) of the linear path, given the velocity prediction ``v`` at ``(x, t)``.

    Derivation: conditioning x_t = (1 - t)·x0 + t·ε on itself gives x_t = (1 - t)·E[x0 | x_t] +
    t·E[ε | x_t], and the optimal velocity is v = E[ε | x_t] - E[x0 | x_t]. Eliminating E[x0 | x_t]
    gives E[ε | x_t] = x_t + (1 - t)·v. For Gaussian noise of scale t, Tweedie's formula gives
    ∇ log p_t(x_t) = -E[ε | x_t] / t, hence s(x, t) = -(x + (1 - t)·v) / t. Undefined at t = 0,
    which the SDE grid never evaluates.
    """
    if isinstance(t, Tensor):
        t = _per_sample(t, x)
    return -(x + (1 - t) * v) / t


# ----------------------------------------------------------------------------------------------
# Deterministic samplers (probability-flow ODE dx/dt = v)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def euler_ode(fn: VelocityFn, noise: Tensor, steps: int = ODE_STEPS) -> Tensor:
    """First-order Euler integration of dx/dt = v from t = 1 to 0 on a uniform grid (``steps`` calls)."""
    _check_steps(steps)
    x = _initial_state(noise)
    for t_cur, t_next in _intervals(_ode_times(steps)):
        x = x + (t_next - t_cur) * fn(x, _times(x, t_cur))
    return x


@torch.no_grad()
def heun_ode(fn: VelocityFn, noise: Tensor, steps: int = ODE_STEPS) -> Tensor:
    """Second-order Heun (predictor–corrector) integration from t = 1 to 0 on a uniform grid.

    The last interval, which ends at t = 0, is a plain Euler step (as in EDM and the official REPA
    sampler): the model is never evaluated at exactly t = 0, and a single first-order step leaves
    the global error O(h²). Cost: ``2·steps - 1`` velocity calls. When ``fn`` is guided (see
    :func:`guided`), the corrector's guidance is decided by the step's start time, as official REPA does.
    """
    _check_steps(steps)
    x = _initial_state(noise)
    corrector = getattr(fn, "at", None)
    for t_cur, t_next in _intervals(_ode_times(steps)):
        dt = t_next - t_cur
        v = fn(x, _times(x, t_cur))
        x_euler = x + dt * v
        if t_next == 0.0:
            x = x_euler
        else:
            v_next = (corrector(x_euler, _times(x, t_next), _times(x, t_cur)) if corrector
                      else fn(x_euler, _times(x, t_next)))
            x = x + dt * 0.5 * (v + v_next)
    return x


# ----------------------------------------------------------------------------------------------
# Stochastic sampler (reverse SDE), as the official REPA `euler_maruyama_sampler`
# ----------------------------------------------------------------------------------------------


def _gaussian(like: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    if len(generator) != like.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {like.shape[0]}")
    return torch.stack([torch.randn(like.shape[1:], generator=g, dtype=like.dtype, device=like.device)
                        for g in generator])


@torch.no_grad()
def euler_maruyama_sde(
    fn: VelocityFn,
    noise: Tensor,
    steps: int = SDE_STEPS,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> Tensor:
    """Euler–Maruyama integration of the reverse SDE from t = 1 to 0 (``steps`` velocity calls).

    Time grid: ``linspace(1, 0.04, steps)`` followed by 0. Diffusion coefficient w(t) = 2·t; the
    drift is d = v - ½·w(t)·s(x, t) with the score from :func:`score_from_velocity`. Every step
    but the last adds sqrt(w(t))·sqrt(|dt|)·z, z ~ N(0, I) drawn from ``generator`` (which must live
    on the noise's device); the last step (0.04 → 0) is deterministic and draws nothing. A sequence of
    generators, one per sample, draws row b from generator b, so a sample's trajectory does not depend
    on which other samples share its batch.
    """
    _check_steps(steps)
    times = torch.linspace(1.0, SDE_LAST_T, steps, dtype=torch.float64).tolist() + [0.0]
    x = _initial_state(noise)
    for t_cur, t_next in _intervals(times):
        dt = t_next - t_cur
        v = fn(x, _times(x, t_cur))
        w = 2.0 * t_cur
        x_mean = x + dt * (v - 0.5 * w * score_from_velocity(v, x, t_cur))
        if t_next == 0.0:
            x = x_mean
        else:
            x = x_mean + math.sqrt(w * abs(dt)) * _gaussian(x, generator)
    return x


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance with a guidance interval
# ----------------------------------------------------------------------------------------------


def _pad_to(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Zero-pad (``False`` for masks) every non-batch dimension of ``t`` up to ``shape``."""
    if tuple(t.shape[1:]) == shape:
        return t
    out = t.new_zeros((t.shape[0], *shape))
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def concat_conditioning(first: Conditioning, second: Conditioning) -> dict[str, Tensor]:
    """Concatenate two conditionings along the batch axis, key by key.

    Tensors whose non-batch shapes differ (text embeddings and masks padded to different lengths)
    are zero-padded to the larger size first, so padded positions read as mask ``False``.
    """
    if set(first) != set(second):
        raise ValueError(f"conditioning keys differ: {sorted(first)} vs {sorted(second)}")
    out = {}
    for key, a in first.items():
        b = second[key]
        if a.dim() != b.dim():
            raise ValueError(f"conditioning {key!r} has {a.dim()} dims vs {b.dim()} dims")
        shape = tuple(max(m, n) for m, n in zip(a.shape[1:], b.shape[1:], strict=True))
        out[key] = torch.cat([_pad_to(a, shape), _pad_to(b, shape)])
    return out


def _batch_size(cond: Conditioning) -> int:
    sizes = {v.shape[0] for v in cond.values()}
    if len(sizes) != 1:
        raise ValueError(f"conditioning tensors disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


class Guided:
    """A velocity function applying classifier-free guidance for ``low ≤ t ≤ high`` (see :func:`guided`)."""

    def __init__(self, model: ConditionalModel, cond: Conditioning, null: Conditioning, scale: float,
                 low: float, high: float):
        self.model, self.cond, self.scale, self.low, self.high = model, cond, scale, low, high
        self.both = None
        if scale != 1.0:
            batch = _batch_size(cond)
            null = {k: v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in null.items()}
            self.both = concat_conditioning(cond, null)  # built once, reused at every step

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self.at(x, t, t)

    def at(self, x: Tensor, t: Tensor, t_guide: Tensor) -> Tensor:
        """The velocity at (x, t), guided where ``t_guide`` lies in the interval."""
        if self.both is None:
            return self.model(x, t, self.cond)
        inside = (t_guide >= self.low) & (t_guide <= self.high)
        if not bool(inside.any()):
            return self.model(x, t, self.cond)
        v_cond, v_uncond = self.model(torch.cat([x, x]), torch.cat([t, t]), self.both).chunk(2)
        v = v_uncond + self.scale * (v_cond - v_uncond)
        # The samplers here share one t across the batch; a per-sample t may straddle the interval.
        return torch.where(_per_sample(inside, v), v, v_cond)


def guided(
    model: ConditionalModel,
    cond: Conditioning,
    null: Conditioning,
    cfg: float,
    low: float = 0.0,
    high: float = 1.0,
) -> Guided:
    """A velocity function applying classifier-free guidance for ``low ≤ t ≤ high`` (inclusive, as REPA).

    Inside the interval (and ``cfg != 1``) it returns v_u + cfg·(v_c - v_u) from one model call on
    the concatenated (cond, null) batch; elsewhere it calls the model on ``cond`` alone and never
    evaluates the unconditional branch. Tensors in ``null`` with batch size 1 are broadcast to the
    batch of ``cond`` (e.g. one empty-caption embedding). Guiding the velocity also guides the SDE
    drift exactly, since the drift is affine in v for a fixed x. ``.at(x, t, t_guide)`` decides the
    guidance by another time (Heun's corrector uses the step's start, as official REPA does).
    """
    if low > high:
        raise ValueError(f"--guidance-low ({low}) must not exceed --guidance-high ({high})")
    return Guided(model, cond, null, cfg, low, high)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": euler_ode,
    "heun": heun_ode,
    "sde": euler_maruyama_sde,
}
DEFAULT_STEPS = {"euler": ODE_STEPS, "heun": ODE_STEPS, "sde": SDE_STEPS}
STOCHASTIC = {"sde"}


def sample(
    fn: VelocityFn,
    noise: Tensor,
    method: str = "euler",
    steps: int | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> Tensor:
    """Integrate ``fn`` from ``noise`` (t = 1) to data (t = 0) with the named method.

    ``steps`` defaults per method (euler/heun 50, sde 250). ``generator`` seeds the stochastic
    sampler; the deterministic ones draw no random numbers and ignore it.
    """
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {sorted(SAMPLERS)}")
    steps = DEFAULT_STEPS[method] if steps is None else steps
    if method in STOCHASTIC:
        return SAMPLERS[method](fn, noise, steps, generator=generator)
    return SAMPLERS[method](fn, noise, steps)
