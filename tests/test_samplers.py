"""Tests for the stage-three samplers and classifier-free guidance.

The samplers are checked against an analytic case: data x0 ~ N(μ, σ²) per coordinate. On the
linear path x_t = (1 - t)·x0 + t·ε, x_t ~ N((1 - t)·μ, S_t) with S_t = (1 - t)²σ² + t², and the
optimal velocity v*(x, t) = E[ε - x0 | x_t = x] follows from Gaussian conditioning:
E[ε | x] = t/S_t·(x - (1 - t)μ), E[x0 | x] = μ + (1 - t)σ²/S_t·(x - (1 - t)μ), so
v* = (t - (1 - t)σ²)/S_t·(x - (1 - t)μ) - μ. Its ODE flow is x_t = (1 - t)μ + sqrt(S_t)·ε, so the
exact sample for noise ε is x0 = μ + σ·ε.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from stages.core.diffusion.samplers import (
    Conditioning,
    concat_conditioning,
    euler_maruyama_sde,
    euler_ode,
    guided,
    heun_ode,
    sample,
    score_from_velocity,
)

MU, SIGMA = 1.5, 0.5


def _col(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def marginal(t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of x_t under the Gaussian data model, broadcast against ``x``."""
    a = 1 - _col(t, x)
    return a * MU, a**2 * SIGMA**2 + _col(t, x) ** 2


def exact_velocity(x: Tensor, t: Tensor) -> Tensor:
    mean, var = marginal(t, x)
    tc = _col(t, x)
    return (tc - (1 - tc) * SIGMA**2) / var * (x - mean) - MU


