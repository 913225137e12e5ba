"""Variational inference done right: exact local reparameterization (W2), the KL estimators (M1),
pruned weights out of the model (M2), Adam's fresh start at regrown SSVI weights (M3), σ in the history.

Each quantity is checked against an independent computation: Pyro's own ELBOs, Monte Carlo, or the
definition of Adam's first step.
"""

from __future__ import annotations

import copy
import math

import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import nn
from torch.nn import functional as F

import pyro_sparse as ps
from pyro_sparse.infer.elbo import negative_elbo
from pyro_sparse.infer.svi import make_adam


def tiny_model(prior=None, dataset_size=40):
    return ps.BayesianNetwork(ps.nets.mlp(4, (6,), 3), prior=prior, dataset_size=dataset_size)


def perturbed_guide(model, cls=ps.MeanField, **kwargs):
    """A guide away from its initialisation (μ doubled, ρ spread), as after some training."""
    guide = cls(model, init_scale=0.3, **kwargs)
    with torch.no_grad():
        for _, site in guide.named_sites():
            site.loc.mul_(2.0)
            site.rho.add_(torch.randn_like(site.rho) * 0.5)
    return guide


def mean_and_se(values: list[float]) -> tuple[float, float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    return tensor.mean().item(), tensor.std().item() / math.sqrt(len(values))


def fused_estimate(model, guide, x, y, draws, kl="bound"):
    """−ELBO (nats, whole data set) from ``negative_elbo`` at full batch, averaged over ``draws``."""
    with torch.no_grad():
        return mean_and_se([negative_elbo(model, guide, x, y, kl=kl).loss.item() * model.dataset_size
                            for _ in range(draws)])


def pyro_estimate(elbo, model, guide, x, y, draws):
    with torch.no_grad():
        return mean_and_se([elbo.loss(model, guide, x, y) for _ in range(draws)])


def agree(first: tuple[float, float], second: tuple[float, float]) -> bool:
    return abs(first[0] - second[0]) < 4 * math.hypot(first[1], second[1])


# ------------------------------------------------------------------------------------------------
# W2: local reparameterization only where it is exact
# ------------------------------------------------------------------------------------------------
class SequenceNet(nn.Module):
    """(B, T, D) -> Linear per position -> mean over positions: (B, K)."""

    def __init__(self, d: int = 5, k: int = 3):
        super().__init__()
        self.linear = nn.Linear(d, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).mean(1)


def test_positions_of_one_example_share_one_weight_draw():
    """Two equal positions of a (B, T, D) input see the same weights: their outputs are equal under
    every draw (correlation 1), while the noise itself is that of w ~ N(μ, σ²)."""
    model = ps.BayesianNetwork(SequenceNet(), dataset_size=10)
    assert model.sites["linear.weight"].local_reparameterization
    x = torch.randn(2, 3, 5)
    x[:, 1] = x[:, 0]
    loc, var = torch.randn(3, 5), torch.rand(3, 5) * 0.5
    layer = model.net.linear
    with ps.layers.local_reparameterization(model._site_layers, {"linear.weight": (loc, var)}):
        draws = torch.stack([layer(x) for _ in range(4000)])  # (S, B, T, K)
    assert torch.allclose(draws[:, :, 0], draws[:, :, 1])
    first, second = draws[:, 0, 0, 0], draws[:, 0, 1, 0]
    assert torch.corrcoef(torch.stack([first, second]))[0, 1] > 0.999
    expected_var = (x[0, 0] ** 2) @ var.T  # (K,)
    assert torch.allclose(draws[:, 0, 0].var(0), expected_var, rtol=0.1)
    # 2-D inputs keep LRT: different examples get independent noise
    flat = torch.stack([_lrt_output(model, x[:, 0], loc, var) for _ in range(4000)])
    assert abs(torch.corrcoef(torch.stack([flat[:, 0, 0], flat[:, 1, 0]]))[0, 1]) < 0.08


def _lrt_output(model, x2d, loc, var):
    with ps.layers.local_reparameterization(model._site_layers, {"linear.weight": (loc, var)}):
        return model.net.linear(x2d)


def test_sequence_model_trains_with_masked_weights_and_finite_gradients():
    model = ps.BayesianNetwork(SequenceNet(), dataset_size=8)
    guide = ps.MeanField(model, init_scale=0.1)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, :2] = False
    guide.set_mask("linear.weight", mask)
    x, y = torch.randn(8, 4, 5), torch.randint(0, 3, (8,))
    terms = negative_elbo(model, guide, x, y)
    terms.loss.backward()
    site = guide.site("linear.weight")
    assert torch.isfinite(site.loc.grad).all() and torch.isfinite(site.rho.grad).all()
    assert torch.all(site.rho.grad[~mask] == 0)


