"""The fused objective on Pyro's own BNN idiom, without wrapping the network in a ``BayesianNetwork``.

A ``PyroModule`` whose latent sites are all ``PyroSample`` weights (and biases) of ``nn.Linear`` /
``nn.Conv*`` layers, each under a zero-mean Gaussian (``dist.Normal(0., s).expand(shape).to_event(k)``,
one scalar s) or a ``ps.priors`` distribution (``Gaussian(s)`` / ``SpikeAndSlab(...)``'s
``prior.distribution(shape)``), gets the objective a ``BayesianNetwork`` gets (``infer.elbo``):

    −ELBO / N = (−Σ_obs s · log p(y | ·) + β · Σ_sites KL(q ‖ p)) / N,

- the KL in closed form from the guide's (μ, σ) (``site.moments_and_kl(prior)``; for spike-and-slab
  the bound ``TraceMeanField_ELBO`` uses), masked weights out of it;
- Linear layers called once per model call on (B, D) inputs sample their pre-activations
  N(x·μ, x²·σ²) per example (local reparameterization); every other site, e.g. a convolution's
  weight, is drawn once per batch and handed to the model's ``pyro.sample`` statement;
- the data term from the model's own observed sites, with the scale ``infer.pyro_elbo`` gives them
  (``pyro_model.data_scale``), summed by a light handler instead of a full trace.

In expectation this is ``traced_negative_elbo`` (and Pyro's ``TraceMeanField_ELBO``) divided by N.
``fused_objective`` recognises such a model on one batch and returns None for any other (a
non-Gaussian prior, a latent site that is not a layer's weight, a learned noise scale), for which
``fit`` runs the traced objective.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn

from ..distributions import SpikeAndSlabNormal
from ..guides.meanfield import MeanField, SiteMoments
from ..priors import Gaussian, Prior, SpikeAndSlab
from ..pyro_model import data_scale, log_prob_sum
from .elbo import ElboTerms

_VARIANCE_FLOOR = 1e-16  # as layers.LocalReparameterization


@dataclass(frozen=True)
class LayerSite:
    """A latent site of the model: the ``PyroSample`` attribute ("weight" / "bias") of ``layer``, its prior."""

    name: str
    layer: nn.Module
    attribute: str
    prior: Prior


class UnexpectedSite(RuntimeError):
    """A latent site the fused objective has no value for was sampled (``name``)."""

    def __init__(self, name: str):
        super().__init__(f"latent site {name!r} was sampled, but fit did not see the model read it as a layer's "
                         f"weight when it recognised the model on its first batch")
        self.name = name


class _GivenValues(Messenger):
    """Latent sites take the values in ``values`` (site name -> tensor); their densities are not computed.
    Any other latent site raises ``UnexpectedSite``: the model is not the one that was recognised."""

    def __init__(self, values: Mapping[str, torch.Tensor]):
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        if msg["is_observed"] or site_is_subsample(msg):
            return
        try:
            msg["value"] = self.values[msg["name"]]
        except KeyError:
            raise UnexpectedSite(msg["name"]) from None


class _ObservedLogLikelihood(Messenger):
    """Sums s · log p(y | ·) over the observed sites, s = ``data_scale`` (the data term scaled to N examples)."""

    def __init__(self, dataset_size: int, batch_size: int, zero: torch.Tensor):
        super().__init__()
        self.dataset_size, self.batch_size = dataset_size, batch_size
        self.total = zero

    def _pyro_post_sample(self, msg: dict[str, Any]) -> None:
        if not msg["is_observed"] or site_is_subsample(msg) or msg["infer"].get("_deterministic"):
            return
        self.total = self.total + data_scale(msg, self.dataset_size, self.batch_size) * log_prob_sum(msg)


def _sampled_linear(layer: nn.Linear, weight: SiteMoments, bias: SiteMoments | None, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s output for x with weights w ~ q: for x (B, D), pre-activations N(x·μ + μ_b, x²·σ² + σ_b²)
    sampled per example (B, out); for any other shape one draw of w (and b) shared by the batch."""
    if x.dim() != 2:
        drawn_bias = layer.bias if bias is None else torch.addcmul(bias.loc, bias.scale, torch.randn_like(bias.loc))
        return F.linear(x, torch.addcmul(weight.loc, weight.scale, torch.randn_like(weight.loc)), drawn_bias)
    bias_loc, bias_var = (layer.bias, None) if bias is None else (bias.loc, bias.var)
    mean = F.linear(x, weight.loc, bias_loc)
    var = F.linear(x * x, weight.var, bias_var)
    return torch.addcmul(mean, (var + _VARIANCE_FLOOR).sqrt(), torch.randn_like(mean))