def make_noise(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class CountingVelocity:
    """Wraps a velocity function and records the times it was called at."""

    def __init__(self, fn=exact_velocity) -> None:
        self.fn = fn
        self.times: list[float] = []

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        assert t.shape == (x.shape[0],)
        self.times.append(t[0].item())
        return self.fn(x, t)


# ---------------------------------------------------------------------------------------------
# Score conversion
# ---------------------------------------------------------------------------------------------


def test_score_from_exact_velocity_matches_the_gaussian_score():
    x = make_noise(8, 16) * 2
    t = torch.linspace(0.05, 1.0, 8, dtype=torch.float64)
    mean, var = marginal(t, x)
    expected = -(x - mean) / var
    torch.testing.assert_close(score_from_velocity(exact_velocity(x, t), x, t), expected)


# ---------------------------------------------------------------------------------------------
# ODE samplers
# ---------------------------------------------------------------------------------------------


def _ode_error(sampler, steps: int) -> float:
    noise = make_noise(64, 64)
    return (sampler(exact_velocity, noise, steps) - (MU + SIGMA * noise)).abs().max().item()


def test_euler_is_first_order():
    ratios = [_ode_error(euler_ode, n) / _ode_error(euler_ode, 2 * n) for n in (25, 50)]
    assert all(1.8 < r < 2.2 for r in ratios), ratios


def test_heun_is_second_order_and_accurate_at_50_steps():
    ratios = [_ode_error(heun_ode, n) / _ode_error(heun_ode, 2 * n) for n in (25, 50)]
    assert all(3.6 < r < 4.4 for r in ratios), ratios
    assert _ode_error(heun_ode, 50) < 2e-3


def test_ode_grids_and_call_counts():
    euler, heun = CountingVelocity(), CountingVelocity()
    euler_ode(euler, make_noise(2, 3), steps=4)
    heun_ode(heun, make_noise(2, 3), steps=4)
    assert euler.times == [1.0, 0.75, 0.5, 0.25]
    # Heun corrects at every interior grid point; the last interval (0.25 → 0) is a plain Euler step.
    assert heun.times == [1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25]


def test_integration_state_is_at_least_float32():
    out = euler_ode(lambda x, t: torch.ones_like(x), torch.zeros(2, 3, dtype=torch.bfloat16), 3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((2, 3), -1.0))


# ---------------------------------------------------------------------------------------------
# SDE sampler
# ---------------------------------------------------------------------------------------------


def test_sde_reproduces_the_data_distribution():
    x = euler_maruyama_sde(exact_velocity, make_noise(16384), generator=torch.Generator().manual_seed(1))
    # Standard errors: mean 0.004, std 0.003; the 0.04 cut-off adds a small bias to the std.
    assert abs(x.mean().item() - MU) < 0.015
    assert abs(x.std().item() - SIGMA) < 0.02


def test_sde_two_steps_follow_the_official_update():
    def linear_velocity(x: Tensor, t: Tensor | None) -> Tensor:
        return 0.3 * x + 0.1

    noise = make_noise(4, 5)
    out = euler_maruyama_sde(linear_velocity, noise, steps=2, generator=torch.Generator().manual_seed(7))

    z = torch.randn(4, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x, expected = noise, None
    for t, dt, noisy in ((1.0, -0.96, True), (0.04, -0.04, False)):
        v = linear_velocity(x, None)
        drift = v - 0.5 * (2 * t) * (-(x + (1 - t) * v) / t)
        expected = x + drift * dt + (math.sqrt(2 * t * abs(dt)) * z if noisy else 0)
        x = expected
    torch.testing.assert_close(out, expected)


def test_sde_is_reproducible_from_the_generator():
    def run(seed: int) -> Tensor:
        return euler_maruyama_sde(exact_velocity, make_noise(8, 8), 20, torch.Generator().manual_seed(seed))

    torch.testing.assert_close(run(3), run(3), rtol=0, atol=0)
    assert not torch.equal(run(3), run(4))


def test_sde_with_one_generator_per_sample_is_independent_of_the_batch():
    noise = make_noise(3, 8, seed=4)
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]  # noqa: E731
    batched = euler_maruyama_sde(exact_velocity, noise, steps=6, generator=gens())
    for i in range(3):
        alone = euler_maruyama_sde(exact_velocity, noise[i : i + 1], steps=6, generator=[gens()[i]])
        torch.testing.assert_close(batched[i : i + 1], alone)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        euler_maruyama_sde(exact_velocity, noise, steps=6, generator=gens()[:2])


def test_sde_grid_and_deterministic_last_step():
    generator = torch.Generator().manual_seed(0)
    states: list[Tensor] = []

    def recording(x: Tensor, t: Tensor) -> Tensor:
        states.append(generator.get_state())
        return exact_velocity(x, t)

    counter = CountingVelocity(recording)
    euler_maruyama_sde(counter, make_noise(4, 4), steps=6, generator=generator)
    assert counter.times == pytest.approx([1.0, 0.808, 0.616, 0.424, 0.232, 0.04])
    # Noise is drawn after each stochastic step, so the generator moves between calls ...
    assert all(not torch.equal(a, b) for a, b in zip(states, states[1:], strict=False))
    # ... but not after the last call: the 0.04 → 0 step draws nothing.
    assert torch.equal(states[-1], generator.get_state())


# ---------------------------------------------------------------------------------------------
# Entry point and validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "calls"), [("euler", 50), ("heun", 99), ("sde", 250)])
def test_sample_uses_per_method_default_steps(method: str, calls: int):
    counter = CountingVelocity()
    sample(counter, make_noise(2, 2), method=method, generator=torch.Generator().manual_seed(0))
    assert len(counter.times) == calls


def test_sample_with_explicit_steps_matches_the_sampler():
    noise = make_noise(3, 3)
    torch.testing.assert_close(sample(exact_velocity, noise, "heun", steps=7), heun_ode(exact_velocity, noise, 7))


@pytest.mark.parametrize("sampler", [euler_ode, heun_ode, euler_maruyama_sde])
def test_non_positive_steps_are_rejected(sampler):
    with pytest.raises(ValueError, match="--steps"):
        sampler(exact_velocity, make_noise(2, 2), 0)


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="dpm"):
        sample(exact_velocity, make_noise(2, 2), method="dpm")


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------

NULL_LABEL = 10


