"""EM-SGHMC's pooled E/M-step: shared hyperparameters from the chains' summed statistics, frozen after
burn-in, per-chain implied values as diagnostics (checked against an independent computation and read
by ArviZ), and σ₀ per layer."""

from __future__ import annotations

import math

import arviz as az
import numpy as np
import pytest
import torch

import pyro_sparse as ps
from pyro_sparse.priors import em_statistics, map_hyperparameters, pool_statistics

pytestmark = pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto")


def test_pooled_statistics_give_the_map_of_all_chains_together():
    gen = torch.Generator().manual_seed(0)
    chains = [(torch.rand(50, generator=gen, dtype=torch.float64), torch.randn(50, generator=gen, dtype=torch.float64))
              for _ in range(3)]
    groups = torch.tensor([0] * 20 + [1] * 30)
    pooled = pool_statistics([em_statistics(rho, w, groups, 2) for rho, w in chains])
    spike = torch.tensor([0.01, 0.02], dtype=torch.float64)
    new = map_hyperparameters(pooled, spike, beta_prior=(2.0, 3.0), slab_prior=(1.5, 0.5))
    assert torch.equal(new["spike_scale"], spike)  # no spike_prior: σ₀ fixed
    rho, w = torch.cat([c[0] for c in chains]), torch.cat([c[1] for c in chains])  # all chains' weights as one
    assert float(new["inclusion"]) == pytest.approx((rho.sum().item() + 1) / (150 + 3))
    assert float(new["slab_scale"]) == pytest.approx(math.sqrt(((rho * w**2).sum().item() + 1.0) /
                                                               (rho.sum().item() + 3 + 2)))
    learned = map_hyperparameters(pooled, spike, spike_prior=(1.0, 0.001))["spike_scale"]  # σ₀ per layer
    layer = torch.cat([groups] * 3)
    for g in (0, 1):
        excluded, square = (1 - rho)[layer == g], (w**2)[layer == g]
        expected = math.sqrt(((excluded * square).sum().item() + 0.002) / (excluded.sum().item() + 4))
        assert float(learned[g]) == pytest.approx(expected)


@pytest.fixture(scope="module")
def run(digits):
    torch.manual_seed(0)
    data = digits.subsample(train=400, test=10)
    model = ps.BayesianNetwork(ps.nets.mlp(64, (16,), 10), prior=ps.priors.SpikeAndSlab(1.0, 0.01, 0.5),
                               dataset_size=400)
    initial = {name: model.initial_value(name).detach().clone() for name in model.sites}
    result = ps.em_sghmc(model, data.train, target_sparsity=0.7, chains=3, samples=6, epochs=8, batch_size=50,
                         seed=0)
    return model, initial, result


def test_chains_share_the_hyperparameters_which_freeze_after_burn_in(run):
    _, _, result = run
    traces = result.traces
    burn_steps = 4 * 8  # 4 burn-in epochs of 8 steps
    for name in ("inclusion", "slab_scale", "spike_scale"):
        assert torch.equal(traces[name][0], traces[name][1]) and torch.equal(traces[name][0], traces[name][2]), name
        after = traces[name][0][traces["step"][0] > burn_steps]
        assert len(after) > 0 and torch.all(after == after[0]), name  # settled: one posterior is sampled
    before = traces["inclusion"][0][traces["step"][0] <= burn_steps]
    assert before[0] != before[-1]  # it did adapt in burn-in
    assert not torch.equal(traces["implied_inclusion"][0], traces["implied_inclusion"][1])  # chains differ


def test_each_draw_records_hyperparameters_from_their_conditional_posterior(run):
    """posterior.hyperparameters[c, d] is a draw of π, σ₁ from p(π, σ₁ | w) given chain c's draw d
    (z ~ Bernoulli(γ(w)), π ~ Beta(1 + Σz, 1 + p − Σz), σ₁² ~ InvGamma(1 + Σz/2, 1 + Σzw²/2)):
    standardised against moments computed here from the draws, the values look like N(0, 1) draws."""
    model, _, result = run
    posterior = result.posterior
    pi, slab = float(model.prior.inclusion), float(model.prior.slab_scale)  # the shared values at the end
    assert pi == pytest.approx(float(result.traces["inclusion"][0, -1]))
    sites = list(model.sites)
    spike = torch.cat([torch.full((model.sites[name].numel,), result.spike_scale[name]) for name in sites]).double()
    residuals = {"inclusion": [], "slab_scale": []}
    for c in range(3):
        for d in range(6):
            w = torch.cat([posterior.samples[name][c * 6 + d].reshape(-1) for name in sites]).double()
            slab_density = pi * torch.distributions.Normal(0.0, slab).log_prob(w).exp()
            spike_density = (1 - pi) * torch.distributions.Normal(0.0, spike).log_prob(w).exp()
            gamma = torch.where(w == 0, 0.0, slab_density / (slab_density + spike_density))  # pruned: spike
            included, p = float(gamma.sum()), len(w)
            mean_pi = (1 + included) / (2 + p)
            sd_pi = math.sqrt(mean_pi * (1 - mean_pi) / (3 + p) + float((gamma * (1 - gamma)).sum()) / p**2)
            residuals["inclusion"].append((float(posterior.hyperparameters["inclusion"][c, d]) - mean_pi) / sd_pi)
            shape, rate = 1 + included / 2, 1 + float((gamma * w**2).sum()) / 2
            variance_mean, variance_sd = rate / (shape - 1), rate / ((shape - 1) * math.sqrt(shape - 2))
            draw = float(posterior.hyperparameters["slab_scale"][c, d]) ** 2
            residuals["slab_scale"].append((draw - variance_mean) / variance_sd)
    for name, values in residuals.items():
        values = torch.tensor(values)
        assert values.abs().max() < 4.5 and abs(float(values.mean())) < 1.2 and 0.2 < float(values.std()) < 2, name
    summary = az.summary(posterior.to_arviz(max_weights=0), kind="diagnostics")
    assert {"inclusion", "slab_scale"} <= set(summary.index)
    assert np.isfinite(summary.loc[["inclusion", "slab_scale"], "r_hat"]).all()
    for name in ("implied_inclusion", "implied_slab_scale", "conditional_inclusion", "conditional_slab_scale"):
        assert result.traces[name].shape == result.traces["inclusion"].shape


def test_spike_scale_is_set_per_layer_from_the_initial_weights(run, digits):
    model, initial, result = run
    assert set(result.spike_scale) == set(model.sites)
    for name, value in initial.items():
        assert result.spike_scale[name] == pytest.approx(0.02 * float(value.std()), rel=1e-5)
    assert result.spike_scale["1.weight"] < result.spike_scale["3.weight"]  # 64 inputs against 16
    data = digits.subsample(train=100, test=10).train
    for spike_scale, expected in ((0.005, 0.005), (None, 0.01)):
        model = ps.BayesianNetwork(ps.nets.mlp(64, (8,), 10), prior=ps.priors.SpikeAndSlab(1.0, 0.01, 0.5),
                                   dataset_size=100)
        fixed = ps.em_sghmc(model, data, chains=1, samples=1, epochs=2, batch_size=50, spike_scale=spike_scale,
                            seed=0)
        assert all(value == pytest.approx(expected) for value in fixed.spike_scale.values())
    with pytest.raises(ValueError, match="spike_scale must be 'auto', 'per-layer'"):
        ps.em_sghmc(model, data, chains=1, samples=1, epochs=2, spike_scale="wide")
