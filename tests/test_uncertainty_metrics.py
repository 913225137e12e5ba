"""OOD AUROC, entropy, mutual information and selective prediction against hand computations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pyro_sparse import metrics


def _pairwise_auroc(scores_in: list[float], scores_out: list[float]) -> float:
    """P(out > in) + ½ P(out = in), by enumerating every pair."""
    wins = sum(1.0 if o > i else 0.5 if o == i else 0.0 for i, o in itertools.product(scores_in, scores_out))
    return wins / (len(scores_in) * len(scores_out))


@pytest.mark.parametrize(
    "scores_in, scores_out",
    [
        ([0.1, 0.2, 0.3], [0.4, 0.5]),  # perfectly separated: 1
        ([0.4, 0.5], [0.1, 0.2, 0.3]),  # reversed: 0
        ([0.1, 0.5, 0.5, 0.9], [0.5, 0.2, 0.7]),  # ties across the groups
        ([1.0, 1.0], [1.0]),  # all equal: 0.5
    ],
)
def test_ood_auroc_equals_the_pairwise_count(scores_in, scores_out):
    got = metrics.ood_auroc(torch.tensor(scores_in), torch.tensor(scores_out))
    assert got == pytest.approx(_pairwise_auroc(scores_in, scores_out), abs=1e-12)


def test_ood_auroc_on_random_scores_matches_the_pairwise_count():
    generator = torch.Generator().manual_seed(0)
    scores_in = torch.randint(0, 20, (57,), generator=generator).float()  # many ties
    scores_out = torch.randint(5, 25, (43,), generator=generator).float()
    expected = _pairwise_auroc(scores_in.tolist(), scores_out.tolist())
    assert metrics.ood_auroc(scores_in, scores_out) == pytest.approx(expected, abs=1e-12)


def test_entropy_and_mutual_information_by_hand():
    # two samples for one example: [1, 0] and [0, 1]; mean [½, ½]
    sample_probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert metrics.predictive_entropy(sample_probs).item() == pytest.approx(math.log(2))
    assert metrics.mutual_information(sample_probs).item() == pytest.approx(math.log(2))  # all epistemic
    agreeing = torch.tensor([[[0.5, 0.5]], [[0.5, 0.5]]])
    assert metrics.predictive_entropy(agreeing).item() == pytest.approx(math.log(2))
    assert metrics.mutual_information(agreeing).item() == pytest.approx(0.0, abs=1e-12)  # all aleatoric


def test_selective_prediction_by_hand():
    # confidence order (most sure first): ex 3 (0.9, right), ex 0 (0.8, wrong), ex 2 (0.7, right), ex 1 (0.6, right)
    probs = torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.9, 0.1]])
    y = torch.tensor([1, 1, 1, 0])
    curve = metrics.selective_prediction(probs, y, num_points=4)
    assert curve["coverage"].tolist() == [0.25, 0.5, 0.75, 1.0]
    assert curve["accuracy"].tolist() == pytest.approx([1.0, 0.5, 2 / 3, 0.75])
    assert curve["area"] == pytest.approx((1.0 + 0.5 + 2 / 3 + 0.75) / 4)
    by_entropy = metrics.selective_prediction(probs, y, uncertainty=torch.tensor([3.0, 0.0, 1.0, 2.0]), num_points=2)
    assert by_entropy["accuracy"].tolist() == pytest.approx([1.0, 0.75])  # keeps ex 1 and 2 first: both right


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: metrics.ood_auroc(torch.tensor([]), torch.tensor([1.0])), "non-empty 1-D"),
        (lambda: metrics.ood_auroc(torch.tensor([1.0]), torch.tensor([math.nan])), "NaN or inf"),
        (lambda: metrics.predictive_entropy(torch.ones(3, 2)), r"shape \(S, N, C\)"),
        (lambda: metrics.selective_prediction(torch.ones(2, 2) / 2, torch.tensor([0, 1]), torch.ones(3)),
         "one score per example"),
        (lambda: metrics.selective_prediction(torch.ones(2, 2) / 2, torch.tensor([0, 1]), num_points=0),
         "positive integer"),
    ],
)
def test_bad_input_names_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()
