"""RAE's dimension-dependent time shift, for training times and for the sampler's grid.

Same path as the rest of the project: x_t = (1 - t)·x0 + t·ε, the model predicts v = ε - x0, t = 1 is
noise. RAE (bytetriper/RAE ``src/stage2/train.py``, ``src/stage2/transport/``) shifts every time toward
the noise end by s = sqrt(dim / base), dim the latent's size (16·16·768 = 196 608 for DINOv2-B at 224 px)
and base 4096, so s = sqrt(48) ≈ 6.93:

    t' = s·t / (1 + (s - 1)·t).

Training draws t on [0, 1 - 1/1000] (RAE's ``check_interval`` for a velocity model on the linear path),
uniformly or from a logit-normal truncated to that interval, then shifts it. Sampling integrates the
probability-flow ODE with Euler steps on the shifted grid t_i = shift(1 - i·0.999/(n - 1)), i < n: n = 50
points, so 49 velocity calls, from t = 1 down to shift(0.001) ≈ 0.0069, where it stops (no step to 0).

Where this plugs in: :func:`sample_train_t` replaces ``objective.sample_t`` for an RAE run (the rest of the
objective is unchanged), and :func:`shifted_euler_ode` is the sampler for ``repa sample`` on such a run;
``fn`` is any :data:`stages.core.diffusion.samplers.VelocityFn`, e.g. from ``samplers.guided`` for CFG.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from stages.core.diffusion.samplers import VelocityFn

SHIFT_BASE = 4096  # RAE's time_dist_shift_base
TRAIN_T_MAX = 1 - 1 / 1000  # transport.py check_interval's t1 for a velocity model on the linear path
RAE_ODE_POINTS = 50  # the sampling configs' num_steps: points of the grid, one fewer Euler steps
T_DISTS = ("uniform", "logit-normal")


def shift_factor(dim: int, base: int = SHIFT_BASE) -> float:
    """s = sqrt(dim / base); dim is the number of latent elements per sample (C·h·w)."""
    if dim <= 0 or base <= 0:
        raise ValueError(f"time shift needs positive dim and base, got {dim} and {base}")
    return math.sqrt(dim / base)


def shift_time(t: Tensor, shift: float) -> Tensor:
    """t' = s·t / (1 + (s - 1)·t); s = 1 is the identity, s > 1 moves every t toward noise."""
    return shift * t / (1 + (shift - 1) * t)


def _truncated_logit_normal(u: Tensor, mu: float, sigma: float, high: float) -> Tensor:
    """sigmoid(Z), Z ~ N(mu, sigma²) truncated to logit(Z) ∈ (-inf, logit(high)], by the inverse CDF of ``u``."""
    mu_t = torch.tensor(mu, dtype=u.dtype, device=u.device)
    beta = (torch.logit(torch.tensor(high, dtype=u.dtype, device=u.device)) - mu_t) / sigma
    cdf_beta = 0.5 * (1 + torch.erf(beta / math.sqrt(2)))
    p = cdf_beta * u.clamp(0, 1)  # the lower bound 0 maps to logit -inf, whose CDF is 0
    z = mu_t + sigma * (torch.erfinv(2 * p - 1) * math.sqrt(2))
    return torch.sigmoid(z).clamp(0.0, high)


def sample_train_t(batch: int, shift: float, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu", dist: str = "uniform", mu: float = 0.0,
                   sigma: float = 1.0) -> Tensor:
    """(batch,) training times: drawn on [0, 0.999] as RAE draws them, then shifted.

    ``dist`` "uniform" is RAE's original ImageNet recipe; "logit-normal" (``mu``, ``sigma``) is what its
    current config names (``logit-normal_0_1``). The uniform draws come from ``generator``, on its device (the CPU
    without one).
    """
    if dist not in T_DISTS:
        raise ValueError(f"unknown time distribution {dist!r}; choose one of {T_DISTS}")
    if dist == "logit-normal" and sigma <= 0:
        raise ValueError(f"logit-normal time distribution needs sigma > 0, got {sigma}")
    u = torch.rand(batch, generator=generator, device=generator.device if generator is not None else "cpu")
    t = u * TRAIN_T_MAX if dist == "uniform" else _truncated_logit_normal(u, mu, sigma, TRAIN_T_MAX)
    return shift_time(t.to(device), shift)


def ode_times(shift: float, num_points: int = RAE_ODE_POINTS) -> Tensor:
    """The sampler's float32 grid: shift(1 - linspace(0, 0.999, num_points)), from 1 down to shift(0.001)."""
    if num_points < 2:
        raise ValueError(f"the ODE grid needs at least 2 points, got {num_points}")
    return shift_time(1 - torch.linspace(0, TRAIN_T_MAX, num_points), shift)


def euler_step(fn: VelocityFn, x: Tensor, t_cur: Tensor, t_next: Tensor) -> Tensor:
    """One Euler step of dx/dt = v from ``t_cur`` to ``t_next`` (0-d tensors of the grid)."""
    t = torch.full((x.shape[0],), float(t_cur), dtype=x.dtype, device=x.device)
    return x + (t_next - t_cur).to(x.device) * fn(x, t)


@torch.no_grad()
def shifted_euler_ode(fn: VelocityFn, noise: Tensor, shift: float, num_points: int = RAE_ODE_POINTS) -> Tensor:
    """The state at the grid's last point after ``num_points - 1`` Euler steps from ``noise`` at t = 1.

    Integrates in float32 (float64 for float64 noise) and returns that dtype.
    """
    x = noise.to(torch.promote_types(noise.dtype, torch.float32))
    times = ode_times(shift, num_points)
    for i in range(num_points - 1):
        x = euler_step(fn, x, times[i], times[i + 1])
    return x
