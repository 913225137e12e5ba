"""Compact training: the fused objective on the smaller network of a guide's active units.

When a guide has removed units (``MeanField.unit_masks()``: unit-level ``SparseSubspace``, or
``SNRPruned`` after ``prune(structure="unit")``), the masked dense network spends most of a step on
rows and columns that are exactly zero. ``compact_network(model, guide)`` gives instead the network
of the active units only (``units.slice_network``: fewer rows, columns and channels, a dense network
computing exactly what the masked one computes), and ``infer.elbo.negative_elbo`` runs it:

- the guide's μ, σ² are *gathered* to the smaller shapes. A unit-level ``SparseSubspace`` stores each
  weight's active block row-major (``CompactSite``: its k = rows × columns values are the block itself),
  so the gather is a ``view``; a dense site (``MeanFieldSite``) is gathered with one ``index_select``
  of the flattened μ and ρ (differentiable: the gradients scatter back into the full μ, ρ);
- the closed-form KL is computed on the gathered coordinates only (``softplus_kl``): a step costs in
  proportion to the active weights, not to the full layers (a weight pruned *inside* the active units,
  e.g. by SNR pruning, keeps its mask in the gathered block);
- the model's deterministic parameters (biases, BatchNorm γ and β, the weights of non-Bayesian layers)
  are gathered from the full ones and put in place of the small network's own copies, so their
  gradients reach the real parameters; the other parameters and buffers of the small network are the
  full network's own tensors. BatchNorm running statistics are gathered before the forward pass and
  written back into the full buffers after it (a removed channel's statistics stay as they were; the
  masked dense network decays them towards 0, but a removed channel's γ = β = 0 makes its output
  zero whatever they are);
- the small network is rebuilt only when the supports move: it is cached per guide, keyed on the
  versions of the keep masks and of the sites' masks / supports.

Local reparameterization works as in the dense network (the small network's Linear layers keep
their LRT forward). The Monte Carlo noise has the small network's shapes, so a compact step draws
other random numbers than the masked dense step: the two are equal in distribution, and equal
exactly for the same noise (tests/test_ssvi_units.py). ``dense_units()`` turns compaction off
within a block (for comparisons).

Prediction takes the same path: ``posterior.evaluate_draw`` (``ps.evaluate``, ``Posterior.predict``) runs a
guide's weight draws, cut to the small shapes (``CompactNetwork.gather``), through the small network.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..guides.fused import softplus, softplus_kl
from ..guides.meanfield import CompactSite, MeanField, SiteMoments
from ..layers import local_reparameterization, substituted_weights
from ..model import BayesianNetwork
from ..priors import Prior
from ..units import kept_indices, slice_network, weight_index

_enabled = [True]


@contextlib.contextmanager
def dense_units() -> Iterator[None]:
    """Within the block, ``negative_elbo`` runs the masked dense network even when units are removed."""
    before = _enabled[0]
    _enabled[0] = False
    try:
        yield
    finally:
        _enabled[0] = before


@dataclass
class _SiteGather:
    """How one Bayesian site reaches its shape in the small network.

    ``flat``: long (k,) positions in the flattened full weight of the small weight's entries, row-major
    (None: the site is not sliced); ``view``: the site is a ``CompactSite`` whose stored values are
    exactly those entries in that order (μ.view(shape) is the small weight); ``mask``: float (shape) of
    the active weights inside the block, None when all are active."""

    shape: torch.Size
    flat: torch.Tensor | None
    view: bool
    mask: torch.Tensor | None


@dataclass
class _Tensor:
    """A parameter or buffer of the small network and where it comes from: ``module._parameters`` /
    ``_buffers`` of the full network at ``attribute``, gathered along dim 0 by ``rows`` and dim 1 by
    ``columns`` (None: as it is)."""

    module: nn.Module
    attribute: str
    buffer: bool
    rows: torch.Tensor | None
    columns: torch.Tensor | None

    def full(self) -> torch.Tensor | None:
        return (self.module._buffers if self.buffer else self.module._parameters).get(self.attribute)

    def gathered(self) -> torch.Tensor | None:
        tensor = self.full()
        if tensor is None or tensor.dim() == 0:
            return tensor
        if self.rows is not None:
            tensor = tensor.index_select(0, self.rows)
        if self.columns is not None:
            tensor = tensor.index_select(1, self.columns)
        return tensor


class CompactNetwork:
    """The network of a guide's active units (see the module docstring).

    ``moments_and_kl(guide, prior)`` gives every site's moments on the small shapes and Σ KL over the
    active weights; ``apply(x, weights, moments)`` runs the small network like ``BayesianNetwork.apply``.
    """

    def __init__(self, model: BayesianNetwork, guide: MeanField, keep: Mapping[str, torch.Tensor], key: tuple):
        self.key = key
        full = model.net
        groups = model.unit_groups()
        device = next(iter(guide.sites.values())).loc.device
        keep = {name: mask.to(device) for name, mask in keep.items()}
        self.net = slice_network(full, groups, keep)
        index = {path: tuple(None if i is None else i.to(device) for i in pair)
                 for path, pair in weight_index(full, groups, keep).items()}
        for name, mask in keep.items():
            kept = kept_indices(mask)
            for path in groups[name].norms:
                index[path] = (kept, None)
        full_modules = dict(full.named_modules())
        self.modes = [(full_modules[path], module) for path, module in self.net.named_modules()]
        self.layers = {name: (self.net.get_submodule(site.module_path), site.attribute)
                       for name, site in model.sites.items()}
        self.sites: dict[str, _SiteGather] = {}
        for name, site in model.sites.items():
            rows, columns = index.get(site.module_path, (None, None))
            if site.attribute != "weight":
                columns = None
                if site.attribute != "bias" or rows is None:
                    rows = None
            self.sites[name] = self._site_gather(guide, name, rows, columns)
        # every other tensor of the small network: the full network's, gathered where sliced
        self.tensors: dict[str, _Tensor] = {}
        for path, module in self.net.named_modules():
            rows, columns = index.get(path, (None, None))
            for store, buffer in ((module._parameters, False), (module._buffers, True)):
                for attribute, value in store.items():
                    key_name = f"{path}.{attribute}" if path else attribute
                    if value is None or key_name in model.sites:
                        continue
                    is_weight = attribute == "weight" and not isinstance(module, nn.modules.batchnorm._BatchNorm)
                    self.tensors[key_name] = _Tensor(full_modules[path], attribute, buffer,
                                                     rows if attribute != "num_batches_tracked" else None,
                                                     columns if is_weight else None)
        self.slots = {key_name: (self.net.get_submodule(key_name.rpartition(".")[0]), key_name.rpartition(".")[2])
                      for key_name in self.tensors}
        self.written_back = [key_name for key_name, tensor in self.tensors.items()
                             if tensor.buffer and tensor.rows is not None]

    @staticmethod
    def _site_gather(guide: MeanField, name: str, rows: torch.Tensor | None,
                     columns: torch.Tensor | None) -> _SiteGather:
        site = guide.site(name)
        shape = site.shape
        if rows is None and columns is None:
            return _SiteGather(shape, None, False, None)
        positions = torch.arange(shape.numel(), device=site.mask.device).view(shape)
        if rows is not None:
            positions = positions.index_select(0, rows)
        if columns is not None:
            positions = positions.index_select(1, columns)
        flat = positions.reshape(-1)
        view = isinstance(site, CompactSite) and torch.equal(site.index, flat)
        mask = None
        if not view:
            gathered = site.mask.reshape(-1).index_select(0, flat)
            if not bool(gathered.all()):
                mask = gathered.view(positions.shape).to(site.loc.dtype)
        return _SiteGather(positions.shape, flat, view, mask)

    def moments_and_kl(self, guide: MeanField, prior: Prior) -> tuple[dict[str, SiteMoments], torch.Tensor]:
        """Site name -> moments (μ, σ, σ² of the small weight's shape, zero where masked) and Σ KL(q ‖ p)."""
        moments, total = {}, 0.0
        for name, gather in self.sites.items():
            site = guide.site(name)
            if gather.flat is None:
                moments[name], kl = site.moments_and_kl(prior)
            else:
                if gather.view:
                    loc, rho = site.loc.view(gather.shape), site.rho.view(gather.shape)
                elif isinstance(site, CompactSite):  # another layout: through the dense form
                    loc = site.dense(site.loc).reshape(-1).index_select(0, gather.flat).view(gather.shape)
                    rho = site.dense(site.rho).reshape(-1).index_select(0, gather.flat).view(gather.shape)
                else:
                    loc = site.loc.reshape(-1).index_select(0, gather.flat).view(gather.shape)
                    rho = site.rho.reshape(-1).index_select(0, gather.flat).view(gather.shape)
                moments[name], kl = _moments_and_kl(loc, rho, gather.mask, prior)
            total = total + kl
        return moments, total

    def gather(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights of the full shapes (site name -> tensor, e.g. a draw of ``guide.sample_weights()``) cut to
        the small network's shapes (differentiable)."""
        gathered = {}
        for name, value in weights.items():
            gather = self.sites[name]
            gathered[name] = value if gather.flat is None else \
                value.reshape(-1).index_select(0, gather.flat.to(value.device)).view(gather.shape)
        return gathered

    def apply(self, x: torch.Tensor, weights: Mapping[str, torch.Tensor] | None = None,
              moments: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """The small network's output for x (B, ...) (as ``BayesianNetwork.apply``), in the full network's
        train / eval modes; BatchNorm statistics of a training pass are written back to the full network."""
        for full_module, module in self.modes:
            module.training = full_module.training
        values = {key_name: tensor.gathered() for key_name, tensor in self.tensors.items()}
        with local_reparameterization(self.layers, moments or {}), substituted_weights(self.layers, weights or {}), \
                substituted_weights(self.slots, values):
            output = self.net(x)
        if self.net.training and self.written_back:
            with torch.no_grad():
                for key_name in self.written_back:
                    tensor = self.tensors[key_name]
                    full = tensor.full()
                    full.index_copy_(0, tensor.rows, values[key_name].to(full.dtype))
        return output


def _moments_and_kl(loc: torch.Tensor, rho: torch.Tensor, mask: torch.Tensor | None,
                    prior: Prior) -> tuple[SiteMoments, torch.Tensor]:
    """Moments and Σ KL of gathered μ, ρ (shape) with float ``mask`` (None: all active), as ``MeanFieldSite``."""
    bool_mask = None if mask is None else mask > 0
    if type(prior).second_moment_kl is not Prior.second_moment_kl:
        loc, scale, var, kl = softplus_kl(loc if mask is None else loc * mask, rho, mask, prior)
        return SiteMoments(loc, scale, var, bool_mask), kl
    scale = softplus(rho)
    if mask is not None:
        loc, scale = loc * mask, scale * mask
    return SiteMoments(loc, scale, scale * scale, bool_mask), prior.total_kl(loc, scale, bool_mask)


_cache: weakref.WeakKeyDictionary[MeanField, tuple[tuple, CompactNetwork | None]] = weakref.WeakKeyDictionary()


def _key(model: BayesianNetwork, guide: MeanField) -> tuple:
    """What the small network depends on: the keep masks and the sites' masks / supports (their
    versions), the model, and the device."""
    units = tuple((name, mask.data_ptr(), mask._version) for name, mask in guide.unit_keep.items())
    sites = []
    for site in guide.sites.values():
        stored = site.index if isinstance(site, CompactSite) else site.mask
        sites.append((stored.data_ptr(), stored._version, stored.numel()))
    return id(model), id(model.net), units, tuple(sites)


def compact_network(model: BayesianNetwork, guide: MeanField) -> CompactNetwork | None:
    """The small network of ``guide``'s active units, or None when no unit is removed (or within
    ``dense_units()``). Cached: rebuilt only when a keep mask or a site's mask / support changed."""
    if not _enabled[0] or not guide.unit_keep._buffers:
        return None
    key = _key(model, guide)
    cached = _cache.get(guide)
    if cached is not None and cached[0] == key:
        return cached[1]
    keep = dict(guide.unit_masks())
    network = CompactNetwork(model, guide, keep, key) if keep else None
    _cache[guide] = (key, network)
    return network