class ToyModel:
    """v = x·(1 + y) + t: conditional and unconditional outputs differ; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Tensor, Tensor]] = []

    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        y = cond["y"]
        self.calls.append((t.clone(), y.clone()))
        return x * (1 + _col(y, x).to(x.dtype)) + _col(t, x)


def _labels() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    y = torch.tensor([0, 3, 5])
    return {"y": y}, {"y": torch.full_like(y, NULL_LABEL)}


def test_guidance_inside_interval_is_one_batched_call():
    model, (cond, null) = ToyModel(), _labels()
    fn = guided(model, cond, null, cfg=1.8, low=0.0, high=0.7)
    x, t = make_noise(3, 4), torch.full((3,), 0.5, dtype=torch.float64)

    out = fn(x, t)

    v_c, v_u = ToyModel()(x, t, cond), ToyModel()(x, t, null)
    torch.testing.assert_close(out, v_u + 1.8 * (v_c - v_u))
    assert len(model.calls) == 1
    assert model.calls[0][1].tolist() == [0, 3, 5, NULL_LABEL, NULL_LABEL, NULL_LABEL]


@pytest.mark.parametrize("t_value", [0.75, 1.0])
def test_outside_interval_only_the_conditional_branch_runs(t_value: float):
    model, (cond, null) = ToyModel(), _labels()
    fn = guided(model, cond, null, cfg=4.0, low=0.0, high=0.7)
    x, t = make_noise(3, 4), torch.full((3,), t_value, dtype=torch.float64)

    torch.testing.assert_close(fn(x, t), ToyModel()(x, t, cond))
    assert [y.tolist() for _, y in model.calls] == [[0, 3, 5]]


def test_cfg_one_never_evaluates_the_unconditional_branch():
    model, (cond, null) = ToyModel(), _labels()
    euler_ode(guided(model, cond, null, cfg=1.0), make_noise(3, 4), steps=5)
    assert len(model.calls) == 5
    assert all(NULL_LABEL not in y.tolist() for _, y in model.calls)


def test_guidance_interval_over_a_whole_sampling_run():
    model, (cond, null) = ToyModel(), _labels()
    euler_ode(guided(model, cond, null, cfg=2.0, low=0.3, high=0.6), make_noise(3, 4), steps=10)
    guided_times = [round(t[0].item(), 6) for t, y in model.calls if NULL_LABEL in y.tolist()]
    assert guided_times == [0.6, 0.5, 0.4, 0.3]
    assert all(len(y) == (6 if NULL_LABEL in y.tolist() else 3) for _, y in model.calls)


def test_mixed_times_guide_only_the_samples_inside_the_interval():
    model, (cond, null) = ToyModel(), _labels()
    fn = guided(model, cond, null, cfg=3.0, low=0.0, high=0.5)
    x, t = make_noise(3, 4), torch.tensor([0.2, 0.9, 0.4], dtype=torch.float64)

    out = fn(x, t)

    v_c, v_u = ToyModel()(x, t, cond), ToyModel()(x, t, null)
    expected = v_u + 3.0 * (v_c - v_u)
    expected[1] = v_c[1]
    torch.testing.assert_close(out, expected)


def test_invalid_guidance_interval_is_rejected():
    cond, null = _labels()
    with pytest.raises(ValueError, match="--guidance-low.*--guidance-high"):
        guided(ToyModel(), cond, null, cfg=1.5, low=0.8, high=0.2)


def test_text_conditionings_of_different_lengths_are_padded():
    cond = {"text": torch.ones(2, 3, 4), "text_mask": torch.ones(2, 3, dtype=torch.bool)}
    null = {"text": torch.full((2, 5, 4), 2.0), "text_mask": torch.ones(2, 5, dtype=torch.bool)}

    both = concat_conditioning(cond, null)

    assert both["text"].shape == (4, 5, 4) and both["text_mask"].shape == (4, 5)
    assert both["text_mask"][:2].tolist() == [[True] * 3 + [False] * 2] * 2
    assert both["text_mask"][2:].all()
    assert both["text"][:2, 3:].abs().sum() == 0
    torch.testing.assert_close(both["text"][2:], null["text"])


def test_single_null_conditioning_is_broadcast_to_the_batch():
    seen: list[Conditioning] = []

    def text_model(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        seen.append(cond)
        return x * _col(cond["text_mask"].sum(1), x).to(x.dtype)

    cond = {"text": torch.ones(3, 4, 2), "text_mask": torch.ones(3, 4, dtype=torch.bool)}
    null = {"text": torch.zeros(1, 1, 2), "text_mask": torch.zeros(1, 1, dtype=torch.bool)}
    fn = guided(text_model, cond, null, cfg=2.0)
    out = fn(torch.ones(3, 2), torch.full((3,), 0.5))

    assert seen[0]["text"].shape == (6, 4, 2)
    torch.testing.assert_close(out, torch.full((3, 2), 8.0))  # v_c = 4, v_u = 0


def test_mismatched_conditioning_keys_are_rejected():
    with pytest.raises(ValueError, match="keys"):
        concat_conditioning({"y": torch.zeros(2)}, {"text": torch.zeros(2)})
