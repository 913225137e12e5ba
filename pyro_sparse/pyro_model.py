"""Any Pyro model: its latent sample sites, found by tracing it, as Pyro's ``AutoGuide`` does.

A guide of this package covers the latent sites of the model it is given. For a ``BayesianNetwork``
those are its Bayesian parameters (``model.sites``). For any other Pyro model — a function with
``pyro.sample`` statements, or a ``PyroModule`` with ``PyroSample`` priors (Pyro's own BNN idiom) —
``trace_sites`` runs the model once on example arguments and records every latent site: its name,
the shape of its value, its support, its event dimensions and the plates it sits in. Sites hidden
with ``poutine.block`` are not seen, so the guide leaves them to the model.

Sites with real support ("weights") get a masked mean-field Normal and can be pruned; constrained
sites (positive scales, probabilities, ...) get a Normal in the unconstrained space pushed through
``biject_to(support)``, as ``AutoNormal`` does, and are never pruned.

Local latent variables inside a *subsampled* plate (one value per data point) are refused: a
mean-field guide with one (μ, σ) per data point is the job of an amortised guide, not of this one.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import scale_and_mask
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .layers import substituted_parameters

InitLocFn = Callable[[dict[str, Any]], torch.Tensor]

AUXILIARY_SUFFIX = "_unconstrained"
"""A constrained site's unconstrained draw in a guide is the auxiliary site ``<name>_unconstrained``."""


@dataclass(frozen=True)
class Plate:
    """A plate a latent site sits in: the guide samples the site inside the same plate."""

    name: str
    size: int
    dim: int


@dataclass(frozen=True)
class TracedSite:
    """One latent sample site of a Pyro model.

    name: the site's name ("w", "fc1.weight"); shape: the shape of its value (plate dimensions
    included); unconstrained_shape: the shape of its value in the unconstrained space (differs for
    e.g. a simplex); event_dim: the model distribution's event dimensions; support: its support;
    plates: the plates it sits in.
    """

    name: str
    shape: torch.Size
    unconstrained_shape: torch.Size
    event_dim: int
    support: constraints.Constraint
    plates: tuple[Plate, ...]

    @property
    def is_real(self) -> bool:
        """True for a site with real support (a weight: prunable, closed-form KLs)."""
        return self.support is constraints.real or isinstance(self.support, constraints.independent) and \
            self.support.base_constraint is constraints.real

    @property
    def numel(self) -> int:
        return self.unconstrained_shape.numel()

    @property
    def unconstrained_event_dim(self) -> int:
        """Event dimensions of the unconstrained value (a transform may add or remove some)."""
        return self.event_dim + len(self.unconstrained_shape) - len(self.shape)

    def transform(self) -> torch.distributions.Transform:
        """The bijection from the unconstrained space onto the site's support."""
        return biject_to(self.support)


