"""MeanField: initialisation, masks, the fused kernel, and the fused ELBO against Pyro's ELBOs."""

from __future__ import annotations

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from torch.nn import functional as F

import pyro_sparse as ps
from pyro_sparse.guides.fused import SoftplusKL, inverse_softplus, softplus
from pyro_sparse.infer.elbo import negative_elbo


def small_model(prior=None, dataset_size=40):
    return ps.BayesianNetwork(ps.nets.mlp(4, (6,), 3), prior=prior, dataset_size=dataset_size)


def test_means_start_at_the_networks_initialisation_and_scales_small():
    net = ps.nets.mlp(64, (32,), 10)
    model = ps.BayesianNetwork(net, dataset_size=100)
    guide = ps.MeanField(model, init_scale=0.02)
    for name, site in guide.named_sites():
        assert torch.equal(site.loc.detach(), net.get_parameter(name).detach())
        assert torch.allclose(site.scale(), torch.full_like(site.loc, 0.02), rtol=1e-3)
        assert site.mask.all()
    assert guide.sparsity == 0.0 and guide.num_weights == model.num_weights == 64 * 32 + 32 * 10
    with pytest.raises(ValueError, match="init_scale must be"):
        ps.MeanField(model, init_scale=0.0)
    with pytest.raises(ValueError, match="model must be a pyro_sparse.BayesianNetwork"):
        ps.MeanField(net)


def test_softplus_matches_torch_and_inverts():
    rho = torch.linspace(-14.9, 19.9, 300, requires_grad=True)
    assert torch.allclose(softplus(rho), F.softplus(rho), rtol=1e-6)
    (gradient,) = torch.autograd.grad(softplus(rho).sum(), rho)
    assert torch.allclose(gradient, torch.sigmoid(rho), rtol=1e-5)
    for value in (1e-3, 0.05, 1.0, 7.0):
        assert softplus(torch.tensor(inverse_softplus(value))).item() == pytest.approx(value, rel=2e-4)


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize(
    "prior", [ps.priors.Gaussian(0.8), ps.priors.SpikeAndSlab(1.0, 0.05, 0.3)], ids=["gaussian", "spike-slab"]
)
def test_fused_kernel_matches_autograd_reference(prior, masked):
    prior = prior.double()
    loc = (torch.randn(5, 7, dtype=torch.float64) * 0.3).requires_grad_()
    rho = (torch.randn(5, 7, dtype=torch.float64) - 2).requires_grad_()
    mask = (torch.rand(5, 7) > 0.3).double() if masked else None

    def fused(m, r):
        return SoftplusKL.apply(m if mask is None else m * mask, r, mask, prior)

    assert torch.autograd.gradcheck(fused, (loc, rho))

    scale, var, kl = fused(loc, rho)
    active = torch.ones_like(loc, dtype=torch.bool) if mask is None else mask.bool()
    reference_scale = F.softplus(rho) * active
    reference_kl = prior.kl(loc, F.softplus(rho))[active].sum()
    assert torch.allclose(scale, reference_scale) and torch.allclose(var, reference_scale**2)
    assert torch.allclose(kl, reference_kl)
    weights = torch.randn_like(loc)
    (fused_grads) = torch.autograd.grad((kl + (var * weights).sum()), (loc, rho))
    reference = torch.autograd.grad(reference_kl + (reference_scale**2 * weights).sum(), (loc, rho))
    for ours, theirs in zip(fused_grads, reference, strict=True):
        assert torch.allclose(ours, theirs)


def test_masked_weights_are_exactly_zero_everywhere():
    model = small_model(ps.priors.SpikeAndSlab(1.0, 0.01, 0.5))
    guide = ps.MeanField(model, init_scale=0.1)
    mask = torch.rand(6, 4) > 0.5
    guide.set_mask("1.weight", mask)
    assert guide.active_counts()["1.weight"] == int(mask.sum())
    assert guide.sparsity == pytest.approx(1 - (int(mask.sum()) + 18) / (24 + 18))
    for _ in range(5):
        assert torch.all(guide.sample_weights()["1.weight"][~mask] == 0)
    trace = poutine.trace(guide).get_trace()
    assert torch.all(trace.nodes["1.weight"]["value"][~mask] == 0)

    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    terms = negative_elbo(model, guide, x, y)
    terms.loss.backward()
    site = guide.site("1.weight")
    assert torch.all(site.loc.grad[~mask] == 0) and torch.all(site.rho.grad[~mask] == 0)
    # masked coordinates hold no information: changing them changes nothing
    with torch.no_grad():
        kl_before = guide.kl(model.prior)
        site.loc[~mask] = 5.0
        site.rho[~mask] = 3.0
    assert torch.allclose(guide.kl(model.prior), kl_before)
    with pytest.raises(ValueError, match="mask for '1.weight' must have shape"):
        guide.set_mask("1.weight", torch.ones(3, 3, dtype=torch.bool))


