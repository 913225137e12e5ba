"""Priors and per-weight distributions: densities, sampling, and every KL against Monte Carlo."""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch
from torch.distributions import kl_divergence

import pyro_sparse as ps
from pyro_sparse.distributions import MaskedNormal, SpikeAndSlabNormal

NUM_MC = 200_000


def monte_carlo_kl(q: torch.distributions.Distribution, log_p) -> tuple[torch.Tensor, torch.Tensor]:
    """E_q[log q − log p] and its standard error, elementwise."""
    w = q.sample((NUM_MC,))
    terms = q.log_prob(w) - log_p(w)
    return terms.mean(0), terms.std(0) / math.sqrt(NUM_MC)


def test_gaussian_kl_matches_monte_carlo():
    prior = ps.priors.Gaussian(0.7)
    loc = torch.tensor([0.0, 0.5, -1.2, 2.0], dtype=torch.float64)
    scale = torch.tensor([0.1, 0.7, 0.3, 1.5], dtype=torch.float64)
    exact = prior.kl(loc, scale)
    estimate, stderr = monte_carlo_kl(torch.distributions.Normal(loc, scale), prior.log_prob)
    assert torch.all((exact - estimate).abs() < 5 * stderr + 1e-3)
    assert prior.total_kl(loc, scale).item() == pytest.approx(exact.sum().item(), rel=1e-5)


@pytest.mark.parametrize(
    "loc, scale, tight",
    [
        (1.5, 0.2, True),  # far from zero: the slab dominates, the bound is exact
        (0.0, 0.002, True),  # inside the spike: the spike dominates
        (0.05, 0.05, False),  # straddles both: only an upper bound
        (2.0, 0.3, True),
        (0.3, 0.5, False),  # much of q lies where the spike's density is large
    ],
)
def test_spike_and_slab_kl_bound_against_monte_carlo(loc, scale, tight):
    prior = ps.priors.SpikeAndSlab(slab_scale=1.0, spike_scale=0.01, inclusion=0.3)
    loc_t = torch.tensor([loc], dtype=torch.float64)
    scale_t = torch.tensor([scale], dtype=torch.float64)
    bound = prior.kl(loc_t, scale_t)
    estimate, stderr = monte_carlo_kl(torch.distributions.Normal(loc_t, scale_t), prior.log_prob)
    assert bound.item() >= estimate.item() - 5 * stderr.item()
    if tight:
        assert abs(bound.item() - estimate.item()) < 0.02 + 5 * stderr.item()


def test_spike_and_slab_log_prob_is_the_mixture_density():
    d = SpikeAndSlabNormal(torch.tensor(2.0), torch.tensor(0.05), torch.tensor(0.2))
    w = torch.linspace(-3, 3, 101, dtype=torch.float64)
    slab = torch.distributions.Normal(0.0, 2.0).log_prob(w).exp()
    spike = torch.distributions.Normal(0.0, 0.05).log_prob(w).exp()
    expected = torch.log(0.2 * slab + 0.8 * spike)
    assert torch.allclose(d.log_prob(w.float()).double(), expected, atol=1e-4)
    # far in the tails the mixture stays finite (logsumexp, not log of a sum of exps)
    assert torch.isfinite(d.log_prob(torch.tensor([1e3, -1e3]))).all()


def test_spike_and_slab_sampling_and_inclusion_probability():
    d = SpikeAndSlabNormal(1.0, 0.01, 0.25).expand((400_000,))
    w = d.sample()
    assert abs(w.var().item() - d.variance[0].item()) < 0.02
    assert abs((w.abs() > 0.1).float().mean().item() - 0.25 * 0.92) < 0.01  # P(|N(0,1)| > 0.1) ≈ 0.92
    gamma = SpikeAndSlabNormal(1.0, 0.01, 0.25).inclusion_probability(torch.tensor([0.0, 0.02, 0.5, 2.0]))
    assert gamma[0] < 0.05 and gamma[2] > 0.99 and gamma[3] > 0.999
    assert torch.all(gamma[1:] >= gamma[:-1])


