"""The leaner dense-VI step (issue 13, training speed) computes exactly what the autograd formulas do."""

import pytest
import torch
import torch.nn.functional as F

import pyro_sparse as ps
from pyro_sparse.guides.fused import MomentsKL, SoftplusKL, softplus_kl
from pyro_sparse.infer.elbo import negative_elbo

PRIORS = [ps.priors.Gaussian(0.8), ps.priors.SpikeAndSlab(1.0, 0.05, 0.3)]
PRIOR_IDS = ["gaussian", "spike-slab"]


def site(masked: bool, shape=(6, 9)):
    torch.manual_seed(1)
    loc = (torch.randn(*shape, dtype=torch.float64) * 0.3).requires_grad_()
    rho = (torch.randn(*shape, dtype=torch.float64) - 3).requires_grad_()
    mask = (torch.rand(*shape) > 0.3).double() if masked else None
    return loc, rho, mask


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("prior", PRIORS, ids=PRIOR_IDS)
def test_moments_kl_matches_autograd_reference_with_loc_passed_on(prior, masked):
    """Outputs and the gradients of μ (from the KL *and* from its use downstream) and ρ equal the plain formulas."""
    prior = prior.double()
    loc, rho, mask = site(masked)
    masked_loc = loc if mask is None else loc * mask
    loc_out, scale, var, kl = softplus_kl(masked_loc, rho, mask, prior)
    active = torch.ones_like(loc, dtype=torch.bool) if mask is None else mask.bool()
    reference_scale = F.softplus(rho) * active
    reference_kl = prior.kl(loc, F.softplus(rho))[active].sum()
    assert torch.equal(loc_out, masked_loc)
    assert torch.allclose(scale, reference_scale) and torch.allclose(var, reference_scale**2)
    assert torch.allclose(kl, reference_kl)

    downstream_loc, downstream_var = torch.randn_like(loc), torch.randn_like(loc)
    ours = torch.autograd.grad(kl + (var * downstream_var).sum() + (loc_out * downstream_loc).sum(), (loc, rho),
                               retain_graph=True)
    theirs = torch.autograd.grad(
        reference_kl + (reference_scale**2 * downstream_var).sum() + (masked_loc * downstream_loc).sum(), (loc, rho)
    )
    for mine, reference in zip(ours, theirs, strict=True):
        assert torch.allclose(mine, reference, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda m, r: MomentsKL.apply(m if mask is None else m * mask, r, mask, prior),
                                    (loc, rho))


@pytest.mark.parametrize("prior", PRIORS, ids=PRIOR_IDS)
def test_scale_gradient_and_unused_outputs(prior):
    """Weight draws use σ (not σ²); an unused KL or σ² gives None gradients that the kernel handles."""
    prior = prior.double()
    loc, rho, _ = site(False)
    noise = torch.randn_like(loc)
    _, scale, _, kl = softplus_kl(loc, rho, None, prior)
    ours = torch.autograd.grad(kl + ((loc + scale * noise) ** 2).sum(), (loc, rho))
    reference_scale = F.softplus(rho)
    theirs = torch.autograd.grad(prior.kl(loc, reference_scale).sum() + ((loc + reference_scale * noise) ** 2).sum(),
                                 (loc, rho))
    for mine, reference in zip(ours, theirs, strict=True):
        assert torch.allclose(mine, reference, rtol=1e-10, atol=1e-12)
    _, _, var, _ = softplus_kl(loc, rho, None, prior)
    (grad_rho,) = torch.autograd.grad(var.sum(), rho)  # no KL gradient at all
    assert torch.allclose(grad_rho, torch.autograd.grad((F.softplus(rho) ** 2).sum(), rho)[0])


@pytest.mark.parametrize("prior", PRIORS, ids=PRIOR_IDS)
def test_softplus_kl_api_unchanged(prior):
    """``SoftplusKL`` (σ, σ², KL) is still there and agrees with ``MomentsKL``."""
    prior = prior.double()
    loc, rho, mask = site(True)
    scale, var, kl = SoftplusKL.apply(loc * mask, rho, mask, prior)
    _, scale2, var2, kl2 = MomentsKL.apply(loc * mask, rho, mask, prior)
    assert torch.equal(scale, scale2) and torch.equal(var, var2) and torch.equal(kl, kl2)


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("prior", PRIORS, ids=PRIOR_IDS)
def test_second_moment_kl_is_the_closed_form_kl(prior, masked):
    """Σ g(μ² + σ²) − Σ log σ over active weights = Σ ``prior.kl`` over them; g′ is the derivative of g."""
    prior = prior.double()
    loc, rho, mask = site(masked)
    scale = F.softplus(rho).detach()
    active = torch.ones_like(loc, dtype=torch.bool) if mask is None else mask.bool()
    masked_loc = loc.detach() if mask is None else loc.detach() * mask
    masked_scale = scale if mask is None else scale * mask
    total, slope = prior.second_moment_kl(masked_loc, masked_scale**2, mask)
    assert torch.allclose(total - scale.log()[active].sum(), prior.kl(loc.detach(), scale)[active].sum())
    step = 1e-6
    bumped, _ = prior.second_moment_kl(masked_loc, masked_scale**2 + step * active, mask)
    assert torch.allclose((bumped - total) / step, (slope * active).sum(), rtol=1e-4)


def test_negative_elbo_loss_and_gradients_match_plain_autograd():
    """One training objective, end to end (local reparameterization, same noise): the fused step and the
    plain autograd formulas give the same loss and the same gradients of every guide parameter."""
    torch.manual_seed(0)
    model = ps.BayesianNetwork(ps.nets.mlp(8, (16, 12), 3), dataset_size=500)
    guide = ps.MeanField(model, init_scale=0.05)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    params = list(guide.parameters())

    torch.manual_seed(5)
    ours = negative_elbo(model, guide, x, y)
    our_grads = torch.autograd.grad(ours.loss, params)

    moments, kl = {}, 0.0
    for name, guide_site in guide.named_sites():
        scale = F.softplus(guide_site.rho)
        moments[name] = (guide_site.loc, scale**2)
        kl = kl + model.prior.kl(guide_site.loc, scale).sum()
    torch.manual_seed(5)
    output = model.apply(x, {}, moments)
    reference = -model.likelihood.log_prob(output, y).mean() + kl / model.dataset_size
    reference_grads = torch.autograd.grad(reference, params)

    assert torch.allclose(ours.loss, reference, rtol=1e-5)
    for mine, theirs in zip(our_grads, reference_grads, strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-6)
