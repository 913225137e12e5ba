"""What the chains of an EM-SGHMC run share: the spike-and-slab hyperparameters and the averaged sufficient
statistics they come from (``SharedEM``), and the all-reduce that pools statistics over processes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..distributed import World, sum_
from ..priors import SpikeAndSlab, adaptive_precision, em_statistics, map_hyperparameters

if TYPE_CHECKING:
    from .em_kernel import RunConfig


class SharedEM:
    """The hyperparameters all chains share and the averaged sufficient statistics they come from.

    inclusion π, slab_scale σ₁: 0-dim; spike_scale σ₀: (G,) per site; groups: (W,) the site of each
    weight; statistics: the stochastic-approximation average of the pooled ``em_statistics``.
    """

    def __init__(self, prior: SpikeAndSlab, spike_scale: torch.Tensor, groups: torch.Tensor, chains: int,
                 config: RunConfig):
        self.config = config
        self.groups = groups
        self.hyper = {"inclusion": prior.inclusion.detach().clone(), "slab_scale": prior.slab_scale.detach().clone(),
                      "spike_scale": spike_scale.to(prior.slab_scale)}
        self.hyper["slab_scale"] = torch.maximum(self.hyper["slab_scale"], spike_scale.max() * 1.01)
        self.statistics = self._implied_statistics(chains)

    def _implied_statistics(self, chains: int) -> dict[str, torch.Tensor]:
        """Statistics of ``chains`` chains whose MAP values (flat priors) are the current hyperparameters."""
        pi, slab, spike = self.hyper["inclusion"], self.hyper["slab_scale"], self.hyper["spike_scale"]
        sizes = torch.bincount(self.groups, minlength=len(spike)).to(slab) * chains
        count = sizes.sum()
        return {"count": count, "included": count * pi, "slab_square": count * pi * slab**2,
                "spike_count": sizes * (1 - pi), "spike_square": sizes * (1 - pi) * spike**2}

    @property
    def spike_per_weight(self) -> torch.Tensor:
        """σ₀ of each site weight (W,)."""
        return self.hyper["spike_scale"][self.groups]

    def mixture(self):
        """The spike-and-slab of every site weight under the shared hyperparameters (batch shape (W,))."""
        from ..distributions import SpikeAndSlabNormal

        return SpikeAndSlabNormal(self.hyper["slab_scale"], self.spike_per_weight, self.hyper["inclusion"])

    def responsibilities(self, weights: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The E-step of a chain's weights (W,) with active ``mask`` (W,): γ(w) per weight (0 where removed),
        and the units' ρ_k (None: no units)."""
        return self.mixture().inclusion_probability(weights).mul_(mask), None

    def statistics_of(self, inclusion: torch.Tensor, weights: torch.Tensor,
                      unit_inclusion: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return em_statistics(inclusion, weights, self.groups, len(self.hyper["spike_scale"]))

    def log_prior(self, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """log p(w) of the active weights under the shared prior (0-dim)."""
        return self.mixture().log_prob(weights)[mask].sum()

    def unit_values(self) -> dict[str, float]:
        """The units' shared values for the traces (none without units)."""
        return {}

    def map_of(self, statistics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        config = self.config
        return map_hyperparameters(statistics, self.hyper["spike_scale"], config.beta_prior, config.slab_prior,
                                   config.spike_prior)

    def precision(self, inclusion: torch.Tensor) -> torch.Tensor:
        """The adaptive-L2 precision (W,) of a chain with inclusion averages ρ."""
        return adaptive_precision(inclusion, self.hyper["slab_scale"], self.spike_per_weight)

    def implied(self, weights: torch.Tensor, mask: torch.Tensor, seed: int) -> dict[str, float]:
        """What one chain's draw says about π and σ₁ on its own (γ = γ(w) under the shared values):

        - "implied_inclusion", "implied_slab_scale": the MAP M-step of the chain's statistics alone;
        - "conditional_inclusion", "conditional_slab_scale": a draw from their conditional posterior
          given the weights, z_j ~ Bernoulli(γ_j), π ~ Beta(a + Σz, b + p − Σz),
          σ₁² ~ InvGamma(α + Σz/2, β + Σz w²/2) (whose mode is the M-step), seeded by ``seed``.

        Removed weights count as spike (γ = z = 0)."""
        gamma = self.mixture().inclusion_probability(weights) * mask
        new = self.map_of(self.statistics_of(gamma, weights))
        (a, b), (alpha, beta) = self.config.beta_prior, self.config.slab_prior
        with torch.random.fork_rng(devices=[weights.device] if weights.is_cuda else []):
            torch.manual_seed(seed)
            z = (torch.rand(gamma.shape, device=gamma.device) < gamma).to(weights.dtype)
            included, count = z.sum(), float(weights.numel())
            gamma_draws = torch._standard_gamma(torch.stack([included + a, count - included + b,
                                                             alpha + included / 2]))
        pi = gamma_draws[0] / (gamma_draws[0] + gamma_draws[1])
        slab_variance = (beta + torch.dot(z, weights * weights) / 2) / gamma_draws[2]
        return {"implied_inclusion": float(new["inclusion"]), "implied_slab_scale": float(new["slab_scale"]),
                "conditional_inclusion": float(pi), "conditional_slab_scale": float(slab_variance.sqrt())}

    def state_dict(self) -> dict[str, Any]:
        return {"hyper": self.hyper, "statistics": self.statistics}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.hyper, self.statistics = saved["hyper"], saved["statistics"]


def all_reduced(statistics: dict[str, torch.Tensor], world: World) -> dict[str, torch.Tensor]:
    """The statistics summed over the processes: one all-reduce of their concatenation."""
    if not world.active:
        return statistics
    flat = torch.cat([value.reshape(-1) for value in statistics.values()])
    sum_(flat, world)
    pieces = flat.split([value.numel() for value in statistics.values()])
    return {key: piece.view_as(value) for (key, value), piece in zip(statistics.items(), pieces, strict=True)}