def test_kl_is_registered_for_pyro_sites():
    """TraceMeanField_ELBO calls kl_divergence on Independent-wrapped site distributions."""
    loc, scale = torch.randn(3, 4) * 0.3, torch.rand(3, 4) * 0.2 + 0.05
    mask = torch.rand(3, 4) > 0.3
    for prior in (ps.priors.Gaussian(0.5), ps.priors.SpikeAndSlab(1.0, 0.02, 0.4)):
        p = prior.distribution(torch.Size([3, 4]))
        q = MaskedNormal(loc * mask, scale * mask, mask).to_event(2)
        expected = torch.where(mask, prior.kl(loc, scale), torch.zeros(())).sum()
        assert torch.allclose(kl_divergence(q, p), expected, rtol=1e-5)
        dense = dist.Normal(loc, scale).to_event(2)
        assert torch.allclose(kl_divergence(dense, p), prior.kl(loc, scale).sum(), rtol=1e-5)


def test_masked_normal_is_exactly_zero_where_masked():
    mask = torch.tensor([True, False, True, False])
    q = MaskedNormal(torch.tensor([1.0, 0.0, -1.0, 0.0]), torch.tensor([0.5, 0.0, 0.1, 0.0]), mask)
    draws = q.rsample((1000,))
    assert torch.all(draws[:, ~mask] == 0)
    assert torch.all(draws[:, mask] != 0)
    assert torch.all(q.log_prob(draws)[:, ~mask] == 0)
    expected = torch.distributions.Normal(1.0, 0.5).log_prob(draws[:, 0])
    assert torch.allclose(q.log_prob(draws)[:, 0], expected)
    assert torch.isfinite(q.entropy()).all() and q.entropy()[1] == 0


def test_total_kl_ignores_masked_weights_and_their_gradients():
    prior = ps.priors.SpikeAndSlab(1.0, 0.01, 0.5)
    loc = torch.randn(50, requires_grad=True)
    scale = (torch.rand(50) * 0.1 + 0.01).requires_grad_()
    mask = torch.arange(50) % 3 == 0
    total = prior.total_kl(loc * mask, scale * mask, mask)
    total.backward()
    assert torch.allclose(total, prior.kl(loc, scale)[mask].sum())
    assert torch.all(loc.grad[~mask] == 0) and torch.all(scale.grad[~mask] == 0)
    assert torch.isfinite(loc.grad).all() and torch.isfinite(scale.grad).all()


def test_hyperparameters_are_buffers_updated_in_place():
    prior = ps.priors.SpikeAndSlab(1.0, 0.01, 0.5)
    assert {name for name, _ in prior.named_buffers()} == {"slab_scale", "spike_scale", "inclusion"}
    d = prior.distribution(torch.Size([2]))
    prior.inclusion.fill_(0.9)  # an M-step writes in place
    assert prior.distribution(torch.Size([2])).base_dist.inclusion[0].item() == pytest.approx(0.9)
    assert d.base_dist.inclusion[0].item() == pytest.approx(0.9)  # views see the update too


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ps.priors.Gaussian(0.0), "scale must be"),
        (lambda: ps.priors.Gaussian(-1.0), "scale must be"),
        (lambda: ps.priors.Gaussian(float("nan")), "scale must be"),
        (lambda: ps.priors.SpikeAndSlab(slab_scale=0.0), "slab_scale must be"),
        (lambda: ps.priors.SpikeAndSlab(spike_scale=-0.1), "spike_scale must be"),
        (lambda: ps.priors.SpikeAndSlab(1.0, 2.0, 0.5), "spike_scale must be smaller than slab_scale"),
        (lambda: ps.priors.SpikeAndSlab(inclusion=0.0), r"inclusion must lie in \(0, 1\)"),
        (lambda: ps.priors.SpikeAndSlab(inclusion=1.0), r"inclusion must lie in \(0, 1\)"),
        (lambda: ps.priors.SpikeAndSlab(inclusion=1.5), r"inclusion must lie in \(0, 1\)"),
        (lambda: ps.priors.build("laplace"), "unknown prior 'laplace'"),
    ],
)
def test_bad_prior_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()
