"""Per-weight distributions: the spike-and-slab prior and the masked Normal of the guides.

Both are ordinary Pyro ``TorchDistribution`` s, so they can sit at Pyro sample sites, and their
KL divergences are registered with ``torch.distributions.kl_divergence`` (which Pyro's
``TraceMeanField_ELBO`` calls). All KLs here are elementwise; wrap in ``.to_event`` to sum.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import MaskedDistribution, TorchDistribution, constraints
from torch.distributions import Normal, kl_divergence, register_kl
from torch.distributions.utils import broadcast_all

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_EMPTY = torch.Size()


def normal_log_prob(value: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(value; 0, scale²), elementwise."""
    return -0.5 * (value / scale) ** 2 - scale.log() - _HALF_LOG_2PI


def kl_normal_normal(
    loc: torch.Tensor, scale: torch.Tensor, prior_scale: torch.Tensor, prior_loc: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """KL(N(loc, scale²) ‖ N(prior_loc, prior_scale²)), elementwise and closed form (the package's one
    Gaussian KL; ``prior_loc`` is 0 for every weight prior)."""
    ratio = scale / prior_scale
    return 0.5 * (ratio**2 + ((loc - prior_loc) / prior_scale) ** 2 - 1.0) - ratio.log()


kl_normal_to_centered_normal = kl_normal_normal
"""The earlier name of ``kl_normal_normal`` (prior mean 0), kept for code written against it."""


def kl_normal_to_spike_and_slab(
    loc: torch.Tensor,
    scale: torch.Tensor,
    slab_scale: torch.Tensor,
    spike_scale: torch.Tensor,
    inclusion: torch.Tensor,
) -> torch.Tensor:
    """Closed-form upper bound on KL(N(loc, scale²) ‖ π N(0, σ₁²) + (1−π) N(0, σ₀²)), elementwise.

    The bound is −log Σₖ πₖ exp(−KL(q ‖ N(0, σₖ²))) (Jensen on the mixture's log-density); it is
    exact when one component dominates the mixture over q's mass.
    """
    kl_slab = kl_normal_normal(loc, scale, slab_scale)
    kl_spike = kl_normal_normal(loc, scale, spike_scale)
    terms = torch.stack([inclusion.log() - kl_slab, torch.log1p(-inclusion) - kl_spike])
    return -torch.logsumexp(terms, dim=0)


class SpikeAndSlabNormal(TorchDistribution):
    """p(w) = π N(w; 0, σ₁²) + (1 − π) N(w; 0, σ₀²) per weight, with σ₀ (spike) < σ₁ (slab).

    Args:
        slab_scale: σ₁, broadcastable to the batch shape.
        spike_scale: σ₀.
        inclusion: π, the prior probability of the slab, in (0, 1).

    ``source`` is the ``priors.SpikeAndSlab`` object that made it (``prior.distribution(shape)``; None for
    one built by hand): EM-SGHMC on a Pyro model learns the hyperparameters of that object.
    """

    arg_constraints = {
        "slab_scale": constraints.positive,
        "spike_scale": constraints.positive,
        "inclusion": constraints.unit_interval,
    }
    support = constraints.real
    has_rsample = False

    def __init__(self, slab_scale, spike_scale, inclusion, validate_args=None, source=None):
        self.slab_scale, self.spike_scale, self.inclusion = broadcast_all(slab_scale, spike_scale, inclusion)
        self.source = source
        super().__init__(self.slab_scale.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(SpikeAndSlabNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.slab_scale = self.slab_scale.expand(batch_shape)
        new.spike_scale = self.spike_scale.expand(batch_shape)
        new.inclusion = self.inclusion.expand(batch_shape)
        new.source = self.source
        super(SpikeAndSlabNormal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> torch.Tensor:
        return torch.zeros_like(self.slab_scale)

    @property
    def variance(self) -> torch.Tensor:
        return self.inclusion * self.slab_scale**2 + (1 - self.inclusion) * self.spike_scale**2

    def _component_log_probs(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slab = self.inclusion.log() + normal_log_prob(value, self.slab_scale)
        spike = torch.log1p(-self.inclusion) + normal_log_prob(value, self.spike_scale)
        return slab, spike

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        slab, spike = self._component_log_probs(value)
        return torch.logaddexp(slab, spike)

    def inclusion_probability(self, value: torch.Tensor) -> torch.Tensor:
        """γ(w) = π N(w; 0, σ₁²) / p(w), the posterior probability that w came from the slab."""
        slab, spike = self._component_log_probs(value)
        return torch.sigmoid(slab - spike)

    def sample(self, sample_shape=_EMPTY) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            in_slab = torch.rand(shape, device=self.inclusion.device) < self.inclusion.expand(shape)
            scale = torch.where(in_slab, self.slab_scale.expand(shape), self.spike_scale.expand(shape))
            return torch.randn(shape, device=scale.device, dtype=scale.dtype) * scale


class MaskedNormal(TorchDistribution):
    """N(loc, scale²) on active weights and an exact zero on masked ones.

    This is the per-site variational distribution of the mean-field guides. Masked positions
    (``mask == False``) have loc = scale = 0 and contribute nothing to log-densities and KLs:
    those weights are removed from the model, not turned into noise.

    Args:
        loc: μ, any shape.
        scale: σ ≥ 0, broadcastable with loc (zero where masked).
        mask: bool tensor broadcastable with loc; True where the weight is active. None: every weight
            is active (a dense site: plain Normal arithmetic, no masking work on the hot path).
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.nonnegative}
    support = constraints.real
    has_rsample = True

    def __init__(self, loc, scale, mask, validate_args=None):
        self.loc, self.scale = broadcast_all(loc, scale)
        self.mask = None if mask is None else mask.expand(self.loc.shape)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(MaskedNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        new.mask = None if self.mask is None else self.mask.expand(batch_shape)
        super(MaskedNormal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    @property
    def variance(self) -> torch.Tensor:
        return self.scale**2

    def _safe_scale(self) -> torch.Tensor:
        return self.scale if self.mask is None else torch.where(self.mask, self.scale, torch.ones_like(self.scale))

    def rsample(self, sample_shape=_EMPTY) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        draw = self.loc + eps * self.scale
        return draw if self.mask is None else torch.where(self.mask, draw, torch.zeros_like(eps))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_density = normal_log_prob(value - self.loc, self._safe_scale())
        return log_density if self.mask is None else torch.where(self.mask, log_density, torch.zeros_like(log_density))

    def entropy(self) -> torch.Tensor:
        entropy = 0.5 + _HALF_LOG_2PI + self._safe_scale().log()
        return entropy if self.mask is None else torch.where(self.mask, entropy, torch.zeros_like(entropy))


def _masked(kl: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return kl if mask is None else torch.where(mask, kl, torch.zeros_like(kl))


@register_kl(MaskedNormal, Normal)
def _kl_masked_normal_normal(q: MaskedNormal, p: Normal) -> torch.Tensor:
    return _masked(kl_normal_normal(q.loc, q._safe_scale(), p.scale, p.loc), q.mask)


@register_kl(MaskedNormal, SpikeAndSlabNormal)
def _kl_masked_normal_spike_and_slab(q: MaskedNormal, p: SpikeAndSlabNormal) -> torch.Tensor:
    kl = kl_normal_to_spike_and_slab(q.loc, q._safe_scale(), p.slab_scale, p.spike_scale, p.inclusion)
    return _masked(kl, q.mask)


@register_kl(Normal, SpikeAndSlabNormal)
def _kl_normal_spike_and_slab(q: Normal, p: SpikeAndSlabNormal) -> torch.Tensor:
    return kl_normal_to_spike_and_slab(q.loc, q.scale, p.slab_scale, p.spike_scale, p.inclusion)


@register_kl(MaskedNormal, MaskedDistribution)
def _kl_masked_normal_to_masked_prior(q: MaskedNormal, p: MaskedDistribution) -> torch.Tensor:
    """KL(q ‖ p) elementwise for a guide's masked Normal and a model's masked prior (``site_prior``): the
    registered KL to p's unmasked prior, zero at p's masked coordinates (where q is the same exact zero).
    Registered so that ``TraceMeanField_ELBO`` uses the closed form on pruned sites as on dense ones."""
    kl = kl_divergence(q, p.base_dist)
    return torch.where(torch.as_tensor(p._mask, device=kl.device), kl, torch.zeros_like(kl))


__all__ = [
    "MaskedNormal",
    "SpikeAndSlabNormal",
    "kl_divergence",
    "kl_normal_normal",
    "kl_normal_to_centered_normal",
    "kl_normal_to_spike_and_slab",
    "normal_log_prob",
]
