"""Posterior: draws of a model's Bayesian weights, from a guide or from stored samples, and the
posterior predictive computed from them; ``to_arviz`` hands the draws to ArviZ."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from .guides.meanfield import MeanField
from .layers import substituted_parameters
from .model import BayesianNetwork
from .validation import check_count

WeightDraw = dict[str, torch.Tensor]


def check_model_type(model: Any, where: str) -> None:
    """A TypeError unless ``model`` is a ``BayesianNetwork`` (e.g. when a guide and a model are swapped)."""
    if isinstance(model, BayesianNetwork):
        return
    if callable(model) and not isinstance(model, MeanField | Posterior):
        raise TypeError(
            f"{where} takes a pyro_sparse.BayesianNetwork; for your own Pyro model ({type(model).__name__}) use "
            f"ps.PyroPosterior(model, samples) or ps.PyroPosterior.from_guide(model, guide, x, y)"
        )
    raise TypeError(
        f"{where}: model must be a pyro_sparse.BayesianNetwork, got {type(model).__name__}: pass the model "
        "first, e.g. ps.BayesianNetwork(net, dataset_size=N)"
    )


def check_guide_type(guide: Any, where: str, posterior_too: bool = False) -> None:
    """A TypeError unless ``guide`` is a pyro-sparse guide (or, with ``posterior_too``, a Posterior)."""
    if isinstance(guide, MeanField) or (posterior_too and isinstance(guide, Posterior)):
        return
    also = " or a Posterior" if posterior_too else ""
    raise TypeError(
        f"{where}: guide must be a pyro-sparse guide (MeanField, SNRPruned, SparseSubspace){also}, got "
        f"{type(guide).__name__}: build one with ps.guides.MeanField(model)"
    )


class Posterior:
    """Posterior draws of the Bayesian weights of ``model``.

    Build with ``Posterior.from_guide(model, guide)`` (fresh draws from q on demand) or
    ``Posterior.from_samples(model, samples)`` (stored draws, e.g. from a sampler).

    Attributes:
        num_stored: the number of stored draws (None for a guide).
        num_chains: chains the stored draws come from (1 for a guide).
        samples: name -> (S, ...) stored draws, chain-major (empty for a guide).
        sample_stats: name -> (chains, draws) per-draw statistics of a sampler ("lp", "sparsity", ...).
        hyperparameters: name -> (chains, draws) prior hyperparameters per draw (EM samplers).
        unit_masks: unit group name -> bool keep mask (size,) of the groups whose units the draws removed
            (all draws alike; ``em_sghmc(structure="unit")``): ``sparse.export`` cuts them out.
        unit_inclusion: unit group name -> (size,) posterior inclusion probability of each unit (EM).
    """

    def __init__(
        self,
        model: BayesianNetwork,
        draw: Callable[[int], Iterator[WeightDraw]],
        active_counts: Callable[[], dict[str, int]],
        num_stored: int | None = None,
        guide: MeanField | None = None,
    ):
        self.model = model
        self._draw = draw
        self._active_counts = active_counts
        self.num_stored = num_stored
        self.guide = guide
        self.num_chains = 1
        self.samples: dict[str, torch.Tensor] = {}
        self.sample_stats: dict[str, torch.Tensor] = {}
        self.hyperparameters: dict[str, torch.Tensor] = {}
        self.unit_masks: dict[str, torch.Tensor] = {}
        self.unit_inclusion: dict[str, torch.Tensor] = {}

    @classmethod
    def from_guide(cls, model: BayesianNetwork, guide: MeanField) -> Posterior:
        """Fresh draws from the guide ``guide`` of ``model`` (built for ``model`` or its architecture)."""
        check_model_type(model, "Posterior.from_guide")
        check_guide_type(guide, "Posterior.from_guide")
        guide.check_model(model)

        def draw(num_samples: int) -> Iterator[WeightDraw]:
            for _ in range(num_samples):
                yield guide.sample_weights()

        return cls(model, draw, guide.active_counts, guide=guide)

    @classmethod
    def from_samples(
        cls,
        model: BayesianNetwork,
        samples: Mapping[str, torch.Tensor],
        chains: int = 1,
        sample_stats: Mapping[str, torch.Tensor] | None = None,
        hyperparameters: Mapping[str, torch.Tensor] | None = None,
    ) -> Posterior:
        """Stored draws.

        Args:
            samples: site name -> tensor (S, *site shape); samplers may add the model's deterministic
                parameters by model path ("net.0.bias", ...), which then change with each draw too.
                S = chains × draws, chain-major. S = 0 gives an empty posterior (its use is an error).
            chains: how many chains the S draws come from.
            sample_stats, hyperparameters: name -> (chains, draws) per-draw values (see the class).

        ``draws(n)`` with n < S picks n draws evenly spread over all chains. ``active_counts`` counts
        the non-zero weights per site of the draw with the most of them (what one forward pass costs;
        chains may prune different weights).
        """
        check_model_type(model, "Posterior.from_samples")
        stored = _check_samples(model, samples)
        if isinstance(chains, bool) or not isinstance(chains, numbers.Integral) or chains < 1 or stored % chains:
            raise ValueError(f"chains must be a positive integer dividing the {stored} draws, got {chains!r}")
        samples = dict(samples)

        def draw(num_samples: int) -> Iterator[WeightDraw]:
            if stored == 0:
                raise ValueError("the posterior is empty: it holds no draws")
            if num_samples >= stored:
                indices = range(stored)
            else:
                indices = torch.linspace(0, stored - 1, num_samples).round().long().tolist()
            for i in indices:
                yield {name: value[i] for name, value in samples.items()}

        def active_counts() -> dict[str, int]:
            if stored == 0:
                return {name: 0 for name in model.sites}
            per_draw = {name: (samples[name] != 0).reshape(stored, -1).sum(1) for name in model.sites}
            largest = int(torch.stack(list(per_draw.values())).sum(0).argmax())
            return {name: int(counts[largest]) for name, counts in per_draw.items()}

        posterior = cls(model, draw, active_counts, num_stored=stored)
        posterior.num_chains = int(chains)
        posterior.samples = samples
        posterior.sample_stats = dict(sample_stats or {})
        posterior.hyperparameters = dict(hyperparameters or {})
        return posterior

    def draws(self, num_samples: int) -> Iterator[WeightDraw]:
        """Up to ``num_samples`` weight draws (all stored ones at most)."""
        return self._draw(check_count("num_samples", num_samples))

    def check_model(self, model: BayesianNetwork) -> None:
        """Raise ValueError unless these draws fit ``model`` (its own model, or one with the same sites)."""
        check_model_type(model, "Posterior")
        if model is self.model:
            return
        if self.guide is not None:
            self.guide.check_model(model)
            return
        mine = {name: tuple(site.shape) for name, site in self.model.sites.items()}
        theirs = {name: tuple(site.shape) for name, site in model.sites.items()}
        if mine != theirs:
            raise ValueError(
                f"this posterior holds draws of another model (sites {_first_difference(mine, theirs)}): "
                "evaluate it with the model it was sampled for, posterior.model"
            )

    def active_counts(self) -> dict[str, int]:
        """Site name -> number of weights that are not exactly zero."""
        return self._active_counts()

    @torch.no_grad()
    def predictive(self, x: torch.Tensor, y: torch.Tensor | None = None, num_samples: int = 32,
                   batch_size: int = 1024) -> Predictions:
        """Every draw evaluated on x (N, ...) (and y (N,)) by ``evaluate_draw``: outputs (S, N, *output
        shape), the regression noise scale of each draw (S,), and, given y, log p(y_i | x_i, draw) (S, N).

        ``x`` may be a ``DataLoader`` of inputs or of (x, y) batches (then y comes from it): streamed, the
        same S draws on every batch, the results concatenated over the batches."""
        num_samples = check_count("num_samples", num_samples)
        batch_size = check_count("batch_size", batch_size)
        if isinstance(x, DataLoader):
            return predict_loader(self.model, list(self.draws(num_samples)), x, batch_size)[0]
        self.model.check_batch(x, y)
        return predict_draws(self.model, self.draws(num_samples), x, y, batch_size)

    def predict(self, x: torch.Tensor, num_samples: int = 32, batch_size: int = 1024) -> torch.Tensor:
        """Network outputs under each draw: x (N, ...) (or a ``DataLoader``) -> (S, N, *output shape).

        Every draw is one whole network, shared by all N examples. ``predictive`` also gives each
        draw's noise scale and log-likelihood.
        """
        return self.predictive(x, num_samples=num_samples, batch_size=batch_size).outputs

    @torch.no_grad()
    def noise_scales(self, num_samples: int = 32) -> torch.Tensor | None:
        """(S,): the observation-noise scale of each of the draws ``draws(num_samples)`` (the same draws
        ``predict`` uses); None for a likelihood without one (classification)."""
        scale = current_noise_scale(self.model)
        if scale is None:
            return None
        if self.guide is not None:  # a guide draws weights only: every draw has the model's scale
            return scale.cpu().expand(check_count("num_samples", num_samples)).clone()
        scales = []
        for draw in self.draws(num_samples):
            own = {name: value for name, value in draw.items() if name.startswith("likelihood.")}
            with substituted_parameters(self.model, own):
                scales.append(current_noise_scale(self.model).cpu())
        return torch.stack(scales)

    def predict_proba(self, x: torch.Tensor, num_samples: int = 32, batch_size: int = 1024) -> torch.Tensor:
        """Posterior predictive class probabilities averaged over draws: (N, C)."""
        if self.model.likelihood.task != "classification":
            raise ValueError(
                f"predict_proba is for classification, but this model's likelihood is {self.model.likelihood.task}: "
                "use predict(x) for the predicted means"
            )
        return self.predict(x, num_samples, batch_size).softmax(-1).mean(0)

    def evaluate(self, data, num_samples: int = 32, batch_size: int = 1024) -> dict[str, Any]:
        """``ps.evaluate(self.model, self, data, ...)``: accuracy, NLL, ECE, ..., sparsity, FLOPs."""
        from .evaluation import evaluate

        return evaluate(self.model, self, data, num_samples=num_samples, batch_size=batch_size)

    def to_arviz(
        self,
        data=None,
        var_names: Sequence[str] | None = None,
        max_weights: int = 16,
        num_draws: int = 100,
        batch_size: int = 1024,
        train_data=None,
    ):
        """An ArviZ ``InferenceData`` of the draws (dims chain, draw): see ``inference_data.build``.

        Args:
            data: (x, y) (or a TensorDataset / Dataset's test split): adds ``log_likelihood`` (pointwise
                log p(y_i | x_i, w) per draw, each draw with its own deterministic parameters) and
                ``observed_data``; None leaves them out.
            train_data: the training data (x, y) (or a TensorDataset / Dataset's train split): for a guide,
                the sample statistic "lp" is the log joint of the draw on these data (log-likelihood of the
                training data plus the log prior of the active weights); without them a guide's
                InferenceData has no "lp". A sampler's "lp" is its own record of the training log joint.
            var_names: the posterior variables to keep ("inclusion", "slab_scale", "spike_scale",
                "weight"); None keeps all.
            max_weights: how many weights to show: the largest |posterior mean| among the active ones.
            num_draws: draws taken from a guide (one chain); stored draws are all used.
        """
        from .inference_data import build

        return build(self, data=data, var_names=var_names, max_weights=max_weights, num_draws=num_draws,
                     batch_size=batch_size, train_data=train_data)


@dataclass
class DrawEvaluation:
    """One posterior draw on N examples.

    outputs: (N, *output shape), the network's outputs;
    noise_scale: 0-dim, the draw's observation-noise scale (regression likelihoods; None otherwise);
    log_likelihood: (N,), log p(y_i | x_i, draw) (None when no targets were given).
    """

    outputs: torch.Tensor
    noise_scale: torch.Tensor | None
    log_likelihood: torch.Tensor | None


@dataclass
class Predictions:
    """S posterior draws on N examples: ``DrawEvaluation`` s stacked along a leading draw axis.

    outputs: (S, N, *output shape); noise_scales: (S,) or None; log_likelihood: (S, N) or None.
    """

    outputs: torch.Tensor
    noise_scales: torch.Tensor | None
    log_likelihood: torch.Tensor | None


def current_noise_scale(model: BayesianNetwork) -> torch.Tensor | None:
    """The likelihood's observation-noise scale as it stands now (0-dim, detached copy); None unless the
    model is a regression model whose likelihood has a ``scale``."""
    scale = getattr(model.likelihood, "scale", None)
    if model.likelihood.task != "regression" or scale is None:
        return None
    return scale.detach().clone()


def evaluate_draw(model: BayesianNetwork, draw: Mapping[str, torch.Tensor], x: torch.Tensor,
                  y: torch.Tensor | None = None) -> DrawEvaluation:
    """The one place a posterior draw meets data: run ``model`` with the draw's values.

    ``draw`` maps the Bayesian sites to weights and may also hold any deterministic parameter of the
    model by its path ("net.0.bias", "likelihood.log_scale"): samplers draw those too, and then the
    network *and the likelihood* of this draw use them. Parameters not in ``draw`` keep the model's
    values. When the model's guide has removed units, a draw of its weights runs through the smaller
    network of the active units (``infer.compact``: the same function, less work). x (N, ...), y (N,)
    -> see ``DrawEvaluation``. Gradients flow (wrap in ``torch.no_grad``
    to evaluate).
    """
    sites = {name: value for name, value in draw.items() if name in model.sites}
    deterministic = {name: value for name, value in draw.items() if name not in model.sites}
    compact = None if deterministic else _compact_network(model)
    with substituted_parameters(model, deterministic):
        outputs = model.apply(x, sites) if compact is None else compact.apply(x, compact.gather(sites))
        noise_scale = current_noise_scale(model)
        log_likelihood = None if y is None else model.likelihood.log_prob(outputs, y)
    return DrawEvaluation(outputs, noise_scale, log_likelihood)


def _compact_network(model: BayesianNetwork):
    """The smaller network of the active units of the guide ``model`` reads its masks from
    (``infer.compact``), when that guide has removed units; else None (the full network runs)."""
    guide = model.mask_source
    if not isinstance(guide, MeanField) or not guide.unit_masks():
        return None
    from .infer.compact import compact_network  # here: infer imports this module

    return compact_network(model, guide)


@torch.no_grad()
def predict_draws(model: BayesianNetwork, draws: Iterable[Mapping[str, torch.Tensor]], x: torch.Tensor,
                  y: torch.Tensor | None = None, batch_size: int = 1024) -> Predictions:
    """``evaluate_draw`` of every draw on x (N, ...) (and y (N,)) in batches of ``batch_size``, in eval
    mode, on the model's device; the results on the CPU, stacked (see ``Predictions``)."""
    device = next(iter(model.net.buffers())).device
    was_training = model.training
    model.eval()
    outputs, scales, log_likelihoods = [], [], []
    try:
        for draw in draws:
            draw = {name: value.to(device) for name, value in draw.items()}
            chunks = [evaluate_draw(model, draw, x[i: i + batch_size].to(device),
                                    None if y is None else y[i: i + batch_size].to(device))
                      for i in range(0, len(x), batch_size)]
            outputs.append(torch.cat([chunk.outputs.cpu() for chunk in chunks]))
            if chunks[0].noise_scale is not None:
                scales.append(chunks[0].noise_scale.cpu())
            if y is not None:
                log_likelihoods.append(torch.cat([chunk.log_likelihood.cpu() for chunk in chunks]))
    finally:
        model.train(was_training)
    return Predictions(torch.stack(outputs), torch.stack(scales) if scales else None,
                       torch.stack(log_likelihoods) if log_likelihoods else None)


def predict_loader(model: BayesianNetwork, draws: list[Mapping[str, torch.Tensor]], loader: DataLoader,
                   batch_size: int = 1024) -> tuple[Predictions, torch.Tensor | None]:
    """``predict_draws`` of the same ``draws`` on every batch of ``loader`` (inputs, or (x, y) pairs), in one
    pass: the Predictions concatenated over the batches (N in all) and the targets (N,) in the loader's
    order (None for a loader of inputs)."""
    parts, targets = [], []
    for batch in loader:
        x, y = batch if isinstance(batch, list | tuple) else (batch, None)
        model.check_batch(x, y)
        parts.append(predict_draws(model, draws, x, y, batch_size))
        if y is not None:
            targets.append(torch.as_tensor(y))
    if not parts:
        raise ValueError("the DataLoader yields no batches")
    log_likelihood = None if parts[0].log_likelihood is None else torch.cat([p.log_likelihood for p in parts], 1)
    predictions = Predictions(torch.cat([part.outputs for part in parts], 1), parts[0].noise_scales, log_likelihood)
    return predictions, (torch.cat(targets) if targets else None)


def _check_samples(model: BayesianNetwork, samples: Mapping[str, torch.Tensor]) -> int:
    """The number of stored draws S, after checking that ``samples`` holds (S, *site shape) per site."""
    if not isinstance(samples, Mapping):
        raise TypeError(f"samples must be a dict of site name -> tensor (S, ...), got {type(samples).__name__}")
    missing = set(model.sites) - set(samples)
    if missing:
        raise ValueError(f"samples lack the Bayesian sites {sorted(missing)}: give draws for every site of model.sites")
    not_tensors = sorted(name for name, value in samples.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise TypeError(f"samples of {not_tensors[:3]} are not tensors: convert them with torch.as_tensor")
    for name, site in model.sites.items():
        shape = tuple(samples[name].shape)
        if not shape or shape[1:] != tuple(site.shape):
            expected = ", ".join(["S", *map(str, site.shape)])
            raise ValueError(f"samples[{name!r}] has shape {shape}, expected ({expected}): one draw per row")
    sizes = {len(value) for value in samples.values()}
    if len(sizes) != 1:
        raise ValueError(f"samples must hold the same number of draws per site, got {sorted(sizes)}")
    return sizes.pop()


def _first_difference(mine: dict[str, tuple[int, ...]], theirs: dict[str, tuple[int, ...]]) -> str:
    """The first site whose presence or shape differs between two {site: shape} maps, as "A vs B"."""
    for name in sorted(set(mine) | set(theirs)):
        if mine.get(name) != theirs.get(name):
            return f"{name} {mine.get(name, 'absent')} vs {theirs.get(name, 'absent')}"
    return "identical"
