"""Weight priors: hyperparameters as tensors, a Pyro distribution per site, KL from a Normal.

A prior is an ``nn.Module`` whose hyperparameters are buffers, so they move with ``.to(device)``,
are saved in checkpoints, and can be updated in place by an M-step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn

from .distributions import (
    SpikeAndSlabNormal,
    kl_normal_normal,
    kl_normal_to_spike_and_slab,
    normal_log_prob,
)
from .pyro_model import TracedSite


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

    def scale_weight(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """The network's weight given the value of its sample site ``name``: the value itself. A
        non-centred prior (``NodeHorseshoe``) samples its scale sites here and returns value × scale."""
        return value

    def latent_sites(
        self, sites: Mapping[str, Any], initial: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Every latent site of a ``BayesianNetwork`` under this prior, for its guide.

        Args:
            sites: weight site name -> its ``Site``, in the order the model samples them.
            initial: weight site name -> the network's initial weight (the site's shape).

        Returns:
            (site name -> ``Site`` or ``TracedSite``: the weight sites and the prior's own (none here), in
            the order the model samples them; site name -> initial value in the unconstrained space:
            the weight sites' (the guide's μ) and the prior's own sites').
        """
        return dict(sites), dict(initial)

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


SCALE_SITES = ("unit_scale", "layer_scale", "slab")
"""The scale sites of a weight site ``W`` under ``NodeHorseshoe``: ``W.unit_scale``, ``W.layer_scale``, ``W.slab``."""

_LOG_2_OVER_PI = math.log(2 / math.pi)

INIT_HINT = "pyro_sparse_init"
"""Key of a sample site's ``infer`` dict holding a starting value (constrained) for a guide of a traced model."""


def regularized_scale(log_unit: torch.Tensor, log_layer: torch.Tensor, log_slab: torch.Tensor) -> torch.Tensor:
    """τ̃ = (c² λ² υ² / (c² + λ² υ²))^½ from log λ (out,), log υ and log c² (0-dim), computed as
    exp(−½ logaddexp(−log c², −2 (log λ + log υ))) (no overflow for any scale): shape (out,)."""
    return torch.exp(-0.5 * torch.logaddexp(-log_slab, -2.0 * (log_unit + log_layer)))


