"""Evaluation metrics and FLOP counting.

Everything here is a pure function on ``torch`` tensors / plain ``nn.Module`` objects; nothing depends on
Pyro.  Metrics are accumulated in float64 and returned as Python floats (or float64 tensors for
:func:`reliability`).

Shape conventions: ``S`` posterior samples, ``N`` examples, ``C`` classes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

__all__ = [
    "accuracy",
    "nll",
    "brier",
    "reliability",
    "ece",
    "classification_metrics",
    "regression_metrics",
    "forward_flops",
    "total_flops",
    "predictive_entropy",
    "mutual_information",
    "ood_auroc",
    "selective_prediction",
]

_PROB_FLOOR = 1e-12
_BISECTION_ITERS = 50


# ---------------------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------------------


def _check_labels(y: torch.Tensor, n: int, num_classes: int | None = None) -> torch.Tensor:
    """Validate integer labels ``y`` of shape (N,) and return them as int64."""
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() != 1:
        raise ValueError(f"y must be 1-D of shape (N,), got shape {tuple(y.shape)}")
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} entries but the predictions have N={n}")
    if y.is_floating_point() or y.is_complex():
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    y = y.long()
    if num_classes is not None and n > 0 and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"y must hold labels in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]"
        )
    return y


def _check_probs(
    probs: torch.Tensor, y: torch.Tensor, name: str = "probs"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``probs`` (N, C) against ``y`` (N,); return (float64 probs, int64 labels)."""
    if not isinstance(probs, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(probs).__name__}")
    if probs.dim() != 2:
        raise ValueError(f"{name} must be 2-D of shape (N, C), got shape {tuple(probs.shape)}")
    n, c = probs.shape
    if n == 0 or c == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(probs.shape)}")
    y = _check_labels(y, n, c)
    return probs.detach().to(torch.float64), y.to(probs.device)


