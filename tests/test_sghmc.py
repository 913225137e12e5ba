"""SGHMC: the sampler against an exact conjugate posterior, pruning, schedules, state, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pyro_sparse as ps
from pyro_sparse.infer.sghmc import constant, cyclical_cosine, sghmc

N, D, NOISE, PRIOR = 200, 3, 0.5, 1.0


@pytest.fixture(scope="module")
def regression():
    """Bayesian linear regression with a known noise: its exact Gaussian posterior."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + NOISE * torch.randn(N, generator=gen)
    precision = x.T @ x / NOISE**2 + torch.eye(D) / PRIOR**2
    cov = torch.linalg.inv(precision)
    return x, y, cov @ x.T @ y / NOISE**2, cov.diag()


def _draws(sampler, state, batch, steps=6000, burn=1000, thin=2):
    draws = []
    for k in range(steps):
        state = sampler.step(state, batch)
        if k >= burn and k % thin == 0:
            draws.append(state.position.clone())
    return torch.stack(draws)


def _assert_matches(draws, mean, var):
    assert ((draws.mean(0) - mean).abs() / var.sqrt()).max() < 0.15
    ratio = draws.var(0) / var
    assert ratio.min() > 0.75 and ratio.max() < 1.3, ratio


def test_log_joint_function_samples_the_exact_posterior(regression):
    x, y, mean, var = regression

    def log_joint(params, batch):
        xb, yb = batch
        w = params["w"]
        return -(N / len(xb)) * 0.5 * ((yb - xb @ w) ** 2).sum() / NOISE**2 - 0.5 * (w**2).sum() / PRIOR**2

    sampler = sghmc(log_joint, step_size=0.02, friction=0.1, dataset_size=N, preconditioner=False, noise="gaussian")
    state = sampler.init({"w": torch.zeros(D)}, seed=1)
    _assert_matches(_draws(sampler, state, (x, y)), mean, var)


def test_bayesian_network_with_preconditioner_samples_the_exact_posterior(regression):
    x, y, mean, var = regression
    model = ps.BayesianNetwork(nn.Linear(D, 1, bias=False), prior=ps.priors.Gaussian(PRIOR),
                               likelihood=ps.likelihoods.Gaussian(NOISE), dataset_size=N)
    sampler = sghmc(model, step_size=2e-3, friction=0.1, burn_in=1000)  # RMSprop preconditioner, Rademacher noise
    state = sampler.init(seed=2)
    assert [name for name, _ in state.layout] == ["weight"]
    draws = _draws(sampler, state, (x, y))
    _assert_matches(draws, mean, var)
    frozen = state.preconditioner.clone()
    state = sampler.step(state, (x, y))  # the preconditioner is frozen after burn-in
    assert torch.equal(state.preconditioner, frozen) and not torch.all(frozen == frozen[0])


def test_pruned_coordinates_stay_exactly_zero(digits):
    model = ps.BayesianNetwork(ps.nets.mlp(64, (32,), 10), dataset_size=len(digits.train))
    sampler = sghmc(model, step_size=1e-3, burn_in=5)
    state = sampler.init(seed=0)
    x, y = digits.train.tensors
    keep = torch.rand(state.position.shape) > 0.5
    sampler.prune(state, keep)
    for k in range(10):
        state = sampler.step(state, (x[k * 64: (k + 1) * 64], y[k * 64: (k + 1) * 64]))
    assert torch.all(state.position[~keep] == 0) and torch.all(state.momentum[~keep] == 0)
    assert torch.all(state.position[keep] != 0)
    assert set(state.params) == {"1.weight", "3.weight", "net.1.bias", "net.3.bias"}
    assert state.params["1.weight"].shape == (32, 64)


def test_state_dict_resumes_exactly(digits):
    model = ps.BayesianNetwork(ps.nets.mlp(64, (16,), 10), dataset_size=len(digits.train))
    sampler = sghmc(model, step_size=cyclical_cosine(1e-3, 7), burn_in=4)
    x, y = digits.train.tensors[0][:64], digits.train.tensors[1][:64]
    state = sampler.init(seed=3)
    for _ in range(5):
        sampler.step(state, (x, y))
    saved = {key: value.clone() if isinstance(value, torch.Tensor) else value
             for key, value in state.state_dict().items()}
    for _ in range(5):
        sampler.step(state, (x, y))
    other = sampler.init(seed=99)
    other.load_state_dict(saved)
    for _ in range(5):
        sampler.step(other, (x, y))
    assert torch.equal(other.position, state.position) and other.step == state.step == 10


def test_schedules():
    schedule = cyclical_cosine(0.1, 10)
    assert schedule(0) == pytest.approx(0.1) and schedule(5) == pytest.approx(0.05) and schedule(10) == 0.1
    assert schedule(9) < 0.01
    assert constant(0.3)(1234) == 0.3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"step_size": 0.0}, "step_size must be a number > 0"),
        ({"step_size": -1e-3}, "step_size must be a number > 0"),
        ({"step_size": math.nan}, "step_size must be a number > 0"),
        ({"friction": 0.0}, "friction must be a number in"),
        ({"friction": 1.5}, "friction must be a number in"),
        ({"temperature": 0.0}, "temperature must be"),
        ({"burn_in": -1}, "burn_in must be"),
        ({"noise": "uniform"}, "noise must be"),
    ],
)
def test_bad_input_is_one_clear_error(kwargs, message):
    model = ps.BayesianNetwork(nn.Linear(3, 1), dataset_size=10)
    with pytest.raises(ValueError, match=message):
        sghmc(model, **{"step_size": 1e-3, **kwargs})