@contextlib.contextmanager
def _sampled_preactivations(layers: Mapping[nn.Linear, tuple[SiteMoments, SiteMoments | None]]) -> Iterator[None]:
    """Within the block, each Linear layer of ``layers`` (-> moments of its weight and, if a site, its bias)
    computes ``_sampled_linear`` instead of its forward (an instance attribute, removed afterwards)."""
    try:
        for layer, (weight, bias) in layers.items():
            layer.forward = functools.partial(_sampled_linear, layer, weight, bias)
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


class PyroModuleElbo:
    """``fit``'s objective for a recognised ``PyroModule`` (see the module docstring; built by ``fused_objective``).

    Args:
        sites: site name -> ``LayerSite``, every latent site of the model.
        local_reparameterization: the names of the Linear weight sites whose layers sample pre-activations
            (their bias sites go with them).
        dataset_size: N.

    Called as ``objective(model, guide, x, y, kl_weight=β, kl="bound")`` like ``traced_negative_elbo``.
    """

    def __init__(self, sites: Mapping[str, LayerSite], local_reparameterization: set[str], dataset_size: int):
        self.sites = dict(sites)
        self.dataset_size = dataset_size
        self.lrt_layers = {self.sites[name].layer: (name, self._bias_site(self.sites[name].layer))
                           for name in local_reparameterization}
        self.lrt_sites = {name for pair in self.lrt_layers.values() for name in pair if name is not None}

    def _bias_site(self, layer: nn.Module) -> str | None:
        return next((name for name, site in self.sites.items() if site.layer is layer and site.attribute == "bias"),
                    None)

    def __call__(self, model: PyroModule, guide: MeanField, x: torch.Tensor, y: torch.Tensor,
                 kl_weight: float = 1.0, kl: str = "bound") -> ElboTerms:
        """One-sample estimate of −ELBO / N on x (B, ...), y (B, ...): ``ElboTerms`` as ``traced_negative_elbo``'s."""
        if kl != "bound":
            raise ValueError(f"the fused objective computes the closed-form KL (kl='bound'), got kl={kl!r}")
        zero = next(guide.parameters()).new_zeros(())  # in the guide's dtype (x may hold integers)
        moments, draws, kl_total = {}, {}, zero
        for name, guide_site in guide.named_sites():
            moments[name], site_kl = guide_site.moments_and_kl(self.sites[name].prior)
            kl_total = kl_total + site_kl
            if name not in self.lrt_sites:
                q = moments[name]
                draws[name] = torch.addcmul(q.loc, q.scale, torch.randn_like(q.loc))
        preactivations = {layer: (moments[weight], moments[bias] if bias is not None else None)
                          for layer, (weight, bias) in self.lrt_layers.items()}
        likelihood = _ObservedLogLikelihood(self.dataset_size, len(x), zero)
        with _sampled_preactivations(preactivations), likelihood, _GivenValues(draws):
            output = model(x, y)
        data_term = likelihood.total
        loss = (-data_term + kl_weight * kl_total) / self.dataset_size
        return ElboTerms(loss=loss, nll=(-data_term / self.dataset_size).detach(), kl=kl_total.detach(),
                         output=output if torch.is_tensor(output) else None)


# ----------------------------------------------------------------------------------------------
# Recognition
# ----------------------------------------------------------------------------------------------
def fused_objective(model: Any, guide: MeanField, example_args: tuple, dataset_size: int,
                    kl: str = "bound") -> PyroModuleElbo | None:
    """The fused objective of ``model`` under ``guide`` (set up), or None when the model does not qualify.

    ``model`` qualifies when it is a ``PyroModule`` run as ``model(x, y)`` whose latent sites, on the
    example batch ``example_args`` = (x (B, ...), y (B, ...)), are exactly the guide's weight sites and each
    is the ``PyroSample`` weight or bias of an ``nn.Linear`` / ``nn.Conv*`` layer, outside every plate and
    unscaled, under a prior that ``site_prior`` recognises; ``kl`` must be "bound" (else None: "mc" runs
    Pyro's traces). A Linear layer samples pre-activations when the probe saw it called once, on a 2-d
    input, and nothing else read its weight.
    """
    if kl != "bound" or not isinstance(model, PyroModule) or guide.constrained_info or not guide.is_set_up:
        return None
    calls: dict[nn.Module, list[int]] = {}  # a Linear layer -> the dimension of its input at each call

    def record_call(layer: nn.Module, args: tuple) -> None:
        calls.setdefault(layer, []).append(args[0].dim() if args and torch.is_tensor(args[0]) else -1)

    hooks = [layer.register_forward_pre_hook(record_call) for layer in model.modules() if isinstance(layer, nn.Linear)]
    try:
        with poutine.block(), torch.no_grad():
            trace = poutine.trace(model).get_trace(*example_args)
    finally:
        for hook in hooks:
            hook.remove()
    owners = _pyro_sample_owners(model)
    sites = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        layer_site = _layer_site(name, site, owners, guide)
        if layer_site is None:
            return None
        sites[name] = layer_site
    if set(sites) != set(guide.site_info):
        return None
    like = next(guide.parameters())
    for site in sites.values():
        site.prior.to(device=like.device, dtype=like.dtype)
    lrt = {name for name, site in sites.items()
           if site.attribute == "weight" and isinstance(site.layer, nn.Linear)
           and type(site.layer).forward is nn.Linear.forward and calls.get(site.layer) == [2]}
    return _checked(model, guide, sites, lrt, example_args, dataset_size)


