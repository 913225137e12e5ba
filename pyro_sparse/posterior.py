"""Posterior: draws of a model's Bayesian weights, from a guide or from stored samples, and the
posterior predictive computed from them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from .guides.meanfield import MeanField
from .model import BayesianNetwork

WeightDraw = dict[str, torch.Tensor]


class Posterior:
    """Posterior draws of the Bayesian weights of ``model``.

    Build with ``Posterior.from_guide(model, guide)`` (fresh draws from q on demand) or
    ``Posterior.from_samples(model, samples)`` (stored draws, e.g. from a sampler).
    """

    def __init__(
        self,
        model: BayesianNetwork,
        draw: Callable[[int], Iterator[WeightDraw]],
        active_counts: Callable[[], dict[str, int]],
        num_stored: int | None = None,
    ):
        self.model = model
        self._draw = draw
        self._active_counts = active_counts
        self.num_stored = num_stored

    @classmethod
    def from_guide(cls, model: BayesianNetwork, guide: MeanField) -> Posterior:
        def draw(num_samples: int) -> Iterator[WeightDraw]:
            for _ in range(num_samples):
                yield guide.sample_weights()

        return cls(model, draw, guide.active_counts)

    @classmethod
    def from_samples(cls, model: BayesianNetwork, samples: Mapping[str, torch.Tensor]) -> Posterior:
        """``samples``: site name -> tensor (S, *site shape) of stored draws."""
        missing = set(model.sites) - set(samples)
        if missing:
            raise ValueError(f"samples lack the Bayesian sites {sorted(missing)}")
        sizes = {len(value) for value in samples.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError(f"samples must hold the same positive number of draws per site, got {sorted(sizes)}")
        stored = sizes.pop()

        def draw(num_samples: int) -> Iterator[WeightDraw]:
            for i in range(min(num_samples, stored)):
                yield {name: value[i] for name, value in samples.items()}

        def active_counts() -> dict[str, int]:
            return {name: int((value != 0).any(0).sum()) for name, value in samples.items()}

        return cls(model, draw, active_counts, num_stored=stored)

    def draws(self, num_samples: int) -> Iterator[WeightDraw]:
        """Up to ``num_samples`` weight draws (all stored ones at most)."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        return self._draw(num_samples)

    def active_counts(self) -> dict[str, int]:
        """Site name -> number of weights that are not exactly zero."""
        return self._active_counts()

    @torch.no_grad()
    def predict(self, x: torch.Tensor, num_samples: int = 32, batch_size: int = 1024) -> torch.Tensor:
        """Network outputs under each draw: x (N, ...) -> (S, N, *output shape).

        Every draw is one whole network, shared by all N examples.
        """
        device = next(iter(self.model.net.buffers())).device
        was_training = self.model.training
        self.model.eval()
        try:
            outputs = []
            for weights in self.draws(num_samples):
                chunks = [self.model.apply(x[i : i + batch_size].to(device), weights).cpu()
                          for i in range(0, len(x), batch_size)]
                outputs.append(torch.cat(chunks))
        finally:
            self.model.train(was_training)
        return torch.stack(outputs)

    def predict_proba(self, x: torch.Tensor, num_samples: int = 32, batch_size: int = 1024) -> torch.Tensor:
        """Posterior predictive class probabilities averaged over draws: (N, C)."""
        return self.predict(x, num_samples, batch_size).softmax(-1).mean(0)
