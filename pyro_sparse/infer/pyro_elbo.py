"""The ELBO of any Pyro model under this package's guides, from Pyro traces (``fit``'s general path).

A ``BayesianNetwork`` has a fused objective (``infer.elbo.negative_elbo``); any other Pyro model is
run as Pyro runs it: the guide is traced, the model replayed against the guide's draws (with pruned
coordinates masked out of its log density), and

    −ELBO / N = (−Σ_obs s · log p(y | ·) + β · KL(q ‖ p)) / N,

where the data term is scaled to the whole data set: an observed site that the model already scales
(a ``pyro.plate`` with ``subsample``/``subsample_size``) keeps its scale s; an unscaled one, from a
model written for the batch it is given (``pyro.plate("data", len(x))``), gets s = N / B. The KL is
the closed form where one is registered for the pair (guide, prior) and ``kl="bound"``, as Pyro's
``TraceMeanField_ELBO`` does (for a spike-and-slab prior an upper bound, see ``infer.elbo``); else,
and with ``kl="mc"``, log q(z) − log p(z) at the draw, as ``Trace_ELBO`` does.
"""

from __future__ import annotations

import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from ..pyro_model import AUXILIARY_SUFFIX, data_scale, log_prob_sum
from .elbo import ElboTerms


def traced_negative_elbo(
    model,
    guide,
    x: torch.Tensor,
    y: torch.Tensor,
    dataset_size: int,
    kl_weight: float = 1.0,
    kl: str = "bound",
) -> ElboTerms:
    """One-sample estimate of −ELBO / N of ``model(x, y)`` under ``guide`` on a batch of B examples.

    Args:
        model: a Pyro model called as ``model(x, y)`` (y observed).
        guide: a ``MeanField`` guide (or subclass) of that model.
        x: (B, ...) inputs; y: (B, ...) targets.
        dataset_size: N, the number of training examples.
        kl_weight: β.
        kl: "bound" (closed form where registered) or "mc" (the module docstring).

    Returns:
        ElboTerms: loss (−ELBO / N, differentiable), nll (mean −log p(y | ·) per example), kl (nats),
        output (the model's return value, or None).
    """
    guide_trace = poutine.trace(guide).get_trace(x, y)
    model_trace = poutine.trace(poutine.replay(guide.masked_model(model), trace=guide_trace)).get_trace(x, y)
    batch = len(x)
    data_term = x.new_zeros(())
    closed_kl = x.new_zeros(())
    log_p, monte_carlo = x.new_zeros(()), set()
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if site["is_observed"]:
            data_term = data_term + data_scale(site, dataset_size, batch) * log_prob_sum(site)
            continue
        guide_site = guide_trace.nodes.get(name)
        if kl == "bound" and guide_site is not None:
            try:
                closed = scale_and_mask(kl_divergence(guide_site["fn"], site["fn"]), mask=site["mask"]).sum()
            except NotImplementedError:
                pass
            else:
                closed_kl = closed_kl + site["scale"] * closed
                continue
        log_p = log_p + site["scale"] * log_prob_sum(site)
        monte_carlo.add(name)
    log_q = x.new_zeros(())
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        owner = name[: -len(AUXILIARY_SUFFIX)] if site["infer"].get("is_auxiliary") else name
        if owner in monte_carlo:
            log_q = log_q + site["scale"] * log_prob_sum(site)
    kl_total = closed_kl + log_q - log_p
    loss = (-data_term + kl_weight * kl_total) / dataset_size
    returned = model_trace.nodes.get("_RETURN", {}).get("value")
    return ElboTerms(loss=loss, nll=(-data_term / dataset_size).detach(), kl=kl_total.detach(),
                     output=returned if torch.is_tensor(returned) else None)