def test_bad_schedules():
    with pytest.raises(ValueError, match="step_size must be a number > 0"):
        cyclical_cosine(0.0, 10)
    with pytest.raises(ValueError, match="cycle_length must be a positive integer"):
        cyclical_cosine(0.1, 0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.0, -1e-3, "fast"])
def test_a_schedule_that_returns_a_bad_step_size_is_one_clear_error(bad):
    model = ps.BayesianNetwork(nn.Linear(3, 1), likelihood=ps.likelihoods.Gaussian(0.5), dataset_size=10)
    sampler = sghmc(model, step_size=lambda step: 1e-3 if step < 2 else bad, preconditioner=False)
    state = sampler.init(seed=0)
    batch = (torch.randn(10, 3), torch.randn(10))
    for _ in range(2):
        sampler.step(state, batch)
    with pytest.raises(ValueError, match=r"the step_size schedule returned .* at step 2; it must return numbers > 0"):
        sampler.step(state, batch)


@pytest.mark.parametrize("seed", [-1, 2**64, 0.5, True])
def test_init_refuses_a_seed_a_generator_cannot_take(seed):
    sampler = sghmc(ps.BayesianNetwork(nn.Linear(3, 1), dataset_size=10), step_size=1e-3)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        sampler.init(seed=seed)


def test_is_finite_flags_a_nan_position_without_a_sync():
    sampler = sghmc(ps.BayesianNetwork(nn.Linear(3, 1), dataset_size=10), step_size=1e-3)
    state = sampler.init(seed=0)
    assert state.is_finite().dim() == 0 and bool(state.is_finite())
    state.position[1] = math.nan
    assert not bool(state.is_finite())


def _quadratic(params, batch):
    """log p(w) = −Σ w² / 2: independent standard Gaussian coordinates."""
    return -0.5 * (params["w"] ** 2).sum()


def test_default_preconditioner_gives_the_documented_step():
    """The first step moves each coordinate by ε g / (|g| + λ) ≈ ε (preconditioned units), not 500 ε."""

    def linear(params, batch):
        return -(params["w"] * torch.tensor([2.0, -0.5, 0.1])).sum()

    sampler = sghmc(linear, step_size=1e-3, temperature=1e-12)  # the defaults: preconditioner on, burn_in 0
    state = sampler.init({"w": torch.zeros(3)}, seed=0)
    sampler.step(state, None)
    g = torch.tensor([2.0, -0.5, 0.1])
    expected = -1e-3 * g / (g.abs() + 1e-3)
    assert torch.allclose(state.position, expected, rtol=1e-3), state.position
    frozen = state.preconditioner.clone()
    sampler.step(state, None)
    assert torch.equal(state.preconditioner, frozen)  # burn_in = 0: V is the first step's g², then frozen


def test_default_noise_leaves_a_gaussian_target_gaussian():
    """A standard Gaussian target at a largish step (ε = 0.2, friction 0.1): the stationary law has
    variance ≈ 1 (discretisation bias about 5 %) and excess kurtosis 0 within Monte Carlo error
    (Rademacher noise gives −0.15)."""
    sampler = sghmc(_quadratic, step_size=0.2, preconditioner=False)
    state = sampler.init({"w": torch.zeros(4000)}, seed=0)
    draws = []
    for k in range(800):
        sampler.step(state, None)
        if k >= 200 and k % 2 == 0:
            draws.append(state.position.clone())
    x = torch.stack(draws).reshape(-1).double()
    variance = x.var()
    excess_kurtosis = ((x - x.mean()) ** 4).mean() / variance**2 - 3
    assert abs(float(variance) - 1.0) < 0.1, variance
    assert abs(float(excess_kurtosis)) < 0.05, excess_kurtosis


def test_step_size_cap_follows_a_cyclical_schedule_after_burn_in():
    """ε P λ ≤ 1/2 at every step, also when the cyclical schedule raises ε again after burn-in."""
    model = ps.BayesianNetwork(nn.Linear(3, 1, bias=False), prior=ps.priors.Gaussian(0.01),
                               likelihood=ps.likelihoods.Gaussian(1.0), dataset_size=1)
    sampler = sghmc(model, step_size=cyclical_cosine(0.5, 10), burn_in=8)  # burn-in ends where ε is small
    state = sampler.init(seed=0)
    batch = (torch.randn(4, 3), torch.randn(4))
    for _ in range(30):
        epsilon = sampler.epsilon_at(state.step)
        sampler.step(state, batch)
        assert float((epsilon * state.preconditioner * state.prior_precision).max()) <= 0.5 + 1e-6
    assert bool(state.is_finite())