def _check_sample_probs(sample_probs: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``sample_probs`` (S, N, C) against ``y`` (N,); return (float64 probs, int64 labels)."""
    if not isinstance(sample_probs, torch.Tensor):
        raise ValueError(f"sample_probs must be a torch.Tensor, got {type(sample_probs).__name__}")
    if sample_probs.dim() != 3:
        raise ValueError(
            f"sample_probs must be 3-D of shape (S, N, C), got shape {tuple(sample_probs.shape)}"
        )
    if sample_probs.numel() == 0:
        raise ValueError(f"sample_probs must be non-empty, got shape {tuple(sample_probs.shape)}")
    y = _check_labels(y, sample_probs.shape[1], sample_probs.shape[2])
    return sample_probs.detach().to(torch.float64), y.to(sample_probs.device)


# ---------------------------------------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------------------------------------


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of examples whose arg-max class equals the label.

    Args:
        probs: predictive probabilities, shape (N, C).
        y: integer labels, shape (N,).
    """
    probs, y = _check_probs(probs, y)
    return (probs.argmax(dim=-1) == y).to(torch.float64).mean().item()


def nll(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Mean negative log-likelihood ``-mean_i log p_i(y_i)``, probabilities clamped at 1e-12.

    Args:
        probs: predictive probabilities, shape (N, C).
        y: integer labels, shape (N,).
    """
    probs, y = _check_probs(probs, y)
    p_true = probs.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (N,)
    return (-p_true.clamp_min(_PROB_FLOOR).log()).mean().item()


def brier(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Multi-class Brier score ``mean_i sum_c (p_ic - onehot_ic)^2``.

    Args:
        probs: predictive probabilities, shape (N, C).
        y: integer labels, shape (N,).
    """
    probs, y = _check_probs(probs, y)
    onehot = torch.nn.functional.one_hot(y, probs.shape[-1]).to(torch.float64)  # (N, C)
    return (probs - onehot).pow(2).sum(dim=-1).mean().item()


def reliability(probs: torch.Tensor, y: torch.Tensor, num_bins: int = 15) -> dict[str, torch.Tensor]:
    """Top-label reliability diagram statistics with equal-width confidence bins on [0, 1].

    Bin ``b`` is the half-open interval ``(edges[b], edges[b + 1]]`` (closed on the right), so a confidence
    of exactly 1.0 falls in the last bin; a confidence of exactly 0.0 (impossible for a top label) is put
    in the first bin.  Empty bins report confidence 0, accuracy 0 and count 0.

    Args:
        probs: predictive probabilities, shape (N, C).
        y: integer labels, shape (N,).
        num_bins: number of bins (>= 1).

    Returns:
        dict with float64 tensors ``confidence`` (num_bins,) (mean top-label confidence per bin),
        ``accuracy`` (num_bins,), ``count`` (num_bins,) (number of examples per bin, int64) and
        ``edges`` (num_bins + 1,).
    """
    probs, y = _check_probs(probs, y)
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    conf, pred = probs.max(dim=-1)  # (N,), (N,)
    correct = (pred == y).to(torch.float64)  # (N,)
    edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64, device=probs.device)
    # right=False: inner[i-1] < conf <= inner[i]  ->  bin i = (edges[i], edges[i+1]].
    bins = torch.bucketize(conf, edges[1:-1].contiguous(), right=False)  # (N,) in [0, num_bins)
    count = torch.zeros(num_bins, dtype=torch.int64, device=probs.device).index_add_(
        0, bins, torch.ones_like(bins)
    )
    conf_sum = torch.zeros(num_bins, dtype=torch.float64, device=probs.device).index_add_(0, bins, conf)
    acc_sum = torch.zeros(num_bins, dtype=torch.float64, device=probs.device).index_add_(0, bins, correct)
    denom = count.clamp_min(1).to(torch.float64)
    return {
        "confidence": conf_sum / denom,
        "accuracy": acc_sum / denom,
        "count": count,
        "edges": edges,
    }


def ece(probs: torch.Tensor, y: torch.Tensor, num_bins: int = 15) -> float:
    """Top-label L1 expected calibration error ``sum_b (n_b / N) |acc_b - conf_b|``.

    Uses the bins of :func:`reliability` (equal width, ``(lo, hi]``).

    Args:
        probs: predictive probabilities, shape (N, C).
        y: integer labels, shape (N,).
        num_bins: number of bins.
    """
    rel = reliability(probs, y, num_bins)
    weights = rel["count"].to(torch.float64) / rel["count"].sum()
    return (weights * (rel["accuracy"] - rel["confidence"]).abs()).sum().item()


def classification_metrics(
    sample_probs: torch.Tensor, y: torch.Tensor, num_bins: int = 15
) -> dict[str, float]:
    """Metrics of the posterior predictive from per-sample class probabilities.

    Args:
        sample_probs: class probabilities per posterior sample, shape (S, N, C).
        y: integer labels, shape (N,).
        num_bins: number of ECE bins.

    Returns:
        dict with ``accuracy``, ``nll``, ``ece``, ``brier`` of the predictive (mean over S) and
        ``mean_sample_accuracy`` (mean over samples of each single sample's accuracy).
    """
    sample_probs, y = _check_sample_probs(sample_probs, y)
    predictive = sample_probs.mean(dim=0)  # (N, C)
    per_sample_acc = (sample_probs.argmax(dim=-1) == y).to(torch.float64).mean(dim=-1)  # (S,)
    return {
        "accuracy": accuracy(predictive, y),
        "nll": nll(predictive, y),
        "ece": ece(predictive, y, num_bins),
        "brier": brier(predictive, y),
        "mean_sample_accuracy": per_sample_acc.mean().item(),
    }


# ---------------------------------------------------------------------------------------------------------
# regression
# ---------------------------------------------------------------------------------------------------------


def _check_regression(
    sample_means: torch.Tensor, noise_scale: float | torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate and return float64 ``(mu (S, N), sigma broadcastable to (S, N), y (N,))``."""
    if not isinstance(sample_means, torch.Tensor):
        raise ValueError(f"sample_means must be a torch.Tensor, got {type(sample_means).__name__}")
    if sample_means.dim() != 2:
        raise ValueError(f"sample_means must be 2-D of shape (S, N), got shape {tuple(sample_means.shape)}")
    s, n = sample_means.shape
    if s == 0 or n == 0:
        raise ValueError(f"sample_means must be non-empty, got shape {tuple(sample_means.shape)}")
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() != 1:
        raise ValueError(f"y must be 1-D of shape (N,), got shape {tuple(y.shape)}")
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} entries but sample_means has N={n}")
    mu = sample_means.detach().to(torch.float64)
    sigma = torch.as_tensor(noise_scale, dtype=torch.float64, device=mu.device).detach()
    if sigma.dim() == 0:
        sigma = sigma.reshape(1, 1)
    elif sigma.dim() == 1 and sigma.shape[0] == s:
        sigma = sigma.unsqueeze(-1)  # (S, 1)
    elif sigma.shape != (s, n):
        raise ValueError(
            f"noise_scale must be a float, a tensor of shape (S,)=({s},) or (S, N)=({s}, {n}), "
            f"got shape {tuple(sigma.shape)}"
        )
    if not bool((sigma > 0).all()):
        raise ValueError("noise_scale must be strictly positive")
    return mu, sigma, y.detach().to(device=mu.device, dtype=torch.float64)


def _mixture_cdf(t: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Equal-weight Gaussian mixture CDF at ``t`` (..., N); ``mu`` (S, N), ``sigma`` broadcastable to it."""
    z = (t.unsqueeze(-2) - mu) / sigma  # (..., S, N)
    return torch.special.ndtr(z).mean(dim=-2)  # (..., N)


def _mixture_quantiles(mu: torch.Tensor, sigma: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Quantiles of the per-point mixtures by vectorised bisection on the CDF.

    Args:
        mu: component means, shape (S, N).
        sigma: component stds, broadcastable to (S, N).
        levels: probability levels, shape (Q,).

    Returns:
        quantiles, shape (Q, N).
    """
    sigma_full = sigma.expand_as(mu)
    lo = (mu - 10.0 * sigma_full).min(dim=0).values.expand(levels.shape[0], -1).clone()  # (Q, N)
    hi = (mu + 10.0 * sigma_full).max(dim=0).values.expand(levels.shape[0], -1).clone()  # (Q, N)
    target = levels.unsqueeze(-1)  # (Q, 1)
    for _ in range(_BISECTION_ITERS):
        mid = 0.5 * (lo + hi)
        below = _mixture_cdf(mid, mu, sigma) < target  # (Q, N)
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


def regression_metrics(
    sample_means: torch.Tensor, noise_scale: float | torch.Tensor, y: torch.Tensor
) -> dict[str, float]:
    """Metrics of the Gaussian-mixture posterior predictive ``(1/S) sum_s N(mu_s, sigma_s^2)``.

    Args:
        sample_means: predicted means per posterior sample, shape (S, N).
        noise_scale: observation noise std: a float, a tensor of shape (S,) (one per sample), or (S, N).
        y: targets, shape (N,).

    Returns:
        dict with ``rmse`` (of the predictive mean), ``nll`` (mean over points of the negative log
        predictive density), ``coverage_95`` (fraction of targets inside the mixture's central 95 %
        interval [q_0.025, q_0.975]) and ``predictive_std`` (mean over points of the mixture std).
    """
    mu, sigma, y = _check_regression(sample_means, noise_scale, y)
    s = mu.shape[0]
    pred_mean = mu.mean(dim=0)  # (N,)
    rmse = (pred_mean - y).pow(2).mean().sqrt().item()

    log_comp = -0.5 * math.log(2 * math.pi) - sigma.log() - 0.5 * ((y - mu) / sigma).pow(2)  # (S, N)
    log_pred = torch.logsumexp(log_comp, dim=0) - math.log(s)  # (N,)
    nll_value = (-log_pred).mean().item()

    levels = torch.tensor([0.025, 0.975], dtype=torch.float64, device=mu.device)
    q = _mixture_quantiles(mu, sigma, levels)  # (2, N)
    coverage = ((y >= q[0]) & (y <= q[1])).to(torch.float64).mean().item()

    second_moment = (sigma.pow(2) + mu.pow(2)).mean(dim=0)  # (N,)
    pred_var = (second_moment - pred_mean.pow(2)).clamp_min(0.0)
    return {
        "rmse": rmse,
        "nll": nll_value,
        "coverage_95": coverage,
        "predictive_std": pred_var.sqrt().mean().item(),
    }


# ---------------------------------------------------------------------------------------------------------
# FLOP counting
# ---------------------------------------------------------------------------------------------------------

_COUNTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _output_positions(module: nn.Module, out: torch.Tensor) -> int:
    """Number of output positions per example for a batched output ``out`` of shape (B, ...)."""
    if isinstance(module, nn.Linear):
        return math.prod(out.shape[1:-1]) if out.dim() > 2 else 1  # (B, *, out_features)
    return math.prod(out.shape[2:])  # conv: (B, C_out, *spatial)


def forward_flops(
    net: nn.Module, example: torch.Tensor, active: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Multiply-accumulates (MACs) of one forward pass per example, per Linear / Conv{1,2,3}d layer.

    For each counted layer ``MACs = active_weight_entries * output_positions``, where output positions are
    ``prod(out.shape[1:-1])`` for Linear (1 for 2-D outputs) and the product of the output spatial dims for
    convolutions.  Bias additions are not counted.  A layer called several times in one forward pass is
    counted once per call.

    Args:
        net: the network; it is run once under ``torch.no_grad()`` in eval mode, and every submodule's
            training flag is restored afterwards.
        example: a batch of inputs, shape (B, ...); the counts are per example (the batch dim is never
            part of the output positions).
        active: optional map from a weight's path (e.g. ``"features.0.weight"``; ``"weight"`` when ``net``
            itself is the layer) to its number of active entries. Weights not listed count fully
            (``module.weight.numel()``); entries for other paths are ignored.

    Returns:
        dict from module path (``""`` when ``net`` itself is a counted layer) to MACs per example, in
        module-registration order; layers that were not called are omitted.
    """
    if not isinstance(example, torch.Tensor) or example.dim() < 1 or example.shape[0] == 0:
        raise ValueError("example must be a non-empty batched tensor of shape (B, ...)")
    active = {} if active is None else active
    counts: dict[str, int] = {}
    order: list[str] = []

    def make_hook(name: str):
        weight_path = f"{name}.weight" if name else "weight"

        def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            if not isinstance(out, torch.Tensor):
                return
            n_active = int(active.get(weight_path, module.weight.numel()))
            counts[name] = counts.get(name, 0) + n_active * _output_positions(module, out)

        return hook

    modes = {m: m.training for m in net.modules()}
    handles = []
    try:
        for name, module in net.named_modules():
            if isinstance(module, _COUNTED_LAYERS):
                order.append(name)
                handles.append(module.register_forward_hook(make_hook(name)))
        net.eval()
        with torch.no_grad():
            net(example)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    return {name: counts[name] for name in order if name in counts}


def total_flops(per_layer: Mapping[str, int]) -> int:
    """Sum of the per-layer counts returned by :func:`forward_flops`."""
    return int(sum(per_layer.values()))


# ---------------------------------------------------------------------------------------------------------
# uncertainty: out-of-distribution detection and selective prediction
# ---------------------------------------------------------------------------------------------------------


def _check_sample_probs_only(sample_probs: torch.Tensor) -> torch.Tensor:
    if not isinstance(sample_probs, torch.Tensor) or sample_probs.dim() != 3 or sample_probs.numel() == 0:
        shape = tuple(sample_probs.shape) if isinstance(sample_probs, torch.Tensor) else type(sample_probs).__name__
        raise ValueError(f"sample_probs must be a non-empty tensor of shape (S, N, C), got {shape}")
    return sample_probs.detach().to(torch.float64)


def predictive_entropy(sample_probs: torch.Tensor) -> torch.Tensor:
    """H[E_θ p(y | x, θ)] per example (nats): total predictive uncertainty. sample_probs (S, N, C) -> (N,)."""
    predictive = _check_sample_probs_only(sample_probs).mean(dim=0)
    return -(predictive * predictive.clamp_min(_PROB_FLOOR).log()).sum(dim=-1)


def mutual_information(sample_probs: torch.Tensor) -> torch.Tensor:
    """I[y; θ | x] = H[E_θ p] − E_θ H[p] per example (nats): the part of the uncertainty that comes from
    not knowing the weights (epistemic; 0 for a single sample or a deterministic network).
    sample_probs (S, N, C) -> (N,)."""
    probs = _check_sample_probs_only(sample_probs)
    expected_entropy = -(probs * probs.clamp_min(_PROB_FLOOR).log()).sum(dim=-1).mean(dim=0)
    return (predictive_entropy(probs) - expected_entropy).clamp_min(0.0)


def ood_auroc(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    """Area under the ROC curve of telling out-of-distribution inputs from in-distribution ones by a score
    that should be higher out of distribution (e.g. ``predictive_entropy``, ``mutual_information``).

    It is P(score_out > score_in) + ½ P(score_out = score_in) over all pairs (the Mann–Whitney U
    statistic over n_in · n_out), computed from average ranks. 0.5 = chance, 1 = perfect.

    Args:
        scores_in: (N_in,) scores of in-distribution inputs; scores_out: (N_out,) of OOD inputs.
    """
    for name, scores in (("scores_in", scores_in), ("scores_out", scores_out)):
        if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or scores.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 1-D tensor of scores")
        if not torch.isfinite(scores).all():
            raise ValueError(f"{name} contains NaN or inf")
    both = torch.cat([scores_in, scores_out]).to(torch.float64)
    order = torch.argsort(both, stable=True)
    ranks = torch.empty_like(both)
    ranks[order] = torch.arange(1, len(both) + 1, dtype=torch.float64)
    values, inverse, counts = torch.unique(both, return_inverse=True, return_counts=True)
    rank_sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    ranks = (rank_sums / counts)[inverse]  # ties share their average rank
    n_in, n_out = len(scores_in), len(scores_out)
    u = ranks[n_in:].sum().item() - n_out * (n_out + 1) / 2
    return u / (n_in * n_out)


def selective_prediction(
    probs: torch.Tensor, y: torch.Tensor, uncertainty: torch.Tensor | None = None, num_points: int = 20
) -> dict[str, torch.Tensor | float]:
    """Accuracy when the model may abstain on its most uncertain inputs.

    The inputs are sorted by ``uncertainty`` (default: 1 − the top-class probability); at coverage c
    the ⌈c·N⌉ least uncertain are kept (ties broken by position) and the accuracy is measured on them.

    Args:
        probs: predictive class probabilities (N, C); y: labels (N,).
        uncertainty: (N,) score, higher = more uncertain (e.g. ``predictive_entropy``).
        num_points: coverages 1/num_points, 2/num_points, ..., 1.

    Returns:
        ``coverage`` (num_points,), ``accuracy`` (num_points,), and ``area`` — the mean accuracy over
        the coverages (higher is better; the accuracy itself for a model that cannot rank its errors).
    """
    probs, y = _check_probs(probs, y)
    if uncertainty is None:
        uncertainty = 1.0 - probs.max(dim=-1).values
    if not isinstance(uncertainty, torch.Tensor) or uncertainty.shape != y.shape:
        raise ValueError(f"uncertainty must be a tensor of shape {tuple(y.shape)}, one score per example")
    if not isinstance(num_points, int) or isinstance(num_points, bool) or num_points < 1:
        raise ValueError(f"num_points must be a positive integer, got {num_points!r}")
    correct = (probs.argmax(dim=-1) == y).to(torch.float64)[torch.argsort(uncertainty.to(probs), stable=True)]
    running = correct.cumsum(0) / torch.arange(1, len(y) + 1, dtype=torch.float64)
    coverage = torch.arange(1, num_points + 1, dtype=torch.float64) / num_points
    kept = torch.ceil(coverage * len(y) - 1e-9).long().clamp(1, len(y))
    accuracy = running[kept - 1]
    return {"coverage": coverage, "accuracy": accuracy, "area": accuracy.mean().item()}
