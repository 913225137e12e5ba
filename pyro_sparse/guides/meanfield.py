"""MeanField: the masked mean-field Gaussian guide that every variational family here builds on.

q(w) = Π_sites Π_i [m_i N(w_i; μ_i, σ_i²) + (1 − m_i) δ₀(w_i)], σ = softplus(ρ), with a boolean
mask m per site. Dense VI keeps every mask full; SNR pruning and sparse-subspace VI only change
the masks (and, for SSVI, which coordinates are stored). Masked weights have μ = σ = 0: every
sample, prediction, KL and gradient treats them as removed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import NamedTuple

import pyro
import torch
from torch import nn

from ..distributions import MaskedNormal
from ..model import BayesianNetwork, Site
from ..priors import Prior
from .fused import inverse_softplus, softplus, softplus_kl

_instance_counter = itertools.count()


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

    def scale(self) -> torch.Tensor:
        """σ = softplus(ρ) of every coordinate, active or not (always > 0)."""
        return softplus(self.rho)

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
            scale, var, kl = softplus_kl(loc, self.rho, mask, prior)
            return SiteMoments(loc, scale, var, None if dense else self.mask), kl
        loc, scale, mask = self.variational()
        return SiteMoments(loc, scale, scale * scale, mask), prior.total_kl(loc, scale, mask)


class MeanField(nn.Module):
    """Masked mean-field Gaussian guide for a ``BayesianNetwork``; an ordinary Pyro guide.

    Args:
        model: the BayesianNetwork whose Bayesian parameters this guide covers.
        init_scale: the initial σ of every weight. μ starts at the network's own initialisation,
            so training starts from a good deterministic network with a little noise.
        name: prefix of this guide's parameters in Pyro's param store (default: unique).

    ``guide(x, y)`` samples every site from q (for ``pyro.infer.SVI`` and ``Predictive``);
    ``pyro_sparse.fit`` uses the fused objective with local reparameterization instead.
    """

    def __init__(self, model: BayesianNetwork, init_scale: float = 1e-3, name: str | None = None):
        super().__init__()
        if not isinstance(model, BayesianNetwork):
            raise ValueError(f"model must be a pyro_sparse.BayesianNetwork, got {type(model).__name__}")
        if not math.isfinite(init_scale) or init_scale <= 0:
            raise ValueError(f"init_scale must be a finite number > 0, got {init_scale!r}")
        self.site_info: dict[str, Site] = dict(model.sites)
        self.pyro_name = name if name is not None else f"{type(self).__name__}{next(_instance_counter)}"
        self.sites = nn.ModuleDict(
            {_key(name): MeanFieldSite(model.initial_value(name), init_scale) for name in self.site_info}
        )

    # ----------------------------------------------------------------------------------------
    # Access by site name
    # ----------------------------------------------------------------------------------------
    def site(self, name: str) -> MeanFieldSite:
        """Variational parameters of the site named ``name`` (a parameter path, e.g. "0.weight")."""
        try:
            return self.sites[_key(name)]
        except KeyError:
            raise KeyError(f"no Bayesian site {name!r}; sites are {list(self.site_info)}") from None

    def named_sites(self) -> Iterator[tuple[str, MeanFieldSite]]:
        for name in self.site_info:
            yield name, self.sites[_key(name)]

    def masks(self) -> dict[str, torch.Tensor]:
        """Site name -> bool mask (True = active)."""
        return {name: site.mask for name, site in self.named_sites()}

    @torch.no_grad()
    def set_mask(self, name: str, mask: torch.Tensor) -> None:
        """Replace the mask of site ``name`` (bool, the weight's shape)."""
        site = self.site(name)
        if mask.shape != site.mask.shape:
            raise ValueError(f"mask for {name!r} must have shape {tuple(site.mask.shape)}, got {tuple(mask.shape)}")
        site.mask.copy_(mask.to(torch.bool))

    def active_counts(self) -> dict[str, int]:
        """Site name -> number of active weights."""
        return {name: int(site.mask.sum()) for name, site in self.named_sites()}

    @property
    def num_active(self) -> int:
        return sum(self.active_counts().values())

    @property
    def num_weights(self) -> int:
        return sum(site.mask.numel() for _, site in self.named_sites())

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
        """One draw w ~ q for every site (differentiable; exactly zero where masked)."""
        draws = {}
        for name, (loc, scale) in self.moments().items():
            draws[name] = torch.addcmul(loc, scale, torch.randn_like(loc))
        return draws

    def mean_weights(self) -> dict[str, torch.Tensor]:
        """The posterior mean μ of every site (zero where masked)."""
        return {name: loc for name, (loc, _) in self.moments().items()}

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
        """q of site ``name`` as a Pyro distribution with the weight's shape as event shape."""
        site = self.site(name)
        loc, scale, _ = site.variational()
        return MaskedNormal(loc, scale, site.mask).to_event(loc.dim())

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Pyro guide: one sample site per Bayesian parameter (arguments are ignored)."""
        pyro.module(self.pyro_name, self)
        return {name: pyro.sample(name, self.distribution(name)) for name in self.site_info}

    # ----------------------------------------------------------------------------------------
    # Training hooks (``pyro_sparse.fit`` calls them; subclasses change the masks here)
    # ----------------------------------------------------------------------------------------
    def on_step_end(self, state) -> None:
        """Called by ``fit`` after every optimizer step; ``state`` is a ``TrainingState``."""

    def on_epoch_end(self, state) -> None:
        """Called by ``fit`` after every epoch."""
