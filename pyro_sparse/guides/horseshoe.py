"""The variational side of the node-wise horseshoe (``priors.NodeHorseshoe``): unit scales under q, the
fused objective's draw of them, and pruning units by their posterior scale.

The family is the package's mean-field one (``MeanField``, ``SNRPruned``): β ~ N(μ, σ²) per weight
(masked like any weight site), and every scale site log-normal, log λ_k, log υ, log c² ~ N(m, s²)
(a Normal in the unconstrained space, as for any positive site). Under q the network's weights are
w = τ̃ β with

    τ̃_k = (c² λ_k² υ² / (c² + λ_k² υ²))^½        (``priors.regularized_scale``)

- ``guide.sample_weights()`` (a ``BayesianNetwork``'s guide): w at one joint draw of β and the scales;
- ``guide.mean_weights()``: w = μ_β τ̃ with τ̃ at q's median of the scales, the network ``ps.evaluate``,
  ``ps.sparse.export`` and ``Posterior`` use as the posterior-mean one. (The mean of τ̃ under q differs
  from it by a factor of about exp(s²/2) per scale; the median is what the pruning score uses and what
  ``guide.median()`` reports for the scale sites, so the three agree.)
- ``unit_scales(guide)``: τ̃_k at q's median, per weight site (out,): the pruning score.
- ``draw_unit_scales(guide, prior)``: one draw of every τ̃ and the Monte Carlo KL of the scale sites at
  it, log q(u) − log |∂T/∂u| − log p(T(u)), u the log-scale, T = exp: ``infer.elbo.negative_elbo`` runs
  the local reparameterization of each Linear layer given that draw (pre-activation moments
  x·(μ_β τ̃), x²·(σ_β² τ̃²)) and the closed-form KL of β against N(0, 1), so that in expectation it is
  Pyro's ``Trace_ELBO`` of (model, guide).

For a hand-written model (``priors.node_horseshoe_weight``) the guide traces the model: β is a weight
site, the scales constrained sites; ``mean_weights()`` there are the sites' values (β), since the model
computes w itself when it is replayed or conditioned (``Predictive``, ``ps.evaluate``).

Deviations from Ghosh, Yao & Doshi-Velez (JMLR 2019), and why:

- The half-Cauchy scales are latent sites as they are, with a log-normal q and a Monte Carlo KL. The
  paper writes each half-Cauchy as an inverse-gamma scale mixture with auxiliary variables, closed-form
  KLs and fixed-point updates. Keeping the model the plain Pyro model of the stated prior lets Pyro's
  ``Trace_ELBO`` estimate exactly the objective ``fit`` optimises; the price is Monte Carlo noise in the
  KL of the few scale sites (out + 2 numbers per layer).
- Mean-field over β, λ, υ and c², not the paper's structured families (the product λ_k υ as one
  log-normal; rows of β coupled): the package keeps one masked mean-field core (DESIGN.md).
- Biases stay deterministic and unscaled, as under every prior here (the paper scales the whole
  pre-activation, bias included): a switched-off unit outputs act(b_k) rather than act(0).
- Every Bayesian weight site gets the horseshoe, the output layer's too (the authors' code gives the
  output layer a Gaussian prior); units of the output layer are never pruned (``prune_units`` prunes
  the unit groups of ``units.unit_groups``, which leave out the channels that reach the output).
- A pruned unit keeps its scale site λ_k in the model and the guide (both, so the objectives still
  agree); its weights are gone, so it no longer affects the fit.
- The guide starts where the network's own initialisation is: λ = 1, c² = s², υ = the standard
  deviation of the layer's initial weights, β = w₀ / τ̃ (``NodeHorseshoe.latent_sites``); a traced
  model's scales start at ``NodeHorseshoe.initial_scales`` (υ = 1/√fan_in). Starting at the prior's
  median (υ = b_g = 1e-5) would start a dead network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pyro.infer.autoguide.initialization import init_to_median

from ..priors import INIT_HINT, SCALE_SITES, NodeHorseshoe, regularized_scale

if TYPE_CHECKING:
    from .meanfield import MeanField

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class ScaleSites:
    """The names of the scale sites of one weight site ``W``: ``W.unit_scale`` (out,), ``W.layer_scale``
    and ``W.slab`` (scalars)."""

    unit_scale: str
    layer_scale: str
    slab: str


def horseshoe_sites(guide: MeanField) -> dict[str, ScaleSites]:
    """Weight site name -> its ``ScaleSites``, for every weight site of the guide's model that sits under a
    node-wise horseshoe (all three scale sites present); {} for other models."""
    constrained = guide.constrained_info
    found = {}
    for name in guide.site_info:
        names = [f"{name}.{role}" for role in SCALE_SITES]
        if all(site in constrained for site in names):
            found[name] = ScaleSites(*names)
    return found


def _unit_shape(guide: MeanField, name: str) -> tuple[int, ...]:
    """(out, 1, ..., 1): τ̃ (out,) broadcast over the incoming weights of each unit of site ``name``."""
    shape = guide.site(name).shape
    return (shape[0], *([1] * (len(shape) - 1)))


def draw_unit_scales(
    guide: MeanField, prior: NodeHorseshoe | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor | float]:
    """One joint draw of every horseshoe scale from q (differentiable, reparameterized).

    Returns:
        (weight site -> τ̃ of shape (out, 1, ..., 1), broadcastable to the weight; the Monte Carlo KL of
        the scale sites at this draw, Σ [log q(u) − u − log p(eᵘ)] over every scale, u = its log: a 0-dim
        tensor, or 0.0 without ``prior`` or without horseshoe sites). Its expectation is the exact
        KL(q ‖ p) of the scale sites, as Pyro's ``Trace_ELBO`` estimates it.
    """
    scales, kl = {}, 0.0
    for name, sites in horseshoe_sites(guide).items():
        logs = {}
        for role, site_name in zip(SCALE_SITES, (sites.unit_scale, sites.layer_scale, sites.slab), strict=True):
            q = guide.constrained_site(site_name)
            scale = q.scale()
            noise = torch.randn_like(q.loc)
            logs[role] = torch.addcmul(q.loc, scale, noise)
            if prior is not None:
                log_q = (-0.5 * noise * noise - scale.log() - _HALF_LOG_2PI).sum()
                kl = kl + log_q - logs[role].sum() - prior.log_prob_scales(role, logs[role])
        tau = regularized_scale(logs["unit_scale"], logs["layer_scale"], logs["slab"])
        scales[name] = tau.reshape(_unit_shape(guide, name))
    return scales, kl


def _median_unit_scales(guide: MeanField) -> dict[str, torch.Tensor]:
    """Weight site -> τ̃ at q's median of its scale sites (differentiable), shape (out, 1, ..., 1)."""
    scales = {}
    for name, sites in horseshoe_sites(guide).items():
        logs = [guide.constrained_site(site).loc for site in (sites.unit_scale, sites.layer_scale, sites.slab)]
        scales[name] = regularized_scale(*logs).reshape(_unit_shape(guide, name))
    return scales