class NodeHorseshoe(Prior):
    """The regularized node-wise horseshoe of Ghosh, Yao & Doshi-Velez (JMLR 2019), non-centred.

    For a weight site ``W`` of shape (out, ...) whose units lie along dim 0 (the rows of a Linear
    weight, the output channels of a convolution's), with k = 1 ... out:

        β ~ N(0, 1)                           the site ``W`` itself (the weight's shape)
        λ_k ~ HalfCauchy(node_scale)          the site ``W.unit_scale`` (out,): one scale per unit
        υ ~ HalfCauchy(global_scale)          the site ``W.layer_scale`` (): one per layer
        c² ~ InverseGamma(ν/2, ν s²/2)        the site ``W.slab`` (): one per layer, ν = slab_df, s = slab_scale
        τ̃_k² = c² λ_k² υ² / (c² + λ_k² υ²),   w_k = τ̃_k β_k (row k of the network's weight)

    The model samples β at the weight's own site and the scales at three sites beside it; the network
    computes with w (``scale_weight``). A unit whose scale τ̃_k is small is switched off: all its incoming
    weights are near zero. c² softly caps τ̃ (the "slab"): τ̃ ≤ c.

    As a ``Prior`` of its site this is the N(0, 1) of β: ``distribution``, ``log_prob``, ``kl`` and
    ``second_moment_kl`` are those of a standard normal; the scale sites are the prior's own
    (``scale_distributions``, ``latent_sites``).

    Args:
        node_scale: b₀ > 0, the scale of the per-unit half-Cauchy (the paper's b₀ = 1).
        global_scale: b_g > 0, the scale of the per-layer half-Cauchy. Default 1e-5, the authors'
            setting for classification: strong shrinkage near zero, while the heavy tail lets the data
            pull υ far above b_g (for υ ≫ b_g, b_g only shifts log p(υ) by a constant).
        slab_scale: s > 0 and slab_df: ν > 0 of the slab c² ~ InverseGamma(ν/2, ν s²/2). Defaults
            ν = 4, s = √3: the authors' InverseGamma(2, 6) (mode of c² 2, median 3.6, mean 6).

    The defaults are the authors' (their released code: b₀ = 1, b_g = 1e-5 for classification,
    c² ~ InverseGamma(2, 6)). On digits (mlp 64-100-10, 20 % of the training split held out, 30
    epochs, two seeds) b_g ∈ {1e-5, 1}, s ∈ {1, √3, 5} and b₀ ∈ {0.1, 1} all gave validation accuracy
    within 0.7 points of each other (0.930–0.937 and 0.952): the data set the scales far above b_g,
    so nothing argued for other values.

    Deviations from the paper are listed in ``pyro_sparse.guides.horseshoe``.
    """

    def __init__(
        self,
        node_scale: float | torch.Tensor = 1.0,
        global_scale: float | torch.Tensor = 1e-5,
        slab_scale: float | torch.Tensor = 3.0**0.5,
        slab_df: float | torch.Tensor = 4.0,
    ):
        super().__init__()
        self.register_buffer("node_scale", _positive_scalar("NodeHorseshoe prior: node_scale", node_scale))
        self.register_buffer("global_scale", _positive_scalar("NodeHorseshoe prior: global_scale", global_scale))
        self.register_buffer("slab_scale", _positive_scalar("NodeHorseshoe prior: slab_scale", slab_scale))
        self.register_buffer("slab_df", _positive_scalar("NodeHorseshoe prior: slab_df", slab_df))

    # -- the weight site: β ~ N(0, 1) --
    def distribution(self, shape: torch.Size) -> dist.TorchDistribution:
        zero = torch.zeros((), device=self.node_scale.device)
        return dist.Normal(zero, torch.ones_like(zero)).expand(shape).to_event(len(shape))

    def log_prob(self, weight: torch.Tensor) -> torch.Tensor:
        return normal_log_prob(weight, torch.ones((), dtype=weight.dtype, device=weight.device))

    def kl(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return kl_normal_normal(loc, scale, torch.ones((), dtype=loc.dtype, device=loc.device))

    def second_moment_kl(
        self, loc: torch.Tensor, var: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # KL(N(μ, σ²) ‖ N(0, 1)) = (μ² + σ²)/2 − 1/2 − log σ: g(q) = q/2 − 1/2, g′ = 1/2
        active = var.numel() if mask is None else mask.sum()
        flat_loc = loc.reshape(-1)
        return 0.5 * (var.sum() + torch.dot(flat_loc, flat_loc)) - 0.5 * active, loc.new_tensor(0.5)

    # -- the scale sites --
    def scale_distributions(self, units: int) -> dict[str, dist.TorchDistribution]:
        """The priors of the scale sites of a weight with ``units`` units, by role (``SCALE_SITES``):
        λ (event shape (units,)), υ and c² (scalars)."""
        half_df = 0.5 * self.slab_df
        return {
            "unit_scale": dist.HalfCauchy(self.node_scale).expand([units]).to_event(1),
            "layer_scale": dist.HalfCauchy(self.global_scale),
            "slab": dist.InverseGamma(half_df, half_df * self.slab_scale**2),
        }

    def log_prob_scales(self, role: str, log_value: torch.Tensor) -> torch.Tensor:
        """Σ log p(x) of the scale site ``role`` at x = exp(``log_value``) (any shape), in closed form from
        the log (the fused objective's hot path; equal to ``scale_distributions``' log_prob):
        log(2/π) + log b − log(b² + x²) for a half-Cauchy(b), and
        α log β − log Γ(α) − (α + 1) log x − β / x for c² ~ InverseGamma(α, β)."""
        if role == "slab":
            alpha = 0.5 * self.slab_df
            beta = alpha * self.slab_scale**2
            per_value = alpha * beta.log() - torch.lgamma(alpha) - (alpha + 1) * log_value - beta * (-log_value).exp()
        else:
            log_b = (self.node_scale if role == "unit_scale" else self.global_scale).log()
            per_value = _LOG_2_OVER_PI + log_b - torch.logaddexp(2 * log_b, 2 * log_value)
        return per_value.sum()

    def initial_scales(self, shape: torch.Size, weight_scale: float | None = None) -> dict[str, torch.Tensor]:
        """Starting values (constrained) of the scale sites of a weight of ``shape`` for a guide: λ = 1,
        υ = ``weight_scale`` (default 1/√fan_in, fan_in = the size of one unit's incoming weights),
        c² = s² (3 for the defaults, near the prior's median 3.6). Starting at the prior's median instead
        (υ = b_g = 1e-5) would start a network whose every weight is ~1e-5: its units dead, their
        gradients ~1e-5."""
        fan_in = max(int(torch.Size(shape)[1:].numel()), 1)
        layer = 1.0 / math.sqrt(fan_in) if weight_scale is None else weight_scale
        device = self.node_scale.device
        return {"unit_scale": torch.ones(shape[0], device=device),
                "layer_scale": torch.tensor(float(layer), device=device),
                "slab": (self.slab_scale**2).clone()}

    def scale_weight(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Sample the scale sites of weight site ``name`` and return w = τ̃ β, τ̃ (out,) broadcast over
        each unit's incoming weights; ``value`` is β (out, ...)."""
        starts = self.initial_scales(value.shape)
        scales = {
            role: pyro.sample(f"{name}.{role}", prior, infer={INIT_HINT: starts[role]})
            for role, prior in self.scale_distributions(value.shape[0]).items()
        }
        tau = regularized_scale(scales["unit_scale"].log(), scales["layer_scale"].log(), scales["slab"].log())
        return value * tau.reshape(-1, *([1] * (value.dim() - 1)))

    def latent_sites(
        self, sites: Mapping[str, Any], initial: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Each weight site followed by its three scale sites, and starting values with which the
        network's weights w = τ̃ β equal its own initialisation: λ = 1, c² = s², υ = the standard
        deviation of the initial weight, β = w₀ / τ̃ (log values for the scale sites: their
        unconstrained space)."""
        latent, values = {}, {}
        for name, weight in initial.items():
            latent[name] = sites[name]
            spread = float(weight.std()) if weight.numel() > 1 else 0.0
            starts = self.initial_scales(weight.shape, spread if math.isfinite(spread) and spread > 0 else None)
            for role, value in starts.items():
                site = f"{name}.{role}"
                latent[site] = TracedSite(site, value.shape, value.shape, value.dim(), constraints.positive, ())
                values[site] = value.to(weight).log()
            tau = regularized_scale(values[f"{name}.unit_scale"], values[f"{name}.layer_scale"],
                                    values[f"{name}.slab"])
            values[name] = weight / tau.reshape(-1, *([1] * (weight.dim() - 1)))
        return latent, values

    def extra_repr(self) -> str:
        return (f"node_scale={float(self.node_scale):g}, global_scale={float(self.global_scale):g}, "
                f"slab_scale={float(self.slab_scale):g}, slab_df={float(self.slab_df):g}")


def node_horseshoe_weight(name: str, shape: tuple[int, ...] | torch.Size,
                          prior: NodeHorseshoe | None = None) -> torch.Tensor:
    """A weight under the node-wise horseshoe, inside a hand-written Pyro model.

    Samples β at site ``name`` (``shape`` = (out, ...), units along dim 0) and its scale sites
    ``name.unit_scale`` (out,), ``name.layer_scale``, ``name.slab`` (``NodeHorseshoe``), and returns
    the weight w = τ̃ β (``shape``) to compute with::

        def model(x, y=None):
            w1 = ps.priors.node_horseshoe_weight("fc1.weight", (20, 5), prior)
            ...

    The guides of this package put a Normal on β and a log-normal on each scale; ``ps.fit`` trains
    them (Pyro's traces), and ``guides.horseshoe.unit_scales(guide)`` gives each unit's posterior scale.
    """
    prior = prior if prior is not None else NodeHorseshoe()
    if not isinstance(prior, NodeHorseshoe):
        raise ValueError(f"node_horseshoe_weight needs a NodeHorseshoe prior, got {type(prior).__name__}")
    shape = torch.Size(shape)
    if len(shape) < 1 or shape.numel() == 0:
        raise ValueError(f"node_horseshoe_weight: shape must be (out, ...) with no zero size, got {tuple(shape)}")
    return prior.scale_weight(name, pyro.sample(name, prior.distribution(shape)))


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


PRIORS = {"gaussian": Gaussian, "spike-slab": SpikeAndSlab, "horseshoe": NodeHorseshoe}


def build(name: str, **kwargs) -> Prior:
    """A prior by its CLI name ("gaussian", "spike-slab" or "horseshoe")."""
    key = name.lower().replace("_", "-")
    if key not in PRIORS:
        raise ValueError(f"unknown prior {name!r}; choose one of: {', '.join(sorted(PRIORS))}")
    return PRIORS[key](**kwargs)

