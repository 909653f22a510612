"""RAE's time shift and sampler, against hand transcriptions of bytetriper/RAE@a4d18c4 (cited per function)
and of the Euler solver of rtqichen/torchdiffeq@03c6e63 that RAE's sampler calls."""

from __future__ import annotations

import math

import pytest
import torch

from stages.core.diffusion.time_shift import (
    euler_step,
    ode_times,
    sample_train_t,
    shift_factor,
    shifted_euler_ode,
)

# ---- transcriptions of bytetriper/RAE@a4d18c4db766419cbe7cb8c02cd9f7ceb0ec9041 ----------------------


def rae_shift(shift_dim, shift_base):
    """src/train.py:137-139 (and src/sample.py:36-39)."""
    return math.sqrt(shift_dim / shift_base)


def rae_check_interval():
    """src/stage2/transport/transport.py:136-152 for a velocity model on the linear path, ODE/training."""
    return 0, 1 - 1 / 1000


def rae_truncated_logitnormal(shape, mu, sigma, low=0.0, high=1.0):
    """src/stage2/transport/transport.py:39-83."""
    mu, sigma, low, high = (torch.as_tensor(v) for v in (mu, sigma, low, high))
    z_low, z_high = torch.logit(low), torch.logit(high)
    base = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(sigma))
    alpha, beta = (z_low - mu) / sigma, (z_high - mu) / sigma
    cdf_alpha, cdf_beta = base.cdf(alpha), base.cdf(beta)
    out_shape = torch.broadcast_shapes(shape, mu.shape, sigma.shape, low.shape, high.shape)
    u = torch.rand(out_shape, device=mu.device, dtype=mu.dtype)
    u = cdf_alpha + (cdf_beta - cdf_alpha) * u.clamp_(0, 1)
    return torch.sigmoid(mu + sigma * base.icdf(u)).clamp(low, high)


def rae_training_t(batch, time_dist_type, time_dist_shift):
    """src/stage2/transport/transport.py:155-182 (Transport.sample, the t part)."""
    dist_options = time_dist_type.split("_")
    t0, t1 = rae_check_interval()
    if dist_options[0] == "uniform":
        t = torch.rand((batch,)) * (t1 - t0) + t0
    else:
        t = rae_truncated_logitnormal((batch,), float(dist_options[1]), float(dist_options[2]), low=t0, high=t1)
    return time_dist_shift * t / (1 + (time_dist_shift - 1) * t)


def rae_ode_grid(num_steps, time_dist_shift):
    """src/stage2/transport/integrators.py:100-101 with t0, t1 from check_interval."""
    t0, t1 = rae_check_interval()
    t = 1 - torch.linspace(t0, t1, num_steps)
    return time_dist_shift * t / (1 + (time_dist_shift - 1) * t)


def torchdiffeq_euler(func, y0, t):
    """torchdiffeq odeint(method='euler') on a decreasing grid: _check_inputs negates t and the drift
    (torchdiffeq/_impl/misc.py, _ReverseFunc), then FixedGridODESolver.integrate (solvers.py) with the
    Euler step dy = dt·f(t0, y0); the returned solution holds the state at every grid point."""
    t = -t
    def f(s, y):
        return -func(-s, y)
    solution = [y0]
    y = y0
    for s0, s1 in zip(t[:-1], t[1:], strict=True):
        dt = s1 - s0
        y = y + dt * f(s0, y)
        solution.append(y)
    return torch.stack(solution)


def rae_ode_sample(x, model, num_steps, time_dist_shift):
    """src/stage2/transport/integrators.py:106-125 (ode.sample), velocity drift (transport.py:246-248)."""
    def _fn(t, x):
        t = torch.ones(x.size(0)) * t
        return model(x, t)
    return torchdiffeq_euler(_fn, x, rae_ode_grid(num_steps, time_dist_shift))


# ---- tests ------------------------------------------------------------------------------------------


def test_shift_factor_of_dinov2_b_latent():
    assert shift_factor(768 * 16 * 16) == rae_shift(196608, 4096)
    assert shift_factor(196608, 4096) == pytest.approx(math.sqrt(48))


@pytest.mark.parametrize("dist, rae_name", [("uniform", "uniform"), ("logit-normal", "logit-normal_0_1")])
def test_training_times_match_rae_on_the_same_draws(dist, rae_name):
    s = rae_shift(196608, 4096)
    torch.manual_seed(7)
    theirs = rae_training_t(4096, rae_name, s)
    ours = sample_train_t(4096, s, generator=torch.Generator().manual_seed(7), dist=dist)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert float(ours.max()) <= shift_factor(196608) * 0.999 / (1 + (shift_factor(196608) - 1) * 0.999) + 1e-6


def test_shift_moves_times_toward_noise():
    t = sample_train_t(10000, rae_shift(196608, 4096), generator=torch.Generator().manual_seed(0))
    unshifted = sample_train_t(10000, 1.0, generator=torch.Generator().manual_seed(0))
    assert bool((t >= unshifted).all()) and float(t.median()) > 0.8 > float(unshifted.median())


@pytest.mark.parametrize("num_points", [50, 7])
def test_grid_matches_rae(num_points):
    s = rae_shift(196608, 4096)
    ours = ode_times(s, num_points)
    theirs = rae_ode_grid(num_points, s)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert float(ours[0]) == 1.0
    # stops short of 0 (float32 1 - 0.999)
    assert float(ours[-1]) == pytest.approx(s * 0.001 / (1 + (s - 1) * 0.001), rel=1e-4)


def _velocity_model():
    """A fixed nonlinear velocity of (x, t), for identical draws in both samplers."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 6, generator=g) / 3
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.tanh(x @ w) * (1 + t[:, None]) - x * t[:, None]
    return model, seen


def test_sampler_matches_rae_ode_sample():
    s = rae_shift(196608, 4096)
    noise = torch.randn(5, 6, generator=torch.Generator().manual_seed(4))
    model, seen_ours = _velocity_model()
    ours = shifted_euler_ode(model, noise, s)
    theirs_model, seen_theirs = _velocity_model()
    theirs = rae_ode_sample(noise, theirs_model, 50, s)[-1]  # src/sample.py:102 keeps the last state
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert len(seen_ours) == len(seen_theirs) == 49
    for a, b in zip(seen_ours, seen_theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_one_step_is_an_euler_step_of_the_velocity():
    model, _ = _velocity_model()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(5))
    times = ode_times(rae_shift(196608, 4096))
    stepped = euler_step(model, x, times[3], times[4])
    expected = x + (times[4] - times[3]) * model(x, torch.full((5,), float(times[3])))
    torch.testing.assert_close(stepped, expected, rtol=0, atol=0)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="uniform"):
        sample_train_t(4, 2.0, dist="beta")
    with pytest.raises(ValueError, match="2 points"):
        ode_times(2.0, 1)