def network_weights(guide: MeanField, values: Mapping[str, torch.Tensor], sample: bool) -> dict[str, torch.Tensor]:
    """The network's weights w = τ̃ β from values β of the weight sites: τ̃ at one draw from q (``sample``)
    or at q's median; sites without a horseshoe are returned as they are."""
    scales = draw_unit_scales(guide)[0] if sample else _median_unit_scales(guide)
    return {name: value * scales[name] if name in scales else value for name, value in values.items()}


@torch.no_grad()
def unit_scales(guide: MeanField) -> dict[str, torch.Tensor]:
    """Each unit's posterior scale: weight site -> τ̃_k at q's median of the scale sites (out,), detached;
    0 for a unit whose incoming weights are all pruned. {} when the model has no horseshoe sites."""
    scores = {}
    for name, tau in _median_unit_scales(guide).items():
        mask = guide.site(name).mask
        alive = mask.reshape(mask.shape[0], -1).any(1)
        scores[name] = torch.where(alive, tau.reshape(-1), torch.zeros_like(tau.reshape(-1)))
    return scores


SCOPES = ("layer", "global")


@torch.no_grad()
def prune_units(
    guide: MeanField,
    threshold: float | None = None,
    sparsity: float | None = None,
    scope: str = "layer",
    sites: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Remove the units of smallest posterior scale τ̃_k (``unit_scales``). Exactly one of ``threshold`` /
    ``sparsity``.

    For a ``BayesianNetwork``'s guide the units are its removable unit groups (``units.unit_groups``: the
    output layer's units are never among them); a group's score per unit is the largest τ̃_k of its
    Bayesian producer layers (channels tied by a residual addition go together), and removal goes
    through ``guide.set_unit_mask`` (incoming weights, bias, BatchNorm channel and the next layers'
    inputs). For a traced Pyro model the units are the rows of its horseshoe weight sites (``sites``;
    default all but the last the model samples, the output layer of a feed-forward model), and a
    removed unit loses its incoming weights (``guide.set_mask``; the model's readers of it are not known).

    Args:
        threshold: remove every unit with τ̃_k < threshold × the largest τ̃ of its layer (group), in (0, 1]:
            relative, since each layer has its own global scale υ.
        sparsity: the fraction in [0, 1) of units to remove: round(sparsity · n) of each layer's n units
            (``scope="layer"``, default) or of all units ranked together by their relative scale
            τ̃_k / max τ̃ of their layer (``"global"``); ties by position.
        sites: a traced model's weight sites whose units may go (a ``BayesianNetwork`` prunes its
            removable unit groups and takes no ``sites``).

    Units removed before stay removed and every layer keeps its best unit. Returns name (unit group, or
    weight site of a traced model) -> bool (units,), True = removed by this call.
    """
    if (threshold is None) == (sparsity is None):
        raise ValueError("prune_units needs exactly one of threshold= (relative to the layer's largest scale) and "
                         "sparsity= (the fraction of units to remove)")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                                  or not 0 < threshold <= 1):
        raise ValueError(f"threshold must lie in (0, 1] (relative to the layer's largest scale), got {threshold!r}")
    if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, int | float)
                                 or not 0 <= sparsity < 1):
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    scales = unit_scales(guide)
    if not scales:
        raise ValueError("prune_units needs a model under the node-wise horseshoe (ps.priors.NodeHorseshoe, or "
                         "ps.priors.node_horseshoe_weight in a Pyro model): this guide has no unit scale sites")
    network = guide.traced_model is None
    if network and sites is not None:
        raise ValueError("sites= is for a traced Pyro model; a BayesianNetwork's guide prunes its unit groups")
    if network:
        scores, kept = _unit_scores(guide, scales)
    else:
        chosen = list(scales)[:-1] if sites is None else list(sites)
        unknown = sorted(set(chosen) - set(scales))
        if unknown or not chosen:
            raise ValueError(f"sites must name some of the horseshoe weight sites {list(scales)}, got "
                             f"{unknown or chosen}")
        scores = {name: scales[name] for name in chosen}
        kept = {name: score > 0 for name, score in scores.items()}
    relative = {name: torch.where(kept[name], score / score.max().clamp(min=torch.finfo(score.dtype).tiny), -1.0)
                for name, score in scores.items()}  # units removed before rank first and stay removed
    if threshold is not None:
        remove = {name: score < threshold for name, score in relative.items()}
    elif scope == "layer":
        remove = {name: _lowest(score, round(sparsity * score.numel())) for name, score in relative.items()}
    else:
        flat = torch.cat(list(relative.values()))
        parts = _lowest(flat, round(sparsity * flat.numel())).split([s.numel() for s in relative.values()])
        remove = dict(zip(relative, parts, strict=True))
    selected = {}
    for name, removed in remove.items():
        removed = removed | ~kept[name]
        if bool(removed.all()):
            removed[int(relative[name].argmax())] = False
        selected[name] = removed & kept[name]
        if not bool(selected[name].any()):
            continue
        if network:
            guide.set_unit_mask(name, ~removed)
        else:
            mask = guide.site(name).mask
            guide.set_mask(name, mask & ~removed.reshape(-1, *([1] * (mask.dim() - 1))))
    return selected


def _unit_scores(guide: MeanField, scales: Mapping[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Unit group -> the largest τ̃_k over its horseshoe producer layers (size,), and -> its keep mask."""
    sites_of = {info.module_path: name for name, info in guide.site_info.items()
                if getattr(info, "attribute", None) == "weight"}
    scores = {}
    for group_name, group in guide.unit_groups().items():
        parts = [scales[sites_of[path]] for path in group.producers if sites_of.get(path) in scales]
        if parts:
            scores[group_name] = torch.stack(parts).amax(0)
    if not scores:
        raise ValueError("no unit group has a horseshoe producer layer: nothing to prune by scale")
    return scores, {name: guide.unit_keep_mask(name) for name in scores}


def _lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the ``count`` lowest entries of ``score`` (ties by position)."""
    chosen = torch.zeros_like(score, dtype=torch.bool)
    chosen[torch.argsort(score, stable=True)[:count]] = True
    return chosen


def init_to_hint(fallback: Callable[[dict[str, Any]], torch.Tensor] | None = None
                 ) -> Callable[[dict[str, Any]], torch.Tensor]:
    """Pyro's ``init_loc_fn`` that starts a site at the value in its ``infer[priors.INIT_HINT]`` (the
    horseshoe's scale sites carry one) and every other site by ``fallback`` (default ``init_to_median``)."""
    fallback = fallback or init_to_median

    def init(site: dict[str, Any]) -> torch.Tensor:
        hint = site["infer"].get(INIT_HINT)
        return hint.detach().clone() if hint is not None else fallback(site)

    return init


__all__ = ["ScaleSites", "draw_unit_scales", "horseshoe_sites", "init_to_hint", "network_weights", "prune_units",
           "unit_scales"]
