"""What ``em_sghmc`` and ``sample_sghmc`` sample: a ``BayesianNetwork`` or any Pyro model, behind one face.

Both loops need the same few things of a model: an SGHMC sampler of its log joint, where each chain
starts, which sites EM acts on (a spike-and-slab prior's sites, first in the flat parameter vector),
the prior object whose hyperparameters EM learns, and a posterior object for the kept draws.

- ``NetworkTarget``: a ``BayesianNetwork`` — its fused log-likelihood, every Bayesian site under the
  model's prior, chains > 0 from a fresh PyTorch initialisation, draws as a ``Posterior``.
- ``PyroTarget``: any Pyro model ``model(x, y)`` whose latent sites are continuous — the log joint of
  ``pyro_model.PyroPotential`` (plate scaling N / B, constrained sites through ``biject_to``), EM on the
  sites drawn from a ``priors.SpikeAndSlab`` object (``prior.distribution(shape)``; their prior density
  leaves the potential, EM's adaptive L2 replaces it), chains > 0 from a fresh ``init_loc_fn``
  initialisation, draws (constrained) as a ``PyroPosterior``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from pyro.infer.autoguide.initialization import init_to_median

from ..distributions import SpikeAndSlabNormal
from ..guides.meanfield import check_guide_model
from ..model import BayesianNetwork
from ..posterior import Posterior
from ..priors import Prior, SpikeAndSlab
from ..pyro_model import PyroPotential, spike_and_slab_sources
from ..pyro_posterior import PyroPosterior
from .em_units import UnitLayout, unit_layout
from .sghmc import SGHMC, network_parameters, sghmc


class NetworkTarget:
    """A ``BayesianNetwork`` as the target of the sampling loops (see the module docstring)."""

    default_spike_scale = "per-layer"

    def __init__(self, model: BayesianNetwork, em: bool, x: torch.Tensor, y: torch.Tensor, dataset_size: int):
        if em and not isinstance(model.prior, SpikeAndSlab):
            raise ValueError(
                f"em_sghmc needs a SpikeAndSlab prior, got {type(model.prior).__name__}: build the model with "
                f"prior=ps.priors.SpikeAndSlab(...) (or use sample_sghmc for dense SGHMC)"
            )
        if type(model.prior).latent_sites is not Prior.latent_sites:
            raise ValueError(
                f"the samplers draw a BayesianNetwork's weights only, and the {type(model.prior).__name__} prior has "
                f"latent scale sites of its own: train it by VI (ps.fit with ps.MeanField / ps.SNRPruned), or write "
                f"the model as a Pyro model (ps.priors.node_horseshoe_weight), whose every site sample_sghmc samples"
            )
        model.check_batch(x, y)
        self.model = model
        self.prior: Prior = model.prior
        self.site_names = tuple(model.sites)
        self.device = next(iter(model.net.buffers())).device

    def sampler(self, **settings: Any) -> SGHMC:
        return sghmc(self.model, **settings)

    def initial_site_values(self) -> dict[str, torch.Tensor]:
        return {name: self.model.initial_value(name).detach() for name in self.site_names}

    def chain_start(self, chain: int, seed: int) -> dict[str, torch.Tensor]:
        """Chain 0 starts at the model's own initial values; chain c > 0 at a fresh initialisation of
        the network (``reset_parameters`` of each layer, seeded), so chains start apart (for R-hat)."""
        params = network_parameters(self.model)
        if chain == 0:
            return params
        net = copy.deepcopy(self.model.net)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7919 * chain)
            for module in net.modules():
                if hasattr(module, "reset_parameters") and module is not net:
                    module.reset_parameters()
        fresh = dict(net.named_parameters()) | dict(net.named_buffers())
        for name in self.site_names:
            params[name] = fresh[name].detach().clone()
        for path in params:
            if path.startswith("net.") and path[4:] in fresh:
                params[path] = fresh[path[4:]].detach().clone()
        return params

    def posterior(self, samples: dict[str, torch.Tensor], chains: int, **kwargs: Any) -> Posterior:
        return Posterior.from_samples(self.model, samples, chains=chains, **kwargs)

    def unit_layout(self, layout: tuple[tuple[str, torch.Size], ...]) -> UnitLayout:
        """The network's removable units in a chain's flat vector of ``layout`` (``em_units.unit_layout``)."""
        return unit_layout(self.model, layout, self.device)

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def train(self) -> None:
        self.model.train()


def init_in_slab(site: dict[str, Any]) -> torch.Tensor:
    """Pyro's ``init_to_median``, except that a spike-and-slab site starts at the median of draws from its
    slab N(0, σ₁²) alone: the median of draws from the mixture lies near 0 for most weights, which the
    first E-step would put in the spike, where the adaptive L2 (precision 1/σ₀²) holds them."""
    fn = site["fn"]
    while not isinstance(fn, SpikeAndSlabNormal) and hasattr(fn, "base_dist"):
        fn = fn.base_dist
    if not isinstance(fn, SpikeAndSlabNormal):
        return init_to_median(site)
    shape = site["fn"].shape()
    draws = torch.randn((15, *shape), device=fn.slab_scale.device) * fn.slab_scale.expand(shape)
    return draws.median(0).values


class PyroTarget:
    """A Pyro model ``model(x, y)`` as the target of the sampling loops (see the module docstring).

    Args:
        model: the Pyro model (a function or a ``PyroModule``); em: whether EM will act on its
            spike-and-slab sites; x, y: a batch of the training data (it traces the model);
        dataset_size: N; init_loc_fn: Pyro's initialisation strategy (default ``init_in_slab``).
    """

    default_spike_scale = None  # the prior's own σ₀: the user wrote it, and the initial values are prior draws

    def __init__(self, model: Callable, em: bool, x: torch.Tensor, y: torch.Tensor, dataset_size: int,
                 init_loc_fn: Callable | None = None):
        check_guide_model(model)
        self.device = x.device
        if isinstance(model, torch.nn.Module):
            tensors = [*model.parameters(), *model.buffers()]
            self.device = tensors[0].device if tensors else x.device
        example = (x.to(self.device), y.to(self.device))
        self.model = model
        sources = spike_and_slab_sources(model, example)
        priors = {id(prior): prior for prior in sources.values()}
        self.prior: Prior | None = None
        self.site_names: tuple[str, ...] = ()
        if em:
            if not sources:
                raise ValueError(
                    "em_sghmc needs sites drawn from a ps.priors.SpikeAndSlab prior: in the model, draw the "
                    "weights as pyro.sample('w', prior.distribution(shape)) with prior = ps.priors.SpikeAndSlab(), "
                    "or use sample_sghmc for SGHMC under the model's own priors"
                )
            if len(priors) > 1:
                raise ValueError(
                    f"the sites {sorted(sources)} draw from {len(priors)} different SpikeAndSlab objects; em_sghmc "
                    f"learns one shared set of hyperparameters (π, σ₁, σ₀ per site): draw them all from one prior"
                )
            self.prior = next(iter(priors.values()))
            self.site_names = tuple(sources)
        self.potential = PyroPotential(model, example, dataset_size=dataset_size,
                                       init_loc_fn=init_loc_fn or init_in_slab, without_prior=self.site_names)

    def sampler(self, **settings: Any) -> SGHMC:
        return sghmc(self.potential.log_joint, dataset_size=self.potential.dataset_size, sites=self.site_names,
                     **settings)

    def initial_site_values(self) -> dict[str, torch.Tensor]:
        return {name: self.potential.initial[name] for name in self.site_names}

    def chain_start(self, chain: int, seed: int) -> dict[str, torch.Tensor]:
        """Chain c starts at an ``init_loc_fn`` initialisation seeded by ``seed`` and c (so a run's seed fixes
        it, and chains start apart); EM's sites first (the sampler's site prefix)."""
        values = self.potential.initial_values(seed + 7919 * chain)
        ordered = {name: values[name] for name in self.site_names}
        ordered.update((name, value) for name, value in values.items() if name not in ordered)
        return {name: value.detach().clone() for name, value in ordered.items()}

    def posterior(self, samples: dict[str, torch.Tensor], chains: int, **kwargs: Any) -> PyroPosterior:
        """The kept draws (unconstrained, as sampled) mapped to the model's space."""
        constrained = {name: torch.stack([self.potential.constrain({name: value})[name] for value in values])
                       for name, values in samples.items()}
        weights = [name for name, site in self.potential.sites.items() if site.is_real]
        return PyroPosterior(self.model, constrained, chains, weight_sites=weights, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict() if isinstance(self.model, torch.nn.Module) else {}

    def train(self) -> None:
        if isinstance(self.model, torch.nn.Module):
            self.model.train()


def sampling_target(model: Any, em: bool, x: torch.Tensor, y: torch.Tensor,
                    dataset_size: int) -> NetworkTarget | PyroTarget:
    """The target for ``model``, checked on (or traced with) the batch x, y of a data set of N =
    ``dataset_size`` examples: a ``BayesianNetwork``, or any other Pyro model (a ValueError for a plain
    ``nn.Module``, with the way to wrap it)."""
    if isinstance(model, BayesianNetwork):
        return NetworkTarget(model, em, x, y, dataset_size)
    return PyroTarget(model, em, x, y, dataset_size)
