"""Weight priors: hyperparameters as tensors, a Pyro distribution per site, KL from a Normal.

A prior is an ``nn.Module`` whose hyperparameters are buffers, so they move with ``.to(device)``,
are saved in checkpoints, and can be updated in place by an M-step.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn

from .distributions import (
    SpikeAndSlabNormal,
    kl_normal_normal,
    kl_normal_to_spike_and_slab,
    normal_log_prob,
)


def _positive_scalar(name: str, value: float | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.get_default_dtype())
    if tensor.numel() != 1 or not math.isfinite(float(tensor)) or float(tensor) <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return tensor.reshape(())


class Prior(nn.Module):
    """Base class: a fully factorised prior over every Bayesian weight."""

    def distribution(self, shape: torch.Size) -> dist.TorchDistribution:
        """The Pyro distribution of one sample site with event shape ``shape``."""
        raise NotImplementedError

    def log_prob(self, weight: torch.Tensor) -> torch.Tensor:
        """log p(w), elementwise: same shape as ``weight``."""
        raise NotImplementedError

    def kl(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """KL(N(loc, scale²) ‖ p) elementwise (or a closed-form upper bound), same shape as loc."""
        raise NotImplementedError

    def second_moment_kl(
        self, loc: torch.Tensor, var: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For priors that are mixtures of zero-mean Gaussians, KL(N(μ, σ²) ‖ p) = g(μ² + σ²) − log σ.

        Args:
            loc, var: μ and σ² per weight (any shape, zero where masked).
            mask: float 0/1 of the same shape (None: all weights active).

        Returns:
            (Σ over active weights of g(q), g′(q)), q = μ² + σ² — a 0-dim tensor and a tensor
            broadcastable to q (0-dim when g is linear). Used, without autograd, by the fused kernel
            ``guides.fused.SoftplusKL``.
        """
        raise NotImplementedError(f"{type(self).__name__} has no second-moment form of its KL")

    def total_kl(self, loc: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Σ of ``kl`` over the weights where ``mask`` is True (all if None): a scalar.

        Masked weights may carry scale 0; they contribute exactly zero (and zero gradient).
        """
        if mask is None:
            return self.kl(loc, scale).sum()
        safe_scale = torch.where(mask, scale, torch.ones_like(scale))
        kl = self.kl(loc, safe_scale)
        return torch.where(mask, kl, torch.zeros_like(kl)).sum()


class Gaussian(Prior):
    """p(w) = N(0, scale²) for every weight.

    Args:
        scale: the prior standard deviation, > 0.
    """

    def __init__(self, scale: float | torch.Tensor = 1.0):
        super().__init__()
        self.register_buffer("scale", _positive_scalar("Gaussian prior: scale", scale))

    def distribution(self, shape: torch.Size) -> dist.TorchDistribution:
        return dist.Normal(torch.zeros((), device=self.scale.device), self.scale).expand(shape).to_event(
            len(shape)
        )

    def log_prob(self, weight: torch.Tensor) -> torch.Tensor:
        return normal_log_prob(weight, self.scale)

    def kl(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return kl_normal_normal(loc, scale, self.scale)

    def second_moment_kl(
        self, loc: torch.Tensor, var: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # g(q) = q / (2σₚ²) + log σₚ − 1/2, zero where masked since q = 0 there; Σ q = Σ σ² + μ·μ
        # without forming q (no pass that writes a tensor)
        active = var.numel() if mask is None else mask.sum()
        slope = 0.5 / self.scale**2
        flat_loc = loc.reshape(-1)
        return slope * (var.sum() + torch.dot(flat_loc, flat_loc)) + active * (self.scale.log() - 0.5), slope

    def extra_repr(self) -> str:
        return f"scale={float(self.scale):g}"


class SpikeAndSlab(Prior):
    """p(w) = π N(0, σ₁²) + (1 − π) N(0, σ₀²) for every weight, σ₀ < σ₁.

    Args:
        slab_scale: σ₁ > 0, the scale of the weights that matter.
        spike_scale: σ₀, 0 < σ₀ < σ₁, the scale of the weights to be pruned.
        inclusion: π ∈ (0, 1), the prior probability of the slab.
    """

    def __init__(
        self,
        slab_scale: float | torch.Tensor = 1.0,
        spike_scale: float | torch.Tensor = 0.01,
        inclusion: float | torch.Tensor = 0.5,
    ):
        super().__init__()
        slab = _positive_scalar("SpikeAndSlab prior: slab_scale", slab_scale)
        spike = _positive_scalar("SpikeAndSlab prior: spike_scale", spike_scale)
        if spike >= slab:
            raise ValueError(
                f"SpikeAndSlab prior: spike_scale must be smaller than slab_scale, got "
                f"spike_scale={float(spike):g} and slab_scale={float(slab):g}"
            )
        pi = torch.as_tensor(inclusion, dtype=torch.get_default_dtype())
        if pi.numel() != 1 or not 0.0 < float(pi) < 1.0:
            raise ValueError(f"SpikeAndSlab prior: inclusion must lie in (0, 1), got {inclusion!r}")
        self.register_buffer("slab_scale", slab)
        self.register_buffer("spike_scale", spike)
        self.register_buffer("inclusion", pi.reshape(()))

    def distribution(self, shape: torch.Size) -> dist.TorchDistribution:
        return SpikeAndSlabNormal(self.slab_scale, self.spike_scale, self.inclusion, source=self).expand(
            shape
        ).to_event(len(shape))

    def log_prob(self, weight: torch.Tensor) -> torch.Tensor:
        return SpikeAndSlabNormal(self.slab_scale, self.spike_scale, self.inclusion).log_prob(weight)

    def inclusion_probability(self, weight: torch.Tensor) -> torch.Tensor:
        """γ(w) = π N(w; 0, σ₁²) / p(w), elementwise: the E-step's slab responsibility."""
        return SpikeAndSlabNormal(self.slab_scale, self.spike_scale, self.inclusion).inclusion_probability(
            weight
        )

    def kl(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return kl_normal_to_spike_and_slab(loc, scale, self.slab_scale, self.spike_scale, self.inclusion)

    def second_moment_kl(
        self, loc: torch.Tensor, var: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        second_moment = torch.addcmul(var, loc, loc)
        # The bound −log Σₖ πₖ exp(−KLₖ) with KLₖ = q / (2σₖ²) + log σₖ − 1/2 − log σ is
        # g(q) − log σ with g(q) = −1/2 − logaddexp(t₁, t₀), tₖ = log πₖ − log σₖ − q / (2σₖ²).
        # logaddexp(t₁, t₀) = t₀ + softplus(d), d = t₁ − t₀, and g′(q) = γ/(2σ₁²) + (1 − γ)/(2σ₀²),
        # γ = sigmoid(d): the slab's responsibility. softplus(d) = relu(d) − log sigmoid(|d|) uses
        # only ATen's fast vectorised functions (absolute error ~1e−7).
        half_precision_slab, half_precision_spike = 0.5 / self.slab_scale**2, 0.5 / self.spike_scale**2
        offset_slab = self.inclusion.log() - self.slab_scale.log()
        offset_spike = torch.log1p(-self.inclusion) - self.spike_scale.log()
        d = torch.add(second_moment * (half_precision_spike - half_precision_slab), offset_slab - offset_spike)
        softplus_d = torch.relu(d).sub_(torch.sigmoid(d.abs()).log_())
        responsibility = torch.sigmoid(d)
        slope = responsibility.mul_(half_precision_slab - half_precision_spike).add_(half_precision_spike)
        per_weight = softplus_d.sub_(second_moment * half_precision_spike)  # softplus(d) + t₀ − offset_spike
        if mask is None:
            total_softplus, active = per_weight.sum(), second_moment.numel()
        else:
            total_softplus, active = torch.dot(per_weight.reshape(-1), mask.reshape(-1)), mask.sum()
        return -total_softplus - active * (0.5 + offset_spike), slope

    # -- EM (Deng et al., 2019): the E-step is ``inclusion_probability``; these are the M-step side --
    def adaptive_precision(self, inclusion: torch.Tensor) -> torch.Tensor:
        """Per-weight precision ρ/σ₁² + (1 − ρ)/σ₀² of the adaptive L2 prior, for inclusion
        probabilities ρ (any shape): −λ w is the prior gradient EM-SGHMC samples with."""
        return adaptive_precision(inclusion, self.slab_scale, self.spike_scale)

    @torch.no_grad()
    def m_step(
        self,
        inclusion: torch.Tensor,
        weight: torch.Tensor,
        rate: float = 1.0,
        beta_prior: tuple[float, float] = (1.0, 1.0),
        slab_prior: tuple[float, float] = (1.0, 1.0),
        spike_prior: tuple[float, float] | None = None,
    ) -> dict[str, float]:
        """M-step: move the hyperparameters (in place) a fraction ``rate`` towards their MAP values
        given ρ and w (``map_hyperparameters`` of ``em_statistics``).

        Args:
            inclusion: ρ, the E-step's inclusion probabilities (any shape; removed weights carry
                ρ = 0 and w = 0, so they count as spike).
            weight: w, the same shape.
            rate: ω ∈ (0, 1] (1 = jump to the MAP values).
            beta_prior, slab_prior, spike_prior: as in ``map_hyperparameters``.

        Returns the new values as floats.
        """
        groups = torch.zeros(inclusion.numel(), dtype=torch.long, device=inclusion.device)
        stats = em_statistics(inclusion.reshape(-1), weight.reshape(-1), groups, 1)
        new = map_hyperparameters(stats, self.spike_scale.reshape(1), beta_prior, slab_prior, spike_prior)
        self.inclusion.lerp_(new["inclusion"].to(self.inclusion), rate)
        self.spike_scale.lerp_(new["spike_scale"].reshape(()).to(self.spike_scale), rate)
        self.slab_scale.lerp_(new["slab_scale"].to(self.slab_scale), rate)
        self.slab_scale.clamp_(min=float(self.spike_scale) * 1.01)
        return {"inclusion": float(self.inclusion), "slab_scale": float(self.slab_scale),
                "spike_scale": float(self.spike_scale)}

    def extra_repr(self) -> str:
        return (
            f"slab_scale={float(self.slab_scale):g}, spike_scale={float(self.spike_scale):g}, "
            f"inclusion={float(self.inclusion):g}"
        )


# ----------------------------------------------------------------------------------------------
# EM for spike-and-slab hyperparameters, from sufficient statistics (shared by one chain, many
# chains, or many ranks: statistics add up, so pooling is a sum or an all-reduce)
# ----------------------------------------------------------------------------------------------
def adaptive_precision(inclusion: torch.Tensor, slab_scale: torch.Tensor, spike_scale: torch.Tensor) -> torch.Tensor:
    """ρ/σ₁² + (1 − ρ)/σ₀², elementwise; σ₀ may be a tensor broadcastable to ρ (per-weight σ₀)."""
    slab, spike = slab_scale.pow(-2), spike_scale.pow(-2)
    return torch.lerp(spike.expand_as(inclusion), slab.expand_as(inclusion), inclusion)


def em_statistics(inclusion: torch.Tensor, weight: torch.Tensor, groups: torch.Tensor,
                  num_groups: int) -> dict[str, torch.Tensor]:
    """The sufficient statistics of the spike-and-slab M-step.

    Args:
        inclusion: ρ (W,), inclusion probabilities (0 for removed weights, which count as spike).
        weight: w (W,).
        groups: (W,) long, the σ₀ group (layer) of each weight, in [0, num_groups).

    Returns:
        "count" p (0-dim), "included" Σρ (0-dim), "slab_square" Σρw² (0-dim),
        "spike_count" Σ(1 − ρ) per group (G,), "spike_square" Σ(1 − ρ)w² per group (G,).
    """
    square = weight * weight
    excluded = 1 - inclusion
    zeros = torch.zeros(num_groups, dtype=weight.dtype, device=weight.device)
    return {"count": torch.tensor(float(weight.numel()), dtype=weight.dtype, device=weight.device),
            "included": inclusion.sum(), "slab_square": torch.dot(inclusion, square),
            "spike_count": zeros.index_add(0, groups, excluded),
            "spike_square": zeros.index_add(0, groups, excluded * square)}


def log_slab_ratio(weight: torch.Tensor, slab_scale: torch.Tensor, spike_scale: torch.Tensor) -> torch.Tensor:
    """log N(w; 0, σ₁²) − log N(w; 0, σ₀²) = log(σ₀/σ₁) + w² (σ₀⁻² − σ₁⁻²) / 2, elementwise (σ₀ may be a
    tensor broadcastable to w)."""
    return (spike_scale.log() - slab_scale.log()) + 0.5 * weight.square() * (spike_scale.pow(-2) - slab_scale.pow(-2))


def group_inclusion_probability(weight: torch.Tensor, group: torch.Tensor, num_groups: int, inclusion: torch.Tensor,
                                slab_scale: torch.Tensor, spike_scale: torch.Tensor,
                                mask: torch.Tensor | None = None) -> torch.Tensor:
    """The E-step of a group spike-and-slab (one inclusion variable z_k per group of weights):

        ρ_k = σ(logit π + Σ_{j: group_j = k} [log N(w_j; 0, σ₁²) − log N(w_j; 0, σ₀_j²)]),

    the posterior probability that all of group k's weights came from the slab. With one weight per
    group it is the per-weight γ(w).

    Args:
        weight: w (M,); group: (M,) long, the group of each weight, in [0, num_groups);
        inclusion: π (0-dim); slab_scale: σ₁ (0-dim); spike_scale: σ₀ (0-dim or (M,));
        mask: (M,) bool or 0/1, the weights that take part (removed ones do not; None: all).

    Returns ρ (num_groups,).
    """
    ratio = log_slab_ratio(weight, slab_scale, spike_scale)
    if mask is not None:
        ratio = ratio * mask.to(ratio.dtype)
    total = torch.zeros(num_groups, dtype=ratio.dtype, device=ratio.device).index_add_(0, group, ratio)
    return torch.sigmoid(total + torch.logit(inclusion))


def group_log_prob(weight: torch.Tensor, group: torch.Tensor, num_groups: int, inclusion: torch.Tensor,
                   slab_scale: torch.Tensor, spike_scale: torch.Tensor, mask: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """log p(w_k) = log[π Π_j N(w_kj; 0, σ₁²) + (1 − π) Π_j N(w_kj; 0, σ₀_j²)] per group (num_groups,),
    by logaddexp; arguments as in ``group_inclusion_probability``."""
    slab, spike = normal_log_prob(weight, slab_scale), normal_log_prob(weight, spike_scale)
    if mask is not None:
        slab, spike = slab * mask.to(slab.dtype), spike * mask.to(spike.dtype)
    zeros = torch.zeros(num_groups, dtype=slab.dtype, device=slab.device)
    return torch.logaddexp(zeros.index_add(0, group, slab) + inclusion.log(),
                           zeros.index_add(0, group, spike) + torch.log1p(-inclusion))


def group_em_statistics(inclusion: torch.Tensor, weight: torch.Tensor, groups: torch.Tensor, num_groups: int,
                        free: torch.Tensor, unit_inclusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sufficient statistics of the M-step when some weights share an inclusion variable per unit.

    Args:
        inclusion: ρ (W,) per weight: a free weight's own, a unit's weights their unit's ρ_k (0 where removed).
        weight: w (W,); groups: (W,) the σ₀ group (layer) of each weight, as in ``em_statistics``.
        free: (W,) bool, the weights with their own inclusion variable (in no unit).
        unit_inclusion: ρ_k (U,) of the units (0 for removed units).

    Returns ``em_statistics`` of ρ (σ₀ per group from Σ(1 − ρ_i)w_i² as before) with the counts split:
    "count" p_free and "included" Σ_free ρ_j (π of the free weights), "unit_count" U and "unit_included"
    Σ_k ρ_k (π_u of the units), "slab_count" Σ_i ρ_i = Σ_free ρ_j + Σ_k ρ_k n_k (σ₁²'s denominator;
    n_k: unit k's active weights) beside "slab_square" Σ_i ρ_i w_i² = Σ_free ρ_j w_j² + Σ_k ρ_k Σ_j w_kj².
    Sums over weights and units: the statistics of several chains or ranks add up.
    """
    statistics = em_statistics(inclusion, weight, groups, num_groups)
    free = free.to(weight.dtype)
    statistics["slab_count"] = statistics["included"]
    statistics["count"] = free.sum()
    statistics["included"] = torch.dot(inclusion, free)
    statistics["unit_count"] = torch.tensor(float(unit_inclusion.numel()), dtype=weight.dtype, device=weight.device)
    statistics["unit_included"] = unit_inclusion.sum()
    return statistics


def pool_statistics(statistics: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The statistics of several chains (or, all-reduced, ranks) together: their sum."""
    return {key: torch.stack([stats[key] for stats in statistics]).sum(0) for key in statistics[0]}


def map_hyperparameters(
    statistics: dict[str, torch.Tensor],
    spike_scale: torch.Tensor,
    beta_prior: tuple[float, float] = (1.0, 1.0),
    slab_prior: tuple[float, float] = (1.0, 1.0),
    spike_prior: tuple[float, float] | None = None,
) -> dict[str, torch.Tensor]:
    """MAP hyperparameters given ``em_statistics`` (the M-step).

    π* = (Σρ + a − 1) / (p + a + b − 2) under a Beta(a, b) prior (kept inside (0, 1));
    σ₁²* = (Σρw² + 2β) / (Σρ + 2α + 2) under an inverse-gamma(α, β) prior on σ₁² (``slab_prior``);
    σ₀²* per group likewise with weights 1 − ρ under ``spike_prior``, or σ₀ = ``spike_scale`` (G,)
    unchanged when it is None. σ₁ is kept above 1.01 max σ₀.

    With a group spike-and-slab (``group_em_statistics``: one inclusion variable per unit of n_k weights,
    the other weights free): π_u* = (Σ_k ρ_k + a − 1) / (U + a + b − 2) over the U units, π* as above over
    the free weights, σ₁²* = (Σ_k ρ_k Σ_j w_kj² + Σ_free ρ_j w_j² + 2β) / (Σ_k ρ_k n_k + Σ_free ρ_j + 2α + 2)
    (one slab for all weights), σ₀²* per group as above with each weight's ρ. With one weight per unit
    (n_k = 1) these are the per-weight formulas.

    Deviation from Deng et al. (2019): they hold σ₀ and σ₁ fixed and adapt only π (and the noise
    variance); we also estimate σ₁² (and optionally σ₀²) by MAP under an inverse-gamma prior, because
    the right slab scale depends on the network and the data and is not known in advance.
    """
    a, b = beta_prior
    included = statistics["included"]
    pi = ((included + a - 1) / (statistics["count"] + a + b - 2)).clamp(1e-6, 1 - 1e-6)
    alpha, beta = slab_prior
    slab_count = statistics.get("slab_count", included)  # ``group_em_statistics``: Σ_i ρ_i over every weight
    slab = ((statistics["slab_square"] + 2 * beta) / (slab_count + 2 * alpha + 2)).sqrt()
    spike = spike_scale.to(slab)
    if spike_prior is not None:
        alpha0, beta0 = spike_prior
        spike = ((statistics["spike_square"] + 2 * beta0) / (statistics["spike_count"] + 2 * alpha0 + 2)).sqrt()
    new = {"inclusion": pi, "slab_scale": torch.maximum(slab, spike.max() * 1.01), "spike_scale": spike}
    if "unit_count" in statistics:  # a group spike-and-slab: π_u of the units, π of the free weights
        new["unit_inclusion"] = _beta_map(statistics["unit_included"], statistics["unit_count"], a, b)
        new["inclusion"] = _beta_map(included, statistics["count"], a, b)
    return new


def _beta_map(included: torch.Tensor, count: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """(included + a − 1) / (count + a + b − 2) kept inside (0, 1); 1/2 when nothing is counted (0/0)."""
    denominator = count + a + b - 2
    value = (included + a - 1) / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, value, torch.full_like(value, 0.5)).clamp(1e-6, 1 - 1e-6)


PRIORS = {"gaussian": Gaussian, "spike-slab": SpikeAndSlab}


def build(name: str, **kwargs) -> Prior:
    """A prior by its CLI name ("gaussian" or "spike-slab")."""
    key = name.lower().replace("_", "-")
    if key not in PRIORS:
        raise ValueError(f"unknown prior {name!r}; choose one of: {', '.join(sorted(PRIORS))}")
    return PRIORS[key](**kwargs)