def _fused_negative_elbo(model, guide, x, y, draws):
    with torch.no_grad():
        values = [negative_elbo(model, guide, x, y).loss.item() * model.dataset_size for _ in range(draws)]
    values = torch.tensor(values, dtype=torch.float64)
    return values.mean().item(), values.std().item() / math.sqrt(draws)


def _pyro_negative_elbo(elbo, model, guide, x, y, draws):
    with torch.no_grad():
        values = torch.tensor([elbo.loss(model, guide, x, y) for _ in range(draws)], dtype=torch.float64)

    return values.mean().item(), values.std().item() / math.sqrt(draws)


@pytest.mark.parametrize(
    "prior, elbo",
    [
        (ps.priors.Gaussian(1.0), Trace_ELBO()),
        (ps.priors.Gaussian(0.5), TraceMeanField_ELBO()),
        (ps.priors.SpikeAndSlab(1.0, 0.05, 0.3), TraceMeanField_ELBO()),
    ],
    ids=["gaussian-Trace_ELBO", "gaussian-TraceMeanField_ELBO", "spike-slab-TraceMeanField_ELBO"],
)
def test_fused_objective_estimates_the_same_elbo_as_pyro(prior, elbo):
    """Full batch (B = N): the fused estimate of −ELBO and Pyro's agree in expectation.

    The Trace_ELBO case uses a dense guide; masked guides against Trace_ELBO (pruned weights out of
    the model's log density) and the spike-and-slab bound are in tests/test_vi_correctness.py.
    """
    torch.manual_seed(1)
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    model = small_model(prior, dataset_size=40)
    guide = ps.MeanField(model, init_scale=0.3)
    with torch.no_grad():  # a guide away from its initialisation, with a few masked weights
        for _, site in guide.named_sites():
            site.loc.mul_(2.0)
            site.rho.add_(torch.randn_like(site.rho) * 0.5)
    if isinstance(elbo, TraceMeanField_ELBO):
        guide.set_mask("1.weight", torch.rand(6, 4) > 0.2)
    ours, ours_se = _fused_negative_elbo(model, guide, x, y, 3000)
    theirs, theirs_se = _pyro_negative_elbo(elbo, model, guide, x, y, 600)
    assert abs(ours - theirs) < 4 * math.hypot(ours_se, theirs_se), (ours, ours_se, theirs, theirs_se)


def test_minibatch_objective_is_scaled_by_n_over_b():
    model = small_model(dataset_size=1000)
    guide = ps.MeanField(model, init_scale=1e-4)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    terms = negative_elbo(model, guide, x, y)
    expected_nll = F.cross_entropy(model.apply(x, guide.mean_weights()), y)
    assert terms.nll.item() == pytest.approx(expected_nll.item(), rel=1e-3)
    assert terms.loss.item() == pytest.approx(terms.nll.item() + terms.kl.item() / 1000, rel=1e-5)
    trace = poutine.trace(model).get_trace(x, y)
    assert trace.nodes["obs"]["scale"] == pytest.approx(100.0)


def test_an_ordinary_pyro_guide_trains_with_svi_and_predicts(digits):
    x, y = digits.train.tensors
    model = ps.BayesianNetwork(ps.nets.mlp(64, (32,), 10), dataset_size=len(x))
    guide = ps.MeanField(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 5e-3}), TraceMeanField_ELBO())
    generator = torch.Generator().manual_seed(0)
    for _ in range(250):
        index = torch.randint(0, len(x), (64,), generator=generator)
        svi.step(x[index], y[index])
    x_test, y_test = digits.test.tensors
    predictive = Predictive(model, guide=guide, num_samples=16)(x_test)
    assert {"1.weight", "3.weight", "obs", "output"} <= set(predictive)
    assert predictive["output"].shape == (16, len(x_test), 10)
    accuracy = (predictive["output"].softmax(-1).mean(0).argmax(-1) == y_test).float().mean().item()
    assert accuracy > 0.9
    assert ps.evaluate(model, guide, digits.test)["accuracy"] > 0.9
