"""Tests for pyro_sparse.metrics (pure torch, no Pyro)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pyro_sparse.metrics import (
    accuracy,
    brier,
    classification_metrics,
    ece,
    forward_flops,
    nll,
    regression_metrics,
    reliability,
    total_flops,
)

# ---------------------------------------------------------------------------------------------------------
# classification: hand-computed values
# ---------------------------------------------------------------------------------------------------------


def test_perfect_predictions():
    y = torch.tensor([0, 2, 1, 2])
    probs = torch.nn.functional.one_hot(y, 3).float()
    assert accuracy(probs, y) == 1.0
    assert ece(probs, y) == pytest.approx(0.0, abs=1e-12)
    assert brier(probs, y) == pytest.approx(0.0, abs=1e-12)
    assert nll(probs, y) == pytest.approx(0.0, abs=1e-12)


def test_uniform_predictions():
    c = 4
    y = torch.tensor([0, 1, 2, 3, 1])
    probs = torch.full((5, c), 1.0 / c)
    assert nll(probs, y) == pytest.approx(math.log(c))
    # Brier: (1 - 1/C)^2 + (C - 1) / C^2 = 1 - 1/C
    assert brier(probs, y) == pytest.approx(1 - 1 / c)


def test_nll_clamps_zero_probability():
    probs = torch.tensor([[1.0, 0.0]])
    y = torch.tensor([1])
    assert nll(probs, y) == pytest.approx(-math.log(1e-12))


def test_brier_and_accuracy_by_hand():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    y = torch.tensor([0, 0])
    # (0.3^2 + 0.3^2 + 0.6^2 + 0.6^2) / 2
    assert brier(probs, y) == pytest.approx((0.18 + 0.72) / 2)
    assert accuracy(probs, y) == pytest.approx(0.5)
    assert nll(probs, y) == pytest.approx(-(math.log(0.7) + math.log(0.4)) / 2)


def _two_bin_example() -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.tensor(
        [
            [0.40, 0.30, 0.30],  # conf .40, pred 0, correct  -> bin 0
            [0.20, 0.45, 0.35],  # conf .45, pred 1, wrong    -> bin 0
            [0.90, 0.05, 0.05],  # conf .90, pred 0, correct  -> bin 1
            [0.10, 0.10, 0.80],  # conf .80, pred 2, wrong    -> bin 1
        ],
        dtype=torch.float64,
    )
    y = torch.tensor([0, 2, 0, 1])
    return probs, y


def test_two_bin_ece_by_hand():
    probs, y = _two_bin_example()
    # bin 0: acc .5, conf .425; bin 1: acc .5, conf .85
    expected = 0.5 * abs(0.5 - 0.425) + 0.5 * abs(0.5 - 0.85)
    assert ece(probs, y, num_bins=2) == pytest.approx(expected)
    rel = reliability(probs, y, num_bins=2)
    torch.testing.assert_close(rel["confidence"], torch.tensor([0.425, 0.85], dtype=torch.float64))
    torch.testing.assert_close(rel["accuracy"], torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert rel["count"].tolist() == [2, 2]
    torch.testing.assert_close(rel["edges"], torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))


def test_reliability_edges_and_empty_bins():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.55, 0.45]])
    y = torch.tensor([0, 1, 1])
    rel = reliability(probs, y, num_bins=10)
    assert rel["edges"].shape == (11,)
    assert rel["count"].sum().item() == 3
    assert rel["count"][-1].item() == 1  # confidence exactly 1.0 -> last bin
    assert rel["count"][4].item() == 1  # 0.5 is in (0.4, 0.5] (bins closed on the right)
    assert rel["count"][5].item() == 1  # 0.55 is in (0.5, 0.6]
    empty = rel["count"] == 0
    assert empty.sum().item() == 7
    assert torch.all(rel["confidence"][empty] == 0) and torch.all(rel["accuracy"][empty] == 0)


def _numpy_ece(probs: np.ndarray, y: np.ndarray, num_bins: int) -> float:
    conf = probs.max(axis=1)
    pred = probs.argmax(axis=1)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    total = 0.0
    for b in range(num_bins):
        lo, hi = edges[b], edges[b + 1]
        in_bin = [i for i in range(len(y)) if (lo < conf[i] <= hi) or (b == 0 and conf[i] == 0.0)]
        if not in_bin:
            continue
        acc_b = np.mean([pred[i] == y[i] for i in in_bin])
        conf_b = np.mean([conf[i] for i in in_bin])
        total += len(in_bin) / len(y) * abs(acc_b - conf_b)
    return total


@pytest.mark.parametrize("num_bins", [1, 5, 15])
def test_ece_matches_numpy_loop(num_bins):
    gen = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(500, 4, generator=gen)
    probs = logits.softmax(-1)
    y = torch.randint(0, 4, (500,), generator=gen)
    expected = _numpy_ece(probs.double().numpy(), y.numpy(), num_bins)
    assert ece(probs, y, num_bins) == pytest.approx(expected, abs=1e-10)


def test_classification_metrics_mean_sample_accuracy_differs():
    y = torch.tensor([0])
    sample_probs = torch.tensor([[[0.6, 0.4]], [[0.6, 0.4]], [[0.0, 1.0]]])  # (S=3, N=1, C=2)
    out = classification_metrics(sample_probs, y, num_bins=5)
    assert set(out) == {"accuracy", "nll", "ece", "brier", "mean_sample_accuracy"}
    assert out["mean_sample_accuracy"] == pytest.approx(2 / 3)
    assert out["accuracy"] == 0.0  # predictive is [0.4, 0.6]
    assert out["nll"] == pytest.approx(-math.log(0.4))
    assert out["brier"] == pytest.approx(0.36 + 0.36)
    assert out["ece"] == pytest.approx(0.6)
    assert all(isinstance(v, float) for v in out.values())


def test_classification_metrics_single_sample_matches_functions():
    probs, y = _two_bin_example()
    out = classification_metrics(probs.unsqueeze(0), y, num_bins=2)
    assert out["accuracy"] == pytest.approx(accuracy(probs, y))
    assert out["mean_sample_accuracy"] == pytest.approx(accuracy(probs, y))
    assert out["nll"] == pytest.approx(nll(probs, y))
    assert out["brier"] == pytest.approx(brier(probs, y))
    assert out["ece"] == pytest.approx(ece(probs, y, num_bins=2))


# ---------------------------------------------------------------------------------------------------------
# classification: validation
# ---------------------------------------------------------------------------------------------------------


def test_classification_validation():
    probs = torch.full((3, 2), 0.5)
    with pytest.raises(ValueError, match="y"):
        accuracy(probs, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="probs"):
        nll(torch.full((3,), 0.5), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="probs"):
        brier(torch.empty(0, 2), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match="probs"):
        ece(torch.full((2, 3, 2), 0.5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="sample_probs"):
        classification_metrics(probs, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="sample_probs"):
        classification_metrics(torch.empty(0, 3, 2), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="y"):
        classification_metrics(probs.unsqueeze(0), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="y"):
        accuracy(probs, torch.tensor([0, 1, 2]))  # label out of range
    with pytest.raises(ValueError, match="num_bins"):
        reliability(probs, torch.tensor([0, 1, 1]), num_bins=0)


# ---------------------------------------------------------------------------------------------------------
# regression
# ---------------------------------------------------------------------------------------------------------


def test_regression_single_sample_closed_form():
    mu = torch.tensor([[0.0, 1.0, -2.0, 0.5]], dtype=torch.float64)
    y = torch.tensor([0.3, 0.0, -2.5, 2.0], dtype=torch.float64)
    sigma = 0.7
    out = regression_metrics(mu, sigma, y)
    resid = (y - mu[0]).numpy()
    assert out["rmse"] == pytest.approx(float(np.sqrt(np.mean(resid**2))))
    expected_nll = np.mean(0.5 * np.log(2 * np.pi * sigma**2) + resid**2 / (2 * sigma**2))
    assert out["nll"] == pytest.approx(float(expected_nll))
    assert out["predictive_std"] == pytest.approx(sigma)
    # central 95 % interval is mu +- 1.959964 sigma: points 0, 1, 2 inside, point 3 (|z| = 2.14) outside
    assert out["coverage_95"] == pytest.approx(0.75)
    assert set(out) == {"rmse", "nll", "coverage_95", "predictive_std"}


def test_regression_mixture_nll_and_std():
    mu = torch.tensor([[-1.0], [1.0]])
    sigma = torch.tensor([1.0, 1.0])
    y = torch.tensor([0.0])
    out = regression_metrics(mu, sigma, y)
    density = np.exp(-0.5) / np.sqrt(2 * np.pi)  # both components equal at y = 0
    assert out["nll"] == pytest.approx(-np.log(density))
    assert out["predictive_std"] == pytest.approx(math.sqrt(2.0))
    assert out["rmse"] == pytest.approx(0.0)


def test_regression_coverage_on_predictive_draws():
    gen = torch.Generator().manual_seed(1)
    s, n = 5, 20000
    mu = 3.0 * torch.randn(s, n, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.3, 0.5, 1.0, 2.0, 0.8], dtype=torch.float64)
    comp = torch.randint(0, s, (n,), generator=gen)
    idx = torch.arange(n)
    y = mu[comp, idx] + sigma[comp] * torch.randn(n, generator=gen, dtype=torch.float64)
    out = regression_metrics(mu, sigma, y)
    assert out["coverage_95"] == pytest.approx(0.95, abs=0.01)


def test_regression_validation():
    mu = torch.zeros(2, 3)
    y = torch.zeros(3)
    with pytest.raises(ValueError, match="sample_means"):
        regression_metrics(torch.zeros(3), 1.0, y)
    with pytest.raises(ValueError, match="sample_means"):
        regression_metrics(torch.zeros(2, 0), 1.0, torch.zeros(0))
    with pytest.raises(ValueError, match="y"):
        regression_metrics(mu, 1.0, torch.zeros(4))
    with pytest.raises(ValueError, match="noise_scale"):
        regression_metrics(mu, torch.ones(5), y)
    with pytest.raises(ValueError, match="noise_scale"):
        regression_metrics(mu, 0.0, y)


# ---------------------------------------------------------------------------------------------------------
# FLOP counting
# ---------------------------------------------------------------------------------------------------------


def test_flops_linear():
    flops = forward_flops(nn.Linear(10, 5), torch.randn(7, 10))
    assert flops == {"": 50}
    assert total_flops(flops) == 50


def test_flops_conv2d():
    flops = forward_flops(nn.Conv2d(3, 8, 3, padding=1), torch.randn(2, 3, 16, 16))
    assert total_flops(flops) == 3 * 8 * 9 * 256


def test_flops_sequential_with_active():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # "0": 3*8*9 weights x 16*16 positions
        nn.ReLU(),
        nn.MaxPool2d(2),  # -> 8 x 8 x 8
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),  # "4"
    )
    x = torch.randn(4, 3, 16, 16)
    full = forward_flops(net, x)
    assert full == {"0": 3 * 8 * 9 * 256, "4": 512 * 10}
    halved = forward_flops(net, x, active={"4.weight": 512 * 10 // 2})
    assert halved == {"0": 3 * 8 * 9 * 256, "4": 512 * 5}
    assert total_flops(halved) == 3 * 8 * 9 * 256 + 2560


def test_flops_linear_on_sequence_input():
    flops = forward_flops(nn.Sequential(nn.Linear(6, 4)), torch.randn(3, 11, 6))
    assert flops == {"0": 6 * 4 * 11}


def test_flops_conv1d_and_weight_buffer():
    conv = nn.Conv1d(2, 4, 5)  # length 20 -> 16 output positions
    assert forward_flops(conv, torch.randn(1, 2, 20)) == {"": 2 * 4 * 5 * 16}

    lin = nn.Linear(10, 5)
    weight = lin.weight.detach().clone()
    del lin.weight
    lin.register_buffer("weight", weight)
    net = nn.Sequential(lin)
    assert "0.weight" not in dict(net.named_parameters())
    assert forward_flops(net, torch.randn(2, 10), active={"0.weight": 12}) == {"0": 12}


def test_flops_restores_mode_and_removes_hooks():
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    net.train()
    net[1].eval()  # mixed per-module modes must be restored exactly
    forward_flops(net, torch.randn(2, 4))
    assert net.training and net[0].training and not net[1].training
    assert all(len(m._forward_hooks) == 0 for m in net.modules())

    with pytest.raises(RuntimeError):
        forward_flops(net, torch.randn(2, 3))  # shape mismatch inside the forward
    assert all(len(m._forward_hooks) == 0 for m in net.modules())
    assert net.training and not net[1].training


def test_flops_no_grad():
    net = nn.Linear(3, 2)
    seen = []
    net.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    forward_flops(net, torch.randn(1, 3))
    assert seen == [False]
