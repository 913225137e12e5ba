"""The fused training objective: negative ELBO with closed-form KL and local reparameterization.

For a minibatch of B of N examples,

    −ELBO / N ≈ −(1/B) Σ_i log p(y_i | x_i, w) + β · KL(q ‖ p) / N,

where the likelihood term is one Monte Carlo draw (pre-activations of Linear and Conv layers
sampled per example, other Bayesian parameters sampled once per batch) and the KL is summed in
closed form over all active Bayesian weights. In expectation this is Pyro's
``TraceMeanField_ELBO`` (and, for a Gaussian prior, ``Trace_ELBO``) divided by N, with no
per-site tracing on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..guides.meanfield import MeanField
from ..model import BayesianNetwork


@dataclass
class ElboTerms:
    """loss: the scalar to minimise (−ELBO / N with KL weight β); nll: mean −log p(y|x, w) of the
    batch; kl: KL(q ‖ p) summed over all Bayesian weights (nats); output: (B, ...) network output."""

    loss: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    output: torch.Tensor


def negative_elbo(
    model: BayesianNetwork,
    guide: MeanField,
    x: torch.Tensor,
    y: torch.Tensor,
    kl_weight: float = 1.0,
) -> ElboTerms:
    """One-sample estimate of −ELBO / N on the batch x (B, ...), y (B,)."""
    site_moments, kl = guide.moments_and_kl(model.prior)
    moments, weights = {}, {}
    for name, q in site_moments.items():
        if model.sites[name].local_reparameterization:
            moments[name] = (q.loc, q.var)
        else:
            weights[name] = torch.addcmul(q.loc, q.scale, torch.randn_like(q.loc))
    output = model.apply(x, weights, moments)
    nll = -model.likelihood.log_prob(output, y).mean()
    loss = nll + (kl_weight / model.dataset_size) * kl
    return ElboTerms(loss=loss, nll=nll.detach(), kl=kl.detach(), output=output)