# ------------------------------------------------------------------------------------------------
# M1: the KL bound and the Monte Carlo KL
# ------------------------------------------------------------------------------------------------
def test_closed_form_spike_and_slab_kl_is_an_upper_bound_on_the_exact_kl():
    prior = ps.priors.SpikeAndSlab(1.0, 0.05, 0.3)
    model = tiny_model(prior)
    guide = ps.MeanField(model, init_scale=0.1)
    with torch.no_grad():  # σ between spike and slab: neither component dominates, the bound is loose
        for _, site in guide.named_sites():
            site.loc.mul_(0.2)
    bound = guide.kl(prior).item()
    draws = []
    for _ in range(4000):
        total = 0.0
        for _, (loc, scale) in guide.moments().items():
            q = torch.distributions.Normal(loc.detach(), scale.detach())
            w = q.sample()
            total += (q.log_prob(w) - prior.log_prob(w)).sum().item()
        draws.append(total)
    exact, se = mean_and_se(draws)
    assert bound >= exact - 4 * se
    assert bound - exact > 10 * se  # a real gap here, so the test can tell the two apart


def test_monte_carlo_kl_matches_pyros_trace_elbo_and_the_bound_matches_trace_meanfield():
    torch.manual_seed(1)
    prior = ps.priors.SpikeAndSlab(1.0, 0.05, 0.3)
    model = tiny_model(prior)
    guide = perturbed_guide(model)
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    mc = fused_estimate(model, guide, x, y, 2000, kl="mc")
    bound = fused_estimate(model, guide, x, y, 1500, kl="bound")
    trace = pyro_estimate(Trace_ELBO(), model, guide, x, y, 1000)
    meanfield = pyro_estimate(TraceMeanField_ELBO(), model, guide, x, y, 300)
    assert agree(mc, trace), (mc, trace)
    assert agree(bound, meanfield), (bound, meanfield)
    assert bound[0] > trace[0] + 4 * math.hypot(bound[1], trace[1])  # −ELBO with the bound is larger


def test_fit_records_the_kl_estimator_and_refuses_unknown_ones():
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    model = tiny_model(ps.priors.SpikeAndSlab(1.0, 0.05, 0.3))
    guide = ps.MeanField(model)
    history = ps.fit(model, guide, (x, y), epochs=2, batch_size=20, kl="mc", progress=False, seed=0)
    assert history.column("kl_estimator") == ["mc", "mc"]
    assert all(math.isfinite(v) for v in history.column("kl"))
    assert ps.fit(model, guide, (x, y), epochs=1, progress=False, seed=0).column("kl_estimator") == ["bound"]
    with pytest.raises(ValueError, match="kl must be one of"):
        ps.fit(model, guide, (x, y), epochs=1, kl="exact", progress=False)


# ------------------------------------------------------------------------------------------------
# M2: pruned weights are out of the model
# ------------------------------------------------------------------------------------------------
def pruned_snr_guide(model, x, y):
    guide = ps.guides.SNRPruned(model, init_scale=0.3)
    ps.fit(model, guide, (x, y), epochs=3, batch_size=20, progress=False, seed=0)
    guide.prune(sparsity=0.5)
    assert guide.sparsity == pytest.approx(0.5, abs=0.02)
    return guide


