"""``evaluate``: predictive metrics, weight counts and FLOPs of a trained model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader

from . import metrics
from .data import as_tensors
from .guides.meanfield import MeanField
from .model import BayesianNetwork
from .posterior import Posterior, Predictions, check_guide_type, check_model_type, predict_loader
from .pyro_posterior import PyroPosterior
from .validation import check_count


def inference_flops(model: BayesianNetwork, active: dict[str, int], example: torch.Tensor) -> dict[str, int]:
    """Multiply-adds of one forward pass per example, per layer, counting only active weights."""
    device = next(iter(model.net.buffers())).device
    return metrics.forward_flops(model.net, example[:1].to(device), active)


def training_flops_per_example(model: BayesianNetwork, active: dict[str, int], example: torch.Tensor) -> int:
    """Multiply-adds of one training step per example: forward + backward (≈ 3 × forward), where
    layers with local reparameterization also pay for the variance product (× 2)."""
    per_layer = inference_flops(model, active, example)
    lrt_layers = {site.module_path for site in model.sites.values() if site.local_reparameterization}
    return 3 * sum(flops * (2 if layer in lrt_layers else 1) for layer, flops in per_layer.items())


def evaluate(
    model: BayesianNetwork | Callable,
    guide: MeanField | Posterior | PyroPosterior,
    data,
    num_samples: int = 32,
    batch_size: int = 1024,
) -> dict[str, Any]:
    """Evaluate the posterior predictive on ``data`` (x, y) (or a TensorDataset / Dataset's test split, or a
    ``DataLoader`` of (x, y) batches: streamed, the same S draws on every batch; only the (S, N, outputs)
    predictions are kept).

    Returns a flat dict: for classification accuracy, nll, ece, brier, mean_sample_accuracy; for
    regression rmse, nll, coverage_95, predictive_std; and always total_weights, active_weights,
    sparsity (fraction of Bayesian weights exactly zero) and inference_flops (per example).

    ``model`` may also be any Pyro model ``model(x, y)``, with a guide of it or the ``PyroPosterior`` of a
    sampler (``num_samples`` of its draws, evenly spaced): the metrics then come from its observed site
    (``PyroPosterior.evaluate``: a Categorical gives the classification metrics, a Normal the regression
    ones), without inference_flops; the data are read into memory (a DataLoader's batches stacked).

    Raises:
        TypeError: ``model`` is not a BayesianNetwork or a Pyro model, ``guide`` neither a guide nor a
            Posterior (e.g. the two swapped), or ``data`` is not an (x, y) pair / dataset / DataLoader.
        ValueError: ``num_samples`` or ``batch_size`` not a positive integer, a guide or posterior of
            another model, or data the model cannot take.
    """
    num_samples = check_count("num_samples", num_samples)
    batch_size = check_count("batch_size", batch_size)
    if isinstance(guide, PyroPosterior) or (not isinstance(model, BayesianNetwork) and isinstance(guide, MeanField)
                                            and callable(model)):
        x, y = _in_memory(getattr(data, "test", data))
        if not isinstance(guide, PyroPosterior):
            guide = PyroPosterior.from_guide(model, guide, x, y, num_samples=num_samples)
        return guide.evaluate(x, y, num_samples=num_samples)
    check_model_type(model, "evaluate")
    check_guide_type(guide, "evaluate", posterior_too=True)
    posterior = guide if isinstance(guide, Posterior) else Posterior.from_guide(model, guide)
    posterior.check_model(model)
    data = getattr(data, "test", data)
    if isinstance(data, DataLoader):
        return _evaluate_streamed(model, posterior, data, num_samples, batch_size)
    x, y = as_tensors(data)
    model.check_batch(x, y)
    predictions = posterior.predictive(x, num_samples=num_samples, batch_size=batch_size)
    return summarize(model, posterior, predictions, x, y)


def _evaluate_streamed(model: BayesianNetwork, posterior: Posterior, loader: DataLoader, num_samples: int,
                       batch_size: int) -> dict[str, Any]:
    """``evaluate`` over a DataLoader of (x, y) batches: S draws fixed once, one pass (``predict_loader``)."""
    predictions, y = predict_loader(model, list(posterior.draws(num_samples)), loader, batch_size)
    if y is None:
        raise TypeError("evaluate needs a DataLoader of (x, y) batches; this one yields inputs only")
    example = next(iter(loader))[0][:1]
    return summarize(model, posterior, predictions, example, y)


def _in_memory(data) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of a pair / dataset, or of every batch of a DataLoader stacked."""
    if isinstance(data, DataLoader):
        batches = [(torch.as_tensor(x), torch.as_tensor(y)) for x, y in data]
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    return as_tensors(data)


def summarize(
    model: BayesianNetwork, posterior: Posterior, predictions: Predictions | torch.Tensor, x: torch.Tensor,
    y: torch.Tensor,
) -> dict[str, Any]:
    """``evaluate``'s dict from draws already evaluated on x (N, ...), y (N,).

    ``predictions``: ``posterior.predictive(x, num_samples=S)``; regression metrics use each draw's own
    noise scale. A bare (S, N, ...) tensor of ``posterior.predict(x, num_samples=S)`` is also taken: the
    noise scales of those same S draws are then looked up again (stored draws are picked
    deterministically; a guide's draws share the model's scale).
    """
    if isinstance(predictions, torch.Tensor):
        predictions = Predictions(predictions, posterior.noise_scales(len(predictions)), None)
    outputs = predictions.outputs
    if model.likelihood.task == "classification":
        results = metrics.classification_metrics(outputs.softmax(-1), y)
    else:
        means = outputs.reshape(outputs.shape[0], outputs.shape[1])
        results = metrics.regression_metrics(means, predictions.noise_scales, y)
    active = posterior.active_counts()
    total, num_active = model.num_weights, sum(active.values())
    results.update(
        total_weights=total,
        active_weights=num_active,
        sparsity=1.0 - num_active / total,
        inference_flops=metrics.total_flops(inference_flops(model, active, x)),
    )
    return results