def _checked(model: PyroModule, guide: MeanField, sites: dict[str, LayerSite], lrt: set[str], example_args: tuple,
             dataset_size: int) -> PyroModuleElbo | None:
    """Run the objective once on the example batch; a layer whose weight the model reads outside the layer's
    own call (its site is sampled although the layer samples its pre-activations) draws weights instead."""
    while True:
        objective = PyroModuleElbo(sites, lrt, dataset_size)
        try:
            with poutine.block(), torch.no_grad():
                objective(model, guide, *example_args)
        except UnexpectedSite as error:
            layer = sites[error.name].layer if error.name in sites else None
            demoted = {weight for weight in lrt if sites[weight].layer is layer}
            if not demoted:
                return None
            lrt -= demoted
            continue
        return objective


def _pyro_sample_owners(model: PyroModule) -> dict[str, tuple[nn.Module, str]]:
    """Full site name -> (module, attribute) of every ``PyroSample`` attribute of the model's PyroModules."""
    owners = {}
    for module in model.modules():
        if isinstance(module, PyroModule) and module.__dict__["_pyro_context"].used:
            for attribute in module._pyro_samples:
                owners[module._pyro_get_fullname(attribute)] = (module, attribute)
    return owners


def _layer_site(name: str, site: dict[str, Any], owners: Mapping[str, tuple[nn.Module, str]],
                guide: MeanField) -> LayerSite | None:
    """The ``LayerSite`` of a traced latent site, or None when it is not a qualifying layer weight."""
    if name not in owners or name not in guide.site_info or site["cond_indep_stack"] or site["mask"] is not None:
        return None
    if torch.is_tensor(site["scale"]) or site["scale"] != 1.0:
        return None
    layer, attribute = owners[name]
    if not isinstance(layer, nn.Linear | nn.modules.conv._ConvNd) or attribute not in ("weight", "bias"):
        return None
    if not tuple(site["fn"].shape()) == tuple(site["value"].shape) == tuple(guide.site_info[name].shape):
        return None
    prior = site_prior(site["fn"])
    return None if prior is None else LayerSite(name, layer, attribute, prior)


def site_prior(fn: dist.TorchDistribution) -> Prior | None:
    """The ``ps.priors`` object equal to a site's distribution, coordinate by coordinate: ``Gaussian(s)`` for
    N(0, s²) (any ``expand`` / ``to_event``, one scalar s), ``SpikeAndSlab`` for a ``SpikeAndSlabNormal``
    with one value of each hyperparameter; None for anything else. The values are read now (``fit`` reads
    them once, when it starts)."""
    base = fn
    while isinstance(base, dist.Independent | torch.distributions.Independent):
        base = base.base_dist
    if type(base) in (dist.Normal, torch.distributions.Normal):
        scale = _one_value(base.scale)
        if scale is None or scale <= 0 or bool((base.loc != 0).any()):
            return None
        return Gaussian(scale)
    if type(base) is SpikeAndSlabNormal:
        values = [_one_value(tensor) for tensor in (base.slab_scale, base.spike_scale, base.inclusion)]
        if None in values or not 0 < values[1] < values[0] or not 0 < values[2] < 1:
            return None
        return SpikeAndSlab(*values)
    return None


def _one_value(tensor: torch.Tensor) -> float | None:
    """The value of a tensor all of whose entries are equal (e.g. an expanded scalar), else None."""
    first = tensor.reshape(-1)[0]
    return float(first) if bool((tensor == first).all()) else None
