"""Posterior draws of any Pyro model's latent sites: predictions, metrics and ArviZ, as for a network.

``Posterior`` holds draws of a ``BayesianNetwork``'s weights and runs the network on them. A Pyro model
has no network to run: ``PyroPosterior`` conditions the model on each draw (``poutine.condition``) and
reads its observed sites. What those sites' distributions say decides the metrics: a ``Categorical``
(or ``OneHotCategorical``) gives class probabilities, hence accuracy, NLL, ECE and Brier score
(``metrics.classification_metrics``); a ``Normal`` gives means and scales, hence RMSE, NLL and the
95 % coverage of the Gaussian-mixture predictive (``metrics.regression_metrics``); any other gives the
NLL of the predictive (−log of the mean over draws of p(y_i | draw), per observed element).

Build with ``PyroPosterior.from_samples(model, samples)`` (sampler draws: ``em_sghmc`` /
``sample_sghmc`` return one) or ``PyroPosterior.from_guide(model, guide, x, y)`` (draws from a guide).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from . import metrics
from .layers import substituted_parameters


class PyroPosterior:
    """S draws of a Pyro model's latent sites (and of a ``PyroModule``'s parameters, by path).

    Args:
        model: the Pyro model, called as ``model(x, y)`` (y observed; ``model(x)`` to predict).
        samples: name -> (S, *shape) values in the model's (constrained) space; names that are not
            sample sites are parameter paths of the model (``"fc1.bias"``), substituted in each draw.
        chains: the draws are ``chains`` chains of S / chains consecutive draws each.
        sample_stats: name -> (chains, draws) per-draw statistics (e.g. "lp"), for ArviZ.
        hyperparameters: name -> (chains, draws), e.g. EM's conditional draws of π and σ₁, for ArviZ.
        weight_sites: the sites whose exact zeros count as pruned weights (``sparsity``); default:
            every latent site.
    """

    def __init__(self, model: Callable, samples: Mapping[str, torch.Tensor], chains: int = 1,
                 sample_stats: Mapping[str, torch.Tensor] | None = None,
                 hyperparameters: Mapping[str, torch.Tensor] | None = None,
                 weight_sites: Collection[str] | None = None):
        if not samples:
            raise ValueError("samples is empty: pass site name -> (S, ...) tensors")
        self.num_samples = len(next(iter(samples.values())))
        for name, value in samples.items():
            if len(value) != self.num_samples:
                raise ValueError(f"samples[{name!r}] holds {len(value)} draws, the others {self.num_samples}")
        if chains < 1 or self.num_samples % chains:
            raise ValueError(f"{self.num_samples} draws cannot be split into chains={chains} chains of equal length")
        self.model, self.samples, self.chains = model, dict(samples), chains
        self.sample_stats = dict(sample_stats or {})
        self.hyperparameters = dict(hyperparameters or {})
        parameters = set(dict(model.named_parameters())) if isinstance(model, torch.nn.Module) else set()
        self.site_names = frozenset(self.samples) - parameters
        self.weight_sites = tuple(self.site_names if weight_sites is None else weight_sites)

    @classmethod
    def from_samples(cls, model: Callable, samples: Mapping[str, torch.Tensor], chains: int = 1,
                     **kwargs: Any) -> PyroPosterior:
        return cls(model, samples, chains, **kwargs)

    @classmethod
    @torch.no_grad()
    def from_guide(cls, model: Callable, guide: Callable, x: torch.Tensor, y: torch.Tensor | None = None,
                   num_samples: int = 32) -> PyroPosterior:
        """``num_samples`` draws of the guide's latent sites (the guide run on the model's arguments)."""
        draws: dict[str, list[torch.Tensor]] = {}
        for _ in range(num_samples):
            trace = poutine.trace(guide).get_trace(x, y)
            for name, site in trace.nodes.items():
                if site["type"] == "sample" and not site["infer"].get("is_auxiliary") \
                        and not site_is_subsample(site):
                    draws.setdefault(name, []).append(site["value"].detach())
        return cls(model, {name: torch.stack(values) for name, values in draws.items()})

    # -- running the model on the draws ------------------------------------------------------------
    def draw(self, index: int) -> dict[str, torch.Tensor]:
        """Draw ``index`` (0 <= index < S): name -> value."""
        return {name: value[index] for name, value in self.samples.items()}

    def observed_sites(self, *args: Any, **kwargs: Any) -> Iterator[dict[str, dict[str, Any]]]:
        """For each draw, the model's observed sites (name -> Pyro trace node), the model called with
        ``(*args, **kwargs)`` (e.g. ``(x, y)``) and conditioned on the draw."""
        for index in range(self.num_samples):
            draw = self.draw(index)
            sites = {name: value for name, value in draw.items() if name in self.site_names}
            parameters = {name: value for name, value in draw.items() if name not in sites}
            with torch.no_grad(), poutine.block(), substituted_parameters(self.model, parameters):
                trace = poutine.trace(poutine.condition(self.model, data=sites)).get_trace(*args, **kwargs)
            yield {name: node for name, node in trace.nodes.items() if node["type"] == "sample"
                   and node["is_observed"] and name not in sites and not site_is_subsample(node)}

    def pointwise_log_likelihood(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Observed site -> (S, *site shape) log p(y_i | draw), float64 (the model called with ``(*args,
        **kwargs)``, e.g. ``(x, y)``)."""
        rows: dict[str, list[torch.Tensor]] = {}
        for observed in self.observed_sites(*args, **kwargs):
            for name, node in observed.items():
                rows.setdefault(name, []).append(node["fn"].log_prob(node["value"]).double())
        return {name: torch.stack(values) for name, values in rows.items()}

    def evaluate(self, x: torch.Tensor, y: torch.Tensor, num_samples: int | None = None) -> dict[str, float]:
        """Predictive metrics of the model's single observed site on x, y (see the module docstring),
        plus ``active_weights`` / ``total_weights`` / ``sparsity`` of the weight sites. ``num_samples``: use
        that many draws, evenly spaced over all S (every chain's), as ``Posterior`` picks stored draws
        (default: all)."""
        posterior = self
        if num_samples is not None and num_samples < self.num_samples:
            picked = torch.linspace(0, self.num_samples - 1, num_samples).round().long()
            posterior = PyroPosterior(self.model, {name: value[picked] for name, value in self.samples.items()},
                                      weight_sites=self.weight_sites)
        per_draw = list(posterior.observed_sites(x, y))
        names = list(per_draw[0])
        if len(names) != 1:
            raise ValueError(f"evaluate needs a model with one observed site, this one has {names}: "
                             f"use pointwise_log_likelihood for each")
        nodes = [observed[names[0]] for observed in per_draw]
        fn = _base(nodes[0]["fn"])
        target = nodes[0]["value"]
        if isinstance(fn, dist.Categorical):
            probs = torch.stack([_base(node["fn"]).probs for node in nodes])
            results = metrics.classification_metrics(probs.reshape(len(nodes), -1, probs.shape[-1]), target.reshape(-1))
        elif isinstance(fn, dist.OneHotCategorical):
            probs = torch.stack([_base(node["fn"]).probs for node in nodes])
            results = metrics.classification_metrics(probs.reshape(len(nodes), -1, probs.shape[-1]),
                                                      target.argmax(-1).reshape(-1))
        elif isinstance(fn, dist.Normal):
            means = torch.stack([_base(node["fn"]).loc.expand_as(target).reshape(-1) for node in nodes])
            scales = torch.stack([_base(node["fn"]).scale.expand_as(target).reshape(-1) for node in nodes])
            results = metrics.regression_metrics(means, scales, target.reshape(-1).to(means.dtype))
        else:
            log_likelihood = torch.stack([node["fn"].log_prob(node["value"]).double().reshape(-1) for node in nodes])
            predictive = torch.logsumexp(log_likelihood, 0) - math.log(len(nodes))
            results = {"nll": float(-predictive.mean())}
        results.update(posterior.sparsity())
        return results

    def sparsity(self) -> dict[str, float]:
        """``total_weights`` of the weight sites, ``active_weights``: the nonzero ones of the draw with the
        most (as ``Posterior`` counts a network's), and ``sparsity`` = 1 − active / total."""
        total = sum(self.samples[name][0].numel() for name in self.weight_sites)
        per_draw = sum((self.samples[name] != 0).reshape(self.num_samples, -1).sum(1) for name in self.weight_sites)
        active = int(per_draw.max()) if self.weight_sites else 0
        return {"total_weights": total, "active_weights": active, "sparsity": 1.0 - active / max(total, 1)}

    def predictive(self, x: torch.Tensor, return_sites: list[str] | None = None) -> dict[str, torch.Tensor]:
        """``pyro.infer.Predictive`` of the model on x with these draws: site -> (S, ...) draws of the
        observed sites (y unobserved) and ``return_sites``."""
        from pyro.infer import Predictive

        sites = {name: value for name, value in self.samples.items() if name in self.site_names}
        if len(sites) != len(self.samples):
            raise ValueError("predictive runs Pyro's Predictive, which cannot substitute module parameters; "
                             "use observed_sites(x) for draws that include them")
        return Predictive(self.model, posterior_samples=sites, return_sites=return_sites)(x)

    def to_arviz(self, *args: Any, **kwargs: Any):
        """An ``arviz.InferenceData`` on the data ``(*args, **kwargs)`` (e.g. ``(x, y)``): posterior (every
        latent site and hyperparameter, by chain and draw), log_likelihood (each observed site, per draw and
        element), observed_data and sample_stats."""
        from .inference_data import pyro_inference_data

        return pyro_inference_data(self, args, kwargs)


def _base(fn: Any) -> Any:
    """The distribution under Independent / masking / expansion wrappers."""
    while isinstance(fn, dist.Independent | dist.MaskedDistribution | dist.ExpandedDistribution):
        fn = fn.base_dist
    return fn
