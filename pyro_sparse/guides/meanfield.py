"""MeanField: the masked mean-field Gaussian guide that every variational family here builds on.

q(w) = Π_sites Π_i [m_i N(w_i; μ_i, σ_i²) + (1 − m_i) δ₀(w_i)], σ = softplus(ρ), with a boolean
mask m per site. Dense VI keeps every mask full; SNR pruning and sparse-subspace VI only change
the masks (and, for SSVI, which coordinates are stored). Masked weights have μ = σ = 0: every
sample, prediction, KL and gradient treats them as removed.

The masks live here and nowhere else: the guide registers itself with its model
(``BayesianNetwork.use_masks``), which reads ``masks()`` at every call and masks pruned weights
out of its log density, so Pyro's ``Trace_ELBO`` sees the same objective as ``fit``.

Two storages of a site, with one interface (``mask``, ``scale()``, ``is_dense()``, ``num_active()``,
``set_mask()``, ``variational()``, ``moments_and_kl()``):

- ``MeanFieldSite`` (dense): μ, ρ of the weight's shape and a bool mask buffer;
- ``CompactSite``: μ, ρ of shape (k,) over the k active coordinates only and their flat positions,
  so parameters, optimizer state and checkpoints scale with k (sparse-subspace VI).

The model is a ``BayesianNetwork`` (its Bayesian parameters are the sites, known at once) or any other
Pyro model: a function with ``pyro.sample`` statements or a ``PyroModule`` with ``PyroSample`` priors.
Such a model is traced on the guide's first call (or ``guide.setup(*args)``), as Pyro's ``AutoGuide``
does (``pyro_model.trace_sites``): its latent sites with real support are the weights (``sites``:
masks, pruning, SNR); constrained ones (a positive scale, ...) get a Normal in the unconstrained space
(``constrained_sites``) and are never pruned.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.util import sum_rightmost
from pyro.nn import PyroModule
from torch import nn

from ..distributions import MaskedNormal
from ..errors import UnitAnalysisError
from ..model import BayesianNetwork, Site
from ..priors import Prior
from ..pyro_model import AUXILIARY_SUFFIX, InitLocFn, TracedSite, masked_model, trace_sites
from ..units import UnitGroup, count_units, parameter_masks
from .fused import inverse_softplus, softplus, softplus_kl
from .horseshoe import init_to_hint, network_weights

_instance_counter = itertools.count()

DEFAULT_INIT_SCALE = 1e-3
"""The initial σ of every weight (all guides). Kept at 1e-3 after a validation sweep (20 % of the training
data held out; wine, breast cancer, diabetes, Friedman #1, digits, 6,000 Fashion-MNIST images): no setting of
init_scale (1e-3 to 0.1), learning rate (5e-3 to 3e-2), ρ learning rate (1 to 5 × lr) or KL warm-up (none,
half the run) was better on every task. Follow σ in ``fit``'s history ("mean_sigma" columns)."""


def _key(site_name: str) -> str:
    return site_name.replace(".", "__")


class SiteMoments(NamedTuple):
    """q of one site: μ, σ and σ² (all exactly zero at masked weights) and the mask (None if dense)."""

    loc: torch.Tensor
    scale: torch.Tensor
    var: torch.Tensor
    mask: torch.Tensor | None


class MeanFieldSite(nn.Module):
    """Variational parameters of one weight tensor: μ, ρ (shape = the weight's) and its mask."""

    def __init__(self, loc: torch.Tensor, init_scale: float):
        super().__init__()
        self.loc = nn.Parameter(loc.detach().clone())
        self.rho = nn.Parameter(torch.full_like(loc, inverse_softplus(init_scale)))
        self.register_buffer("mask", torch.ones_like(loc, dtype=torch.bool))
        self._dense_cache: tuple[int, int, bool] | None = None

    @property
    def shape(self) -> torch.Size:
        return self.loc.shape

    def scale(self) -> torch.Tensor:
        """σ = softplus(ρ) of every coordinate, active or not (always > 0)."""
        return softplus(self.rho)

    def num_active(self) -> int:
        return int(self.mask.sum())

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (bool, the weight's shape); μ and ρ stay as they are."""
        self.mask.copy_(mask.to(torch.bool))

    def is_dense(self) -> bool:
        """True when no weight of this site is masked (cached until the mask changes)."""
        key = (self.mask.data_ptr(), self.mask._version)
        if self._dense_cache is None or self._dense_cache[:2] != key:
            self._dense_cache = (*key, bool(self.mask.all()))
        return self._dense_cache[2]

    def variational(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(μ, σ, mask) of q; μ and σ are exactly zero at masked weights; mask is None if dense."""
        scale = self.scale()
        if self.is_dense():
            return self.loc, scale, None
        mask = self.mask.to(self.loc.dtype)
        return self.loc * mask, scale * mask, self.mask

    def moments_and_kl(self, prior: Prior) -> tuple[SiteMoments, torch.Tensor]:
        """This site's moments and Σ KL(q ‖ p) over its active weights, for the training objective."""
        dense = self.is_dense()
        if type(prior).second_moment_kl is not Prior.second_moment_kl:
            mask = None if dense else self.mask.to(self.loc.dtype)
            loc = self.loc if dense else self.loc * mask
            loc, scale, var, kl = softplus_kl(loc, self.rho, mask, prior)
            return SiteMoments(loc, scale, var, None if dense else self.mask), kl
        loc, scale, mask = self.variational()
        return SiteMoments(loc, scale, scale * scale, mask), prior.total_kl(loc, scale, mask)


class CompactSite(nn.Module):
    """Variational parameters of one weight tensor, stored on its support only.

    ``loc`` and ``rho`` have shape (k,): μ and ρ of the k active coordinates, whose flat positions in
    the weight (distinct, in any order) are the long buffer ``index`` (k,). The bool ``mask`` (the
    weight's shape) is computed from ``index`` when asked for. Parameters, optimizer state and
    checkpoints therefore scale with k; the training objective runs softplus and the KL on the k
    values and scatters μ, σ and σ² into dense zero tensors for the network's forward pass.
    ``scale()`` is σ of the k stored coordinates; ``variational()`` and ``moments_and_kl()`` return
    dense tensors like ``MeanFieldSite``'s.

    Args:
        loc: the weight's initial value (its full shape); μ starts there on the support.
        mask: bool, the weight's shape: the initial support (True = active).
        init_scale: the initial σ of the active weights.
    """

    def __init__(self, loc: torch.Tensor, mask: torch.Tensor, init_scale: float):
        super().__init__()
        if mask.shape != loc.shape:
            raise ValueError(f"support mask must have shape {tuple(loc.shape)}, got {tuple(mask.shape)}")
        index = mask.to(torch.bool).flatten().nonzero().squeeze(1)
        self._shape = loc.shape
        self.loc = nn.Parameter(loc.detach().flatten()[index].clone())
        self.rho = nn.Parameter(torch.full_like(self.loc, inverse_softplus(init_scale)))
        self.register_buffer("index", index)
        self._mask_cache: tuple[int, int, torch.Tensor] | None = None

    @property
    def shape(self) -> torch.Size:
        return self._shape

    @property
    def mask(self) -> torch.Tensor:
        """Bool tensor of the weight's shape, True on the support (cached until ``index`` changes)."""
        key = (self.index.data_ptr(), self.index._version)
        if self._mask_cache is None or self._mask_cache[:2] != key:
            mask = torch.zeros(self._shape.numel(), dtype=torch.bool, device=self.index.device)
            mask[self.index] = True
            self._mask_cache = (*key, mask.view(self._shape))
        return self._mask_cache[2]

    def scale(self) -> torch.Tensor:
        """σ = softplus(ρ) of the k stored coordinates: shape (k,)."""
        return softplus(self.rho)

    def num_active(self) -> int:
        return self.index.numel()

    def is_dense(self) -> bool:
        return self.index.numel() == self._shape.numel()

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        """(k,) values on the support -> a tensor of the weight's shape, zero elsewhere (differentiable)."""
        return values.new_zeros(self._shape.numel()).index_copy(0, self.index, values).view(self._shape)

    def variational(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(μ, σ, mask) as dense tensors of the weight's shape, exactly zero off the support."""
        return self.dense(self.loc), self.dense(self.scale()), None if self.is_dense() else self.mask

    def moments_and_kl(self, prior: Prior) -> tuple[SiteMoments, torch.Tensor]:
        """Dense moments (scattered from the k values) and Σ KL(q ‖ p) over the k active weights."""
        loc = self.loc
        if type(prior).second_moment_kl is not Prior.second_moment_kl:
            loc, scale, var, kl = softplus_kl(loc, self.rho, None, prior)
        else:
            scale = self.scale()
            var, kl = scale * scale, prior.kl(loc, scale).sum()
        mask = None if self.is_dense() else self.mask
        # one scatter for μ, σ and σ² together (three would cost three launches forward and backward)
        stacked = torch.stack([loc, scale, var])
        dense = stacked.new_zeros(3, self._shape.numel()).index_copy(1, self.index, stacked)
        loc, scale, var = dense.view(3, *self._shape).unbind(0)
        return SiteMoments(loc, scale, var, mask), kl

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Move the support to ``mask`` (bool, the weight's shape).

        Weights active before and after keep their (μ, ρ); newly active ones start at μ = 0 and
        ρ = the mean ρ of the kept ones. With the same number of active weights the parameters are
        updated in place (an optimizer keeps them; its state is not reset here); otherwise they are
        replaced by new tensors of the new size, and an optimizer must be built afresh.
        """
        new_index = mask.to(torch.bool).flatten().nonzero().squeeze(1).to(self.index.device)
        slot_of = torch.full((self._shape.numel(),), -1, dtype=torch.long, device=self.index.device)
        slot_of[self.index] = torch.arange(self.index.numel(), device=self.index.device)
        old_slot = slot_of[new_index]
        kept = old_slot >= 0
        rho_fill = self.rho[old_slot[kept]].mean() if kept.any() else self.rho.mean()
        loc = torch.where(kept, self.loc[old_slot.clamp(min=0)], torch.zeros((), device=self.loc.device))
        rho = torch.where(kept, self.rho[old_slot.clamp(min=0)], rho_fill)
        if new_index.numel() == self.index.numel():
            self.index.copy_(new_index)
            self.loc.copy_(loc)
            self.rho.copy_(rho)
        else:
            self._resize(new_index.numel())
            self.index.copy_(new_index)
            self.loc.copy_(loc)
            self.rho.copy_(rho)

    def _resize(self, k: int) -> None:
        self.loc = nn.Parameter(self.loc.new_empty(k))
        self.rho = nn.Parameter(self.rho.new_empty(k))
        self.index = self.index.new_empty(k)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "index")
        if saved is not None and saved.numel() != self.index.numel():  # a support of another size
            self._resize(saved.numel())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"shape={tuple(self._shape)}, active={self.index.numel()}"


GuideSite = MeanFieldSite | CompactSite
"""Either storage of a site (same interface)."""


class UnitKeepMasks(nn.Module):
    """The removed units of a guide: one bool buffer (size,) per unit group with a removed unit
    (True = kept), named after the group (dots as "__"). Buffers move with the guide and are saved
    in its state dict; loading creates the ones a saved guide had."""

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key, mask in self._buffers.items():
            yield key.replace("__", "."), mask

    def set(self, name: str, keep: torch.Tensor) -> None:
        self._buffers[_key(name)] = keep.to(torch.bool).clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._buffers.clear()
        for key, value in state_dict.items():
            if key.startswith(prefix) and "." not in key[len(prefix):]:
                self._buffers[key[len(prefix):]] = torch.empty_like(value)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def check_model(model) -> None:
    if not isinstance(model, BayesianNetwork):
        raise ValueError(f"model must be a pyro_sparse.BayesianNetwork, got {type(model).__name__}")


def check_guide_model(model) -> None:
    """A guide's model: a ``BayesianNetwork`` or a Pyro model (a callable, a ``PyroModule``); a plain
    ``nn.Module`` has no sample sites and is refused with the way to wrap it."""
    if isinstance(model, BayesianNetwork) or (callable(model) and not isinstance(model, nn.Module)) or \
            isinstance(model, PyroModule):
        return
    what = f"the plain nn.Module {type(model).__name__}" if isinstance(model, nn.Module) else type(model).__name__
    raise ValueError(
        f"model must be a pyro_sparse.BayesianNetwork or a Pyro model (a function with pyro.sample statements, a "
        f"PyroModule with PyroSample priors), got {what}: wrap a network as ps.BayesianNetwork(net, dataset_size=N)"
    )


class MeanField(nn.Module):
    """Masked mean-field Gaussian guide of a Pyro model; an ordinary Pyro guide.

    Args:
        model: a ``BayesianNetwork`` (its Bayesian parameters are the sites), or any Pyro model: a
            function with ``pyro.sample`` statements or a ``PyroModule`` with ``PyroSample`` priors,
            traced on the guide's first call (``setup``) to find its latent sites.
        init_scale: the initial σ of every weight. μ starts at the network's own initialisation
            (a traced model: at ``init_loc_fn``'s value). Default ``DEFAULT_INIT_SCALE`` (1e-3).
            σ then grows by about the learning rate per step in ρ: follow it in ``fit``'s history
            ("mean_sigma" columns).
        name: prefix of this guide's parameters in Pyro's param store (default: unique).
        compact: site name -> bool support mask (the weight's shape): these sites are stored as
            ``CompactSite`` (μ, ρ of the active weights only); all others as dense ``MeanFieldSite``.
            Or a function of the weight sites (name -> ``Site`` / ``TracedSite``) returning that
            mapping, called when the sites are known (at once, or when a traced model is set up).
        init_loc_fn: for a traced model, Pyro's initialisation strategy of the means (default
            ``pyro.infer.autoguide.init_to_median``).

    ``guide(*args)`` samples every site from q (for ``pyro.infer.SVI`` and ``Predictive``);
    ``pyro_sparse.fit`` uses the fused objective with local reparameterization for a
    ``BayesianNetwork`` and for a ``PyroModule`` in Pyro's BNN idiom (``infer.pyromodule_elbo``), and
    Pyro's mean-field ELBO for other models.
    """

    def __init__(
        self,
        model: BayesianNetwork | Callable,
        init_scale: float | None = None,
        name: str | None = None,
        compact: Mapping[str, torch.Tensor] | Callable[[Mapping[str, Site | TracedSite]], Mapping[str, torch.Tensor]]
        | None = None,
        init_loc_fn: InitLocFn | None = None,
    ):
        super().__init__()
        check_guide_model(model)
        init_scale = DEFAULT_INIT_SCALE if init_scale is None else init_scale
        if not math.isfinite(init_scale) or init_scale <= 0:
            raise ValueError(f"init_scale must be a finite number > 0, got {init_scale!r}")
        self.init_scale = float(init_scale)
        self.pyro_name = name if name is not None else f"{type(self).__name__}{next(_instance_counter)}"
        self.site_info: dict[str, Site | TracedSite] = {}
        self.constrained_info: dict[str, TracedSite] = {}
        self.sites = nn.ModuleDict()
        self.constrained_sites = nn.ModuleDict()
        self._compact = compact if callable(compact) else dict(compact or {})
        self._init_loc_fn = init_loc_fn
        self._traced_model: list[Callable] = []  # a list: the model is not a submodule of the guide
        self._network_model: list[BayesianNetwork] = []  # the same, for a BayesianNetwork (its units)
        self.unit_keep = UnitKeepMasks()
        self._built = False
        if isinstance(model, BayesianNetwork):
            self._build(*model.latent_sites())
            self._network_model.append(model)
            model.use_masks(self)
        else:
            self._traced_model.append(model)

    # ----------------------------------------------------------------------------------------
    # Sites: built at once for a BayesianNetwork, on the first call for a traced Pyro model
    # ----------------------------------------------------------------------------------------
    @property
    def is_set_up(self) -> bool:
        """False for a guide of a traced model that has not seen the model's arguments yet."""
        return self._built

    @property
    def traced_model(self) -> Callable | None:
        """The Pyro model this guide traces (None for a ``BayesianNetwork``'s guide)."""
        return self._traced_model[0] if self._traced_model else None

    def setup(self, *args: Any, **kwargs: Any) -> None:
        """Trace the model on example arguments (e.g. a batch ``x, y``) and create the variational
        parameters; the first call of the guide does it. Nothing happens when already set up."""
        if self.is_set_up or not self._traced_model:
            return
        sites, initial = trace_sites(self._traced_model[0], args, kwargs, init_to_hint(self._init_loc_fn))
        self._build(sites, initial)

    def _build(self, site_info: Mapping[str, Site | TracedSite], initial: Mapping[str, torch.Tensor]) -> None:
        """Create the storage of every site: weights (real support) in ``sites``, the rest in
        ``constrained_sites``; ``initial``: site name -> initial μ (unconstrained space)."""
        weights = [name for name, info in site_info.items() if getattr(info, "is_real", True)]
        if callable(self._compact):
            self._compact = dict(self._compact({name: site_info[name] for name in weights}))
        unknown = set(self._compact) - set(weights)
        if unknown:
            raise ValueError(f"compact names unknown sites {sorted(unknown)}; sites are {weights}")
        self.site_info = {name: site_info[name] for name in weights}
        self._latent_order = list(site_info)
        self.constrained_info = {name: info for name, info in site_info.items() if name not in self.site_info}
        for name in weights:
            self.sites[_key(name)] = (
                CompactSite(initial[name], self._compact[name], self.init_scale) if name in self._compact
                else MeanFieldSite(initial[name], self.init_scale)
            )
        for name in self.constrained_info:
            self.constrained_sites[_key(name)] = MeanFieldSite(initial[name], self.init_scale)
        self._built = True

    def _require_setup(self) -> None:
        if not self.is_set_up:
            raise RuntimeError(
                f"{type(self).__name__} of a Pyro model finds its sites by running the model: call "
                f"guide.setup(*model_args) (or the guide itself, or ps.fit) first"
            )

    def masked_model(self, model: Callable | None = None) -> Callable:
        """The traced model with this guide's pruned coordinates left out of its log density, for
        ``pyro.infer.SVI(guide.masked_model(), guide, ...)`` after pruning (``fit`` uses it itself).
        A ``BayesianNetwork`` masks itself (it reads the guide's masks): it is returned as it is."""
        model = model if model is not None else self.traced_model
        if isinstance(model, BayesianNetwork):
            return model
        return masked_model(model, self.pruned_masks)

    def scale_parameters(self) -> list[nn.Parameter]:
        """Every ρ (weights and constrained sites): ``fit``'s scale learning-rate group."""
        return [site.rho for site in (*self.sites.values(), *self.constrained_sites.values())]

    def check_model(self, model: BayesianNetwork) -> None:
        """Raise ValueError unless ``model`` has exactly this guide's Bayesian sites (names and shapes).

        The guide keeps its sites, not the model it was built from: a model of the same architecture
        (rebuilt, e.g. to load a checkpoint into) is accepted; one with other sites is refused.
        """
        if self._traced_model:
            if model is not self._traced_model[0]:
                raise ValueError(f"this guide was built for another Pyro model: build the guide from the model you "
                                 f"train/evaluate, e.g. ps.guides.{type(self).__name__}(model)")
            return
        check_model(model)  # the module-level function: a BayesianNetwork at all
        mine = {name: tuple(site.shape) for name, site in self.site_info.items()}
        theirs = {name: tuple(site.shape) for name, site in model.sites.items()}
        if mine == theirs:
            return
        differences = []
        reshaped = [f"{name} {shape} vs {theirs[name]}" for name, shape in mine.items()
                    if theirs.get(name, shape) != shape]
        if reshaped:
            differences.append(f"shapes {', '.join(reshaped[:3])}")
        for owner, names in (("guide", set(mine) - set(theirs)), ("model", set(theirs) - set(mine))):
            if names:
                differences.append(f"only the {owner} has {', '.join(sorted(names)[:3])}")
        raise ValueError(
            f"this guide was built for another model (sites of the guide vs the model: {'; '.join(differences)}): "
            f"build the guide from the model you train/evaluate, e.g. ps.guides.{type(self).__name__}(model)"
        )

    # ----------------------------------------------------------------------------------------
    # Access by site name
    # ----------------------------------------------------------------------------------------
    def site(self, name: str) -> GuideSite:
        """Variational parameters of the site named ``name`` (a parameter path, e.g. "0.weight")."""
        self._require_setup()
        try:
            return self.sites[_key(name)]
        except KeyError:
            raise KeyError(f"no Bayesian site {name!r}; sites are {list(self.site_info)}") from None

    def constrained_site(self, name: str) -> MeanFieldSite:
        """μ, ρ (in the unconstrained space) of the constrained latent site ``name`` (e.g. a scale)."""
        self._require_setup()
        try:
            return self.constrained_sites[_key(name)]
        except KeyError:
            raise KeyError(f"no constrained site {name!r}; they are {list(self.constrained_info)}") from None

    def named_sites(self) -> Iterator[tuple[str, GuideSite]]:
        """(name, storage) of every weight site, in the model's order."""
        self._require_setup()
        for name in self.site_info:
            yield name, self.sites[_key(name)]

    def masks(self) -> dict[str, torch.Tensor]:
        """Site name -> bool mask (True = active)."""
        return {name: site.mask for name, site in self.named_sites()}

    def pruned_masks(self) -> dict[str, torch.Tensor]:
        """``masks()`` of the sites with at least one pruned weight only (cheap: density is cached)."""
        return {name: site.mask for name, site in self.named_sites() if not site.is_dense()}

    @torch.no_grad()
    def set_mask(self, name: str, mask: torch.Tensor) -> None:
        """Replace the mask of site ``name`` (bool, the weight's shape); see the sites' ``set_mask``."""
        site = self.site(name)
        if mask.shape != site.shape:
            raise ValueError(f"mask for {name!r} must have shape {tuple(site.shape)}, got {tuple(mask.shape)}")
        site.set_mask(mask)

    # ----------------------------------------------------------------------------------------
    # Units (structured sparsity: ``pyro_sparse.units``)
    # ----------------------------------------------------------------------------------------
    def unit_groups(self) -> dict[str, UnitGroup]:
        """The removable unit groups of the model's network (``BayesianNetwork.unit_groups``)."""
        if not self._network_model:
            raise UnitAnalysisError(
                "unit-level sparsity needs a ps.BayesianNetwork (its layers are known); this guide traces a Pyro "
                "model: wrap the network as ps.BayesianNetwork(net, dataset_size=N), or use structure='weight'"
            )
        groups = self._network_model[0].unit_groups()
        if not groups:
            raise UnitAnalysisError(
                "the network has no removable units (every layer's output reaches the logits or an operation "
                "that unit removal cannot follow, see pyro_sparse.units): use structure='weight'"
            )
        return groups

    def unit_masks(self) -> dict[str, torch.Tensor]:
        """Unit group name -> bool keep mask (size,), for the groups with at least one removed unit (on the
        guide's device, also after loading a state dict saved on another)."""
        device = self.unit_keep_device()
        return {name: mask.to(device) for name, mask in self.unit_keep.items() if not bool(mask.all())}

    @torch.no_grad()
    def set_unit_mask(self, name: str, keep: torch.Tensor) -> None:
        """Make ``keep`` (bool (size,), True = kept) the units of group ``name``.

        A removed unit takes its incoming weights (rows of its producers' weights) and the matching
        inputs of its readers (their columns / input channels) out of q: their masks are cleared, as
        are its entries of Bayesian biases and BatchNorm parameters; the model zeroes its deterministic
        bias and BatchNorm γ, β while it is removed (``BayesianNetwork.apply``).
        A unit that comes back gets those weights back (active, with the μ and ρ they kept).
        """
        groups = self.unit_groups()
        if name not in groups:
            raise ValueError(f"no unit group {name!r}; groups are {list(groups)}")
        keep = torch.as_tensor(keep).to(torch.bool)
        if keep.shape != (groups[name].size,):
            raise ValueError(f"keep mask of {name!r} must have shape ({groups[name].size},), got {tuple(keep.shape)}")
        if not bool(keep.any()):
            raise ValueError(f"keep at least one unit of {name!r}: a layer without units cuts the network")
        model = self._network_model[0]
        paths = {site: (info.module_path, info.attribute) for site, info in self.site_info.items()}
        before = dict(self.unit_keep.items())
        old_area = parameter_masks(model.net, groups, before, paths)
        self.unit_keep.set(name, keep.to(self.unit_keep_device()))
        new_area = parameter_masks(model.net, groups, dict(self.unit_keep.items()), paths)
        for site in set(old_area) | set(new_area):
            mask = self.site(site).mask
            old = old_area.get(site, torch.ones_like(mask))
            new = new_area.get(site, torch.ones_like(mask))
            self.set_mask(site, (mask | ~old) & new)

    def unit_keep_device(self) -> torch.device:
        return next(iter(self.sites.values())).loc.device

    def unit_keep_mask(self, name: str) -> torch.Tensor:
        """The bool keep mask (size,) of unit group ``name`` (all True when none of its units is removed)."""
        for group_name, mask in self.unit_keep.items():
            if group_name == name:
                return mask.to(self.unit_keep_device())
        return torch.ones(self.unit_groups()[name].size, dtype=torch.bool, device=self.unit_keep_device())

    def unit_counts(self) -> tuple[int, int]:
        """(units in the removable groups, units active), counted over ``unit_groups``."""
        return count_units(self.unit_groups(), self.unit_masks())

    @torch.no_grad()
    def scale_sums(self) -> dict[str, tuple[torch.Tensor, int]]:
        """Site name -> (Σ σ over the active weights (0-dim tensor), number of active weights)."""
        sums = {}
        for name, site in self.named_sites():
            scale = site.scale()
            if isinstance(site, MeanFieldSite) and not site.is_dense():
                scale = scale[site.mask]
            sums[name] = (scale.sum(), site.num_active())
        return sums

    def active_counts(self) -> dict[str, int]:
        """Site name -> number of active weights."""
        return {name: site.num_active() for name, site in self.named_sites()}

    @property
    def num_active(self) -> int:
        return sum(self.active_counts().values())

    @property
    def num_weights(self) -> int:
        return sum(site.shape.numel() for _, site in self.named_sites())

    @property
    def sparsity(self) -> float:
        """Fraction of the Bayesian weights that are exactly zero (masked)."""
        return 1.0 - self.num_active / self.num_weights

    # ----------------------------------------------------------------------------------------
    # The variational distribution
    # ----------------------------------------------------------------------------------------
    def moments(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Site name -> (μ, σ), both masked (zero where pruned)."""
        return {name: site.variational()[:2] for name, site in self.named_sites()}

    def sample_weights(self) -> dict[str, torch.Tensor]:
        """One draw w ~ q for every site (differentiable; exactly zero where masked). A ``BayesianNetwork``'s
        weights under a ``NodeHorseshoe``: τ̃ β at one joint draw of β and the scales (``guides.horseshoe``)."""
        draws = {}
        for name, (loc, scale) in self.moments().items():
            draws[name] = torch.addcmul(loc, scale, torch.randn_like(loc))
        return draws if self._traced_model else network_weights(self, draws, sample=True)

    def mean_weights(self) -> dict[str, torch.Tensor]:
        """The posterior mean μ of every site (zero where masked). A ``BayesianNetwork``'s weights under a
        ``NodeHorseshoe``: μ_β τ̃, τ̃ at q's median of the scales (``guides.horseshoe``)."""
        means = {name: loc for name, (loc, _) in self.moments().items()}
        return means if self._traced_model else network_weights(self, means, sample=False)

    def moments_and_kl(self, prior: Prior) -> tuple[dict[str, SiteMoments], torch.Tensor]:
        """Every site's moments and the total KL(q ‖ p) (nats), computed together (the hot path)."""
        moments, total = {}, 0.0
        for name, site in self.named_sites():
            moments[name], kl = site.moments_and_kl(prior)
            total = total + kl
        return moments, total

    def kl(self, prior: Prior) -> torch.Tensor:
        """Σ over active weights of KL(q(w_i) ‖ p(w_i)): a scalar (an upper bound for spike-and-slab)."""
        return self.moments_and_kl(prior)[1]

    def distribution(self, name: str) -> pyro.distributions.TorchDistribution:
        """q of weight site ``name`` as a Pyro distribution: the weight's shape is the event shape (a
        traced site inside plates: the plate dimensions are batch dimensions, as in the model)."""
        site = self.site(name)
        loc, scale, _ = site.variational()
        event_dim = getattr(self.site_info[name], "event_dim", loc.dim())
        return MaskedNormal(loc, scale, None if site.is_dense() else site.mask).to_event(event_dim)

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Pyro guide: one sample site per latent site of the model (a ``BayesianNetwork``'s guide
        ignores the arguments; a traced model's guide sets itself up on them the first time)."""
        self.setup(*args, **kwargs)
        pyro.module(self.pyro_name, self)
        if not self._traced_model:  # a BayesianNetwork: its weights (and its prior's scale sites), in its order
            return {name: pyro.sample(name, self.distribution(name)) if name in self.site_info
                    else self._sample_constrained(name, self.constrained_info[name]) for name in self._latent_order}
        values = {}
        for name, info in {**self.site_info, **self.constrained_info}.items():
            with contextlib.ExitStack() as plates:
                for plate in info.plates:
                    plates.enter_context(pyro.plate(plate.name, plate.size, dim=plate.dim))
                if name in self.site_info:
                    values[name] = pyro.sample(name, self.distribution(name))
                else:
                    values[name] = self._sample_constrained(name, info)
        return values

    def _sample_constrained(self, name: str, info: TracedSite) -> torch.Tensor:
        """A constrained site, as ``AutoNormal`` samples it: u ~ N(μ, σ²) in the unconstrained space (an
        auxiliary site), the value T(u) with T = biject_to(support), and log q(T(u)) through a Delta
        that carries the log-Jacobian of T⁻¹."""
        site = self.constrained_sites[_key(name)]
        unconstrained = pyro.sample(
            name + AUXILIARY_SUFFIX,
            dist.Normal(site.loc, site.scale()).to_event(info.unconstrained_event_dim),
            infer={"is_auxiliary": True},
        )
        transform = info.transform()
        value = transform(unconstrained)
        log_density = transform.inv.log_abs_det_jacobian(value, unconstrained)
        log_density = sum_rightmost(log_density, log_density.dim() - value.dim() + info.event_dim)
        return pyro.sample(name, dist.Delta(value, log_density=log_density, event_dim=info.event_dim))

    @torch.no_grad()
    def median(self) -> dict[str, torch.Tensor]:
        """Every latent site at q's median: μ for weights (zero where pruned; a ``BayesianNetwork``'s weights
        under a ``NodeHorseshoe``: ``mean_weights``), T(μ) for constrained sites."""
        values = dict(self.mean_weights())
        for name, info in self.constrained_info.items():
            values[name] = info.transform()(self.constrained_sites[_key(name)].loc)
        return values

    # ----------------------------------------------------------------------------------------
    # Training hooks (``pyro_sparse.fit`` calls them; subclasses change the masks here)
    # ----------------------------------------------------------------------------------------
    def on_step_end(self, state) -> None:
        """Called by ``fit`` after every optimizer step; ``state`` is a ``TrainingState``."""

    def on_epoch_end(self, state) -> None:
        """Called by ``fit`` after every epoch."""