def test_three_elbo_estimates_agree_on_a_pruned_guide():
    """SNRPruned at 50 %: Trace_ELBO (model log density), TraceMeanField_ELBO and fit's objective agree."""
    torch.manual_seed(2)
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    model = tiny_model(ps.priors.Gaussian(1.0))
    guide = pruned_snr_guide(model, x, y)
    ours = fused_estimate(model, guide, x, y, 2000)
    trace = pyro_estimate(Trace_ELBO(), model, guide, x, y, 1000)
    meanfield = pyro_estimate(TraceMeanField_ELBO(), model, guide, x, y, 300)
    assert agree(ours, trace), (ours, trace)
    assert agree(ours, meanfield), (ours, meanfield)


def test_the_models_log_density_leaves_pruned_weights_out():
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    prior = ps.priors.Gaussian(1e-3)  # log p(0) ≈ +5.99 nats per weight: large if it were counted
    model = tiny_model(prior)
    guide = perturbed_guide(model, ps.guides.SNRPruned)
    guide.prune(sparsity=0.5)
    guide_trace = poutine.trace(guide).get_trace(x, y)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y)
    for name, mask in guide.masks().items():
        value = model_trace.nodes[name]["value"]
        assert torch.all(value[~mask] == 0)
        expected = prior.log_prob(value)[mask].sum()  # independent: the prior's density on active weights
        assert model_trace.nodes[name]["fn"].log_prob(value).item() == pytest.approx(expected.item(), rel=1e-5)
    # a copy of the model does not read the original's guide; fit links it to its own guide
    copied_model, copied_guide = copy.deepcopy(model), copy.deepcopy(guide)
    assert copied_model.site_masks() == {}
    ps.fit(copied_model, copied_guide, (x, y), epochs=1, progress=False, seed=0)
    assert set(copied_model.site_masks()) == {name for name, m in copied_guide.masks().items() if not m.all()}


# ------------------------------------------------------------------------------------------------
# M3: Adam's fresh start at regrown SSVI weights
# ------------------------------------------------------------------------------------------------
def test_first_update_of_a_regrown_weight_is_about_the_learning_rate(digits):
    """A fresh Adam's first step is lr · sign(g); a regrown coordinate's first step must be that
    (not the 2.5-5 × lr that zeroed moments under the global step count give)."""
    x, y = digits.train.tensors
    x, y = x[:256], y[:256]
    model = ps.BayesianNetwork(ps.nets.mlp(64, (64,), 10), dataset_size=len(x))
    guide = ps.guides.SparseSubspace(model, density=0.2, init_scale=1e-3)
    lr = 1e-3
    optimizer = make_adam([*guide.parameters(), *model.parameters()], lr)
    for _ in range(300):
        loss = negative_elbo(model, guide, x, y).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    site = guide.site("1.weight")
    before = site.index.clone()
    guide.update_support(0.3, (x, y), optimizer)
    grown = (site.index != before).nonzero().squeeze(1)
    assert len(grown) > 50
    loc_before, rho_before = site.loc.detach()[grown].clone(), site.rho.detach()[grown].clone()
    loss = negative_elbo(model, guide, x, y).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    loc_step = (site.loc.detach()[grown] - loc_before).abs() / lr
    rho_step = (site.rho.detach()[grown] - rho_before).abs() / lr
    assert 0.7 < loc_step.median().item() < 1.3, loc_step.median()
    assert loc_step.max().item() < 1.5
    assert rho_step.max().item() < 1.5  # never the inflated first step of zeroed moments


# ------------------------------------------------------------------------------------------------
# σ in the history
# ------------------------------------------------------------------------------------------------
def test_history_has_the_mean_sigma_of_active_weights_per_layer():
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    model = tiny_model()
    guide = ps.MeanField(model, init_scale=0.05)
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[:3] = False
    guide.set_mask("1.weight", mask)
    history = ps.fit(model, guide, (x, y), epochs=2, progress=False, seed=0)
    last = history[-1]
    scales = {name: F.softplus(site.rho.detach()) for name, site in guide.named_sites()}
    assert last["mean_sigma[1.weight]"] == pytest.approx(scales["1.weight"][mask].mean().item(), rel=1e-4)
    assert last["mean_sigma[3.weight]"] == pytest.approx(scales["3.weight"].mean().item(), rel=1e-4)
    active = torch.cat([scales["1.weight"][mask], scales["3.weight"].flatten()])
    assert last["mean_sigma"] == pytest.approx(active.mean().item(), rel=1e-4)