def trace_sites(
    model: Callable, args: tuple, kwargs: dict[str, Any], init_loc_fn: InitLocFn | None = None
) -> tuple[dict[str, TracedSite], dict[str, torch.Tensor]]:
    """Run ``model(*args, **kwargs)`` once and return its latent sites and their initial values.

    Args:
        model: a Pyro model (a callable with ``pyro.sample`` statements, a ``PyroModule``).
        args, kwargs: example arguments (e.g. a batch ``(x, y)``).
        init_loc_fn: Pyro's initialisation strategy (``pyro.infer.autoguide.init_to_*``); default
            ``init_to_median``: the median of a few prior draws, which breaks the symmetry of the
            hidden units of a network (``init_to_feasible`` would start every weight at 0).

    Returns:
        (site name -> TracedSite, site name -> initial value in the unconstrained space), in the
        order the model samples them.

    Raises:
        ValueError: the model has no latent site, a latent site sits in a subsampled plate, or one is discrete.
    """
    init_loc_fn = init_loc_fn or init_to_median
    with poutine.block():
        trace = poutine.trace(InitMessenger(init_loc_fn)(model)).get_trace(*args, **kwargs)
    sites, initial = {}, {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        if site["infer"].get("is_auxiliary"):
            continue
        value = site["value"].detach()
        plates = []
        for frame in site["cond_indep_stack"]:
            full_size = getattr(frame, "full_size", None) or frame.size
            if frame.vectorized and full_size != frame.size:
                raise ValueError(
                    f"latent site {name!r} sits in the subsampled plate {frame.name!r} (size {full_size}, "
                    f"{frame.size} drawn): local latent variables need an amortised guide; hide the site "
                    f"from this guide with poutine.block(model, hide=[{name!r}]) and give it a guide of its own"
                )
            if frame.vectorized:
                plates.append(Plate(frame.name, int(frame.size), int(frame.dim)))
        support = site["fn"].support
        if support.is_discrete:
            raise ValueError(
                f"latent site {name!r} is discrete ({type(site['fn']).__name__}): these guides and samplers need "
                f"continuous latent sites; marginalise it out (pyro.infer.config_enumerate with TraceEnum_ELBO) or "
                f"hide it with poutine.block(model, hide=[{name!r}]) and give it a guide of its own"
            )
        unconstrained = biject_to(support).inv(value).detach()
        sites[name] = TracedSite(name, value.shape, unconstrained.shape, int(site["fn"].event_dim), support,
                                 tuple(plates))
        initial[name] = unconstrained
    if not sites:
        raise ValueError("the model has no latent sample site to put a guide on (every site is observed or hidden)")
    return sites, initial


def data_scale(site: dict[str, Any], dataset_size: int, batch_size: int) -> float | torch.Tensor:
    """The factor that takes an observed site's batch log-likelihood to the whole data set's: the site's
    own scale when the model sets one (a ``pyro.plate`` with ``subsample``/``subsample_size``), N / B
    for a model written for the batch it is given (``pyro.plate("data", len(x))``)."""
    scale = site["scale"]
    if not torch.is_tensor(scale) and float(scale) == 1.0:
        return dataset_size / batch_size
    return scale


def log_prob_sum(site: dict[str, Any]) -> torch.Tensor:
    """Σ log p of a traced site's value, with the site's mask but without its scale."""
    return scale_and_mask(site["fn"].log_prob(site["value"]), mask=site["mask"]).sum()


class PyroPotential:
    """The log joint of any Pyro model in the unconstrained space: the target of ``infer.sghmc``.

    ``log_joint(params, batch)`` with ``params`` = site name -> unconstrained value u and ``batch`` = the
    model's arguments on B of the N examples (e.g. ``(x, y)``) is the unbiased minibatch estimate

        Σ_latent [log p(T(u)) + log |det ∂T/∂u|] + (N / B) Σ_observed log p(y | ·)

    with T = biject_to(support) per site (the identity for weights), the data term scaled as in
    ``data_scale``. The learnable parameters of a ``PyroModule`` (e.g. the biases of ``PyroModule[nn.Linear]``
    layers whose weights are ``PyroSample`` s) are sampled too, under a flat prior, by their module path
    (as ``BayesianNetwork``'s deterministic parameters are). ``initial`` holds the starting values
    (``init_loc_fn``, default the median of a few prior draws; the module's parameters as they are) and
    ``constrain`` maps draws back to the model's space for ``pyro.infer.Predictive``::

        potential = PyroPotential(model, (x[:64], y[:64]), dataset_size=len(x))
        sampler = ps.infer.sghmc(potential.log_joint, 1e-3, dataset_size=len(x), burn_in=200)
        state = sampler.init(potential.initial)
        ...
        draws = potential.constrain(state.params)

    Args:
        model: a Pyro model; args, kwargs: example arguments (a batch) to trace it with;
        dataset_size: N; init_loc_fn: Pyro's initialisation strategy;
        without_prior: sites whose prior density is left out of ``log_joint`` (EM-SGHMC supplies their
            prior gradient itself, as an adaptive L2 term).

    Raises:
        ValueError: the model has a ``pyro.param`` (or ``PyroParam``) statement: a sampler needs a prior on
            every quantity it samples.
    """

    def __init__(self, model: Callable, args: tuple, kwargs: dict[str, Any] | None = None, *, dataset_size: int,
                 init_loc_fn: InitLocFn | None = None, without_prior: Collection[str] = ()):
        if int(dataset_size) != dataset_size or dataset_size < 1:
            raise ValueError(f"dataset_size must be a positive integer, got {dataset_size!r}")
        self.model, self.dataset_size = model, int(dataset_size)
        self.args, self.kwargs, self.init_loc_fn = args, kwargs or {}, init_loc_fn
        self.sites, site_values = trace_sites(model, args, self.kwargs, init_loc_fn)
        self.transforms = {name: site.transform() for name, site in self.sites.items()}
        unknown = sorted(set(without_prior) - set(self.sites))
        if unknown:
            raise ValueError(f"without_prior names {unknown}, which are not latent sites of the model")
        self.without_prior = frozenset(without_prior)
        module_parameters = dict(model.named_parameters()) if isinstance(model, torch.nn.Module) else {}
        statements = sorted(set(model_parameters(model, args, self.kwargs)) - set(module_parameters))
        if statements:
            raise ValueError(
                f"the model learns {statements} with pyro.param (or PyroParam): a sampler draws every quantity "
                f"from its posterior and needs a prior on it; make each a pyro.sample site with a prior (e.g. "
                f"pyro.sample({statements[0]!r}, dist.HalfNormal(1.0)) for a scale)"
            )
        self.parameter_paths = tuple(module_parameters)
        self.initial = site_values | {path: value.detach().clone() for path, value in module_parameters.items()}

    def initial_values(self, seed: int) -> dict[str, torch.Tensor]:
        """Fresh starting values (as ``initial``), the sites initialised again under ``seed`` (chains
        that start apart, for R-hat); the module's parameters as they are."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, site_values = trace_sites(self.model, self.args, self.kwargs, self.init_loc_fn)
        return site_values | {path: self.initial[path].clone() for path in self.parameter_paths}

    @torch.no_grad()
    def constrain(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unconstrained values -> the model's values (site name -> a new tensor: the sampler's
        ``state.params`` are views of its position, which the next step overwrites); the module's
        parameters, by path, unchanged."""
        return {name: (self.transforms[name](value) if name in self.transforms else value).clone()
                for name, value in params.items()}

    def log_joint(self, params: dict[str, torch.Tensor], batch: tuple) -> torch.Tensor:
        """The minibatch estimate of log p(θ, D) (see the class); differentiable in ``params``."""
        values, log_jacobian = {}, 0.0
        for name, transform in self.transforms.items():
            unconstrained = params[name]
            values[name] = transform(unconstrained)
            log_jacobian = log_jacobian + transform.log_abs_det_jacobian(unconstrained, values[name]).sum()
        substituted = {path: params[path] for path in self.parameter_paths}
        with poutine.block(), substituted_parameters(self.model, substituted):
            trace = poutine.trace(poutine.condition(self.model, data=values)).get_trace(*batch)
        batch_size = len(batch[0])
        total = log_jacobian
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if name in values:
                if name not in self.without_prior:
                    total = total + site["scale"] * log_prob_sum(site)
            elif site["is_observed"]:
                total = total + data_scale(site, self.dataset_size, batch_size) * log_prob_sum(site)
        return total


def spike_and_slab_sources(model: Callable, args: tuple, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The latent sites of ``model`` drawn from a ``priors.SpikeAndSlab`` object, site name -> that object.

    A site counts when its distribution (under ``Independent`` / expansion) is a ``SpikeAndSlabNormal``
    made by ``prior.distribution(shape)`` (it remembers its prior; the prior holds the hyperparameters
    EM learns). A ``SpikeAndSlabNormal`` built by hand has no such object: a ValueError says how to make one.
    """
    from .distributions import SpikeAndSlabNormal

    with poutine.block():
        trace = poutine.trace(model).get_trace(*args, **(kwargs or {}))
    sources = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        fn = site["fn"]
        while not isinstance(fn, SpikeAndSlabNormal) and hasattr(fn, "base_dist"):
            fn = fn.base_dist
        if not isinstance(fn, SpikeAndSlabNormal):
            continue
        if fn.source is None:
            raise ValueError(
                f"site {name!r} draws from a SpikeAndSlabNormal built by hand: EM needs the prior object that "
                f"holds the hyperparameters it learns; draw it as pyro.sample({name!r}, prior.distribution(shape)) "
                f"with prior = ps.priors.SpikeAndSlab(...)"
            )
        sources[name] = fn.source
    return sources


class _MaskSites(Messenger):
    """Masks pruned coordinates out of the model's log density: at a site with a mask (``masks()`` holds
    the sites with pruned weights only), the model's ``Independent(base, k)`` becomes
    ``Independent(base.mask(mask), k)``."""

    def __init__(self, masks: Callable[[], dict[str, torch.Tensor]]):
        super().__init__()
        self._masks = masks

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        mask = self._masks().get(msg["name"])
        if mask is None or msg["is_observed"]:
            return
        fn = msg["fn"]
        event_dim = fn.event_dim
        base = fn.base_dist if isinstance(fn, pyro.distributions.Independent) else fn
        if base.event_dim != 0:
            raise ValueError(f"site {msg['name']!r}: pruning needs a prior that factorises over the coordinates "
                             f"(e.g. Normal(...).expand(shape).to_event(k)), got {type(fn).__name__}")
        msg["fn"] = base.mask(mask).to_event(event_dim)


def masked_model(model: Callable, masks: Callable[[], dict[str, torch.Tensor]]) -> Callable:
    """``model`` with the coordinates where ``masks()[site]`` is False left out of its log density.

    A pruned weight is an exact zero in every guide draw; leaving its prior density log p(0) in the
    model would add a constant that drifts with the prior's hyperparameters (and an infinite KL for a
    point mass). ``guide.masked_model(model)`` is this with the guide's own masks.
    """
    return _MaskSites(masks)(model)


def model_parameters(model: Callable, args: tuple, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The learnable parameters of a Pyro model itself (not of its guide), by name: an ``nn.Module``'s
    (a ``PyroModule``'s non-random parameters) and the unconstrained tensors of its ``pyro.param``
    statements, found by running it once on ``args``."""
    found: dict[str, torch.Tensor] = {}
    if isinstance(model, torch.nn.Module):
        found.update(model.named_parameters())
    with poutine.block():
        trace = poutine.trace(model, param_only=True).get_trace(*args, **kwargs)
    known = {id(tensor) for tensor in found.values()}
    for name, site in trace.nodes.items():
        if site["type"] == "param":
            tensor = site["value"].unconstrained()
            if id(tensor) not in known:
                found[name] = tensor
                known.add(id(tensor))
    return found
