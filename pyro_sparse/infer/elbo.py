"""The fused training objective: negative ELBO with local reparameterization.

For a minibatch of B of N examples,

    −ELBO / N ≈ −(1/B) Σ_i log p(y_i | x_i, w) + β · KL(q ‖ p) / N,

where the likelihood term is one Monte Carlo draw (pre-activations of Linear layers sampled per
example, other Bayesian parameters sampled once per batch) and the KL is summed over all active
Bayesian weights, estimated one of two ways (``kl``):

- ``"bound"`` (default): the closed form of ``Prior.kl``. Exact for a Gaussian prior; for the
  spike-and-slab prior an *upper bound* on the KL (−log Σₖ πₖ exp(−KL(q ‖ N(0, σₖ²))), tight
  when one component dominates), so ``fit`` then maximises a lower bound on the ELBO. Pyro's
  ``TraceMeanField_ELBO`` uses the same bound (``distributions.kl_normal_to_spike_and_slab``).
- ``"mc"``: log q(w) − log p(w) at one draw w ~ q (its own draw for Linear layers, whose
  pre-activations are sampled instead of weights), summed over the active weights: an unbiased
  estimate of the exact KL, as in Pyro's ``Trace_ELBO``, at the price of more gradient noise.

In expectation this is, divided by N, Pyro's ``TraceMeanField_ELBO`` (``kl="bound"``) or
``Trace_ELBO`` (``kl="mc"``; both agree for a Gaussian prior), with no per-site tracing on the hot
path. Pruned (masked) weights are out of both the guide and the model (``BayesianNetwork``), so
they add nothing to either estimate. When whole units are removed (``guide.unit_masks()``) the
network of the active units runs instead of the masked one (``infer.compact``): the same objective,
at the cost of the active weights.

Under the node-wise horseshoe (``priors.NodeHorseshoe``) the sites hold β ~ N(0, 1) and the network
computes with w = τ̃ β: the unit scales τ̃ are drawn once per batch from q (``guides.horseshoe``),
Linear layers sample pre-activations N(x·(μ_β τ̃), x²·(σ_β² τ̃²)), the KL of β is the closed form
against N(0, 1) (or, with ``kl="mc"``, Monte Carlo), and the KL of the scale sites is always Monte
Carlo at the draw (log q − log |∂ exp/∂u| − log p), as in Pyro's ``Trace_ELBO``. (In the network of
the active units, τ̃ is gathered to its rows; the removed units' scale sites stay in the KL, as they
stay in the model.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..guides.horseshoe import draw_unit_scales
from ..guides.meanfield import MeanField, SiteMoments
from ..model import BayesianNetwork
from ..priors import NodeHorseshoe, Prior
from .compact import CompactNetwork, compact_network

KL_ESTIMATORS = ("bound", "mc")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class ElboTerms:
    """loss: the scalar to minimise (−ELBO / N with KL weight β); nll: mean −log p(y|x, w) of the
    batch; kl: the KL(q ‖ p) estimate summed over all Bayesian weights (nats); output: (B, ...)
    network output."""

    loss: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    output: torch.Tensor


def check_kl_estimator(kl: str) -> str:
    if kl not in KL_ESTIMATORS:
        raise ValueError(f"kl must be one of {', '.join(repr(k) for k in KL_ESTIMATORS)}, got {kl!r}")
    return kl


def monte_carlo_kl(q: SiteMoments, prior: Prior, draw: torch.Tensor | None = None) -> torch.Tensor:
    """log q(w) − log p(w) summed over the active weights of one site, at one draw w ~ q.

    Args:
        q: the site's moments (μ, σ, σ² of the weight's shape; zero where masked) and mask.
        prior: the weight prior.
        draw: w = μ + σ ε (the weight's shape) when already drawn; otherwise drawn here.

    Returns a 0-dim tensor whose expectation over w is Σ KL(q(w_i) ‖ p(w_i)) (exact, no bound).
    """
    active = q.scale > 0 if q.mask is None else q.mask
    safe_scale = torch.where(active, q.scale, torch.ones_like(q.scale))
    weight = torch.addcmul(q.loc, q.scale, torch.randn_like(q.loc)) if draw is None else draw
    standardized = (weight - q.loc) / safe_scale
    log_q = -0.5 * standardized * standardized - safe_scale.log() - _HALF_LOG_2PI
    return torch.where(active, log_q - prior.log_prob(weight), torch.zeros_like(log_q)).sum()


def _kept_rows(tau: torch.Tensor, network: CompactNetwork, name: str, full_shape: torch.Size) -> torch.Tensor:
    """τ̃ (out, 1, ...) of site ``name`` gathered to the rows (kept units) of its weight in the network of
    the active units: the full-weight row of the first coordinate of each gathered row."""
    gather = network.sites[name]
    if gather.flat is None:
        return tau
    rows = gather.flat.view(gather.shape[0], -1)[:, 0] // full_shape[1:].numel()
    return tau.index_select(0, rows)


def negative_elbo(
    model: BayesianNetwork,
    guide: MeanField,
    x: torch.Tensor,
    y: torch.Tensor,
    kl_weight: float = 1.0,
    kl: str = "bound",
) -> ElboTerms:
    """One-sample estimate of −ELBO / N on the batch x (B, ...), y (B,); ``kl``: "bound" or "mc" (module docstring)."""
    network = compact_network(model, guide)  # None unless units are removed
    if network is None:
        apply, (site_moments, kl_total) = model.apply, guide.moments_and_kl(model.prior)
    else:
        apply, (site_moments, kl_total) = network.apply, network.moments_and_kl(guide, model.prior)
    if kl == "mc":
        kl_total = 0.0
    # under the node-wise horseshoe: one draw of the unit scales τ̃ per batch, w = τ̃ β (guides.horseshoe)
    horseshoe = isinstance(model.prior, NodeHorseshoe)
    unit_scales, scale_kl = draw_unit_scales(guide, model.prior) if horseshoe else ({}, 0.0)
    moments, weights = {}, {}
    for name, q in site_moments.items():
        draw, tau = None, unit_scales.get(name)
        if tau is not None and network is not None:
            tau = _kept_rows(tau, network, name, guide.site(name).shape)
        if model.sites[name].local_reparameterization:
            moments[name] = (q.loc, q.var) if tau is None else (q.loc * tau, q.var * (tau * tau))
        else:
            draw = torch.addcmul(q.loc, q.scale, torch.randn_like(q.loc))
            weights[name] = draw if tau is None else draw * tau
        if kl == "mc":
            kl_total = kl_total + monte_carlo_kl(q, model.prior, draw)
    kl_total = kl_total + scale_kl
    output = apply(x, weights, moments)
    nll = -model.likelihood.log_prob(output, y).mean()
    loss = nll + (kl_weight / model.dataset_size) * kl_total
    return ElboTerms(loss=loss, nll=nll.detach(), kl=kl_total.detach(), output=output)
