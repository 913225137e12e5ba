"""The one module that checks user numbers: the same wording everywhere, bools/NaN/inf refused."""

from __future__ import annotations

import math

import pytest

import pyro_sparse as ps
from pyro_sparse.validation import check_count, check_fraction, check_number, check_positive, check_seed


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_positive("lr", 0.0), r"lr must be a number > 0, got 0.0"),
        (lambda: check_positive("kl_weight", -1, allow_zero=True), r"kl_weight must be a number >= 0, got -1"),
        (lambda: check_positive("burn_in", 2.5, integer=True, allow_zero=True), r"burn_in must be an integer >= 0"),
        (lambda: check_count("chains", 0), r"chains must be a positive integer, got 0"),
        (lambda: check_count("chains", True), r"chains must be a positive integer, got True"),
        (lambda: check_count("epochs", 2.5), r"epochs must be a positive integer, got 2.5"),
        (lambda: check_fraction("sparsity", 1.0), r"sparsity must be a number in \[0, 1\), got 1.0"),
        (lambda: check_fraction("density", 0.0, low_open=True, high_open=False),
         r"density must be a number in \(0, 1\]"),
        (lambda: check_number("friction", math.nan, 0.0, 1.0, low_open=True), r"friction must be a number in \(0, 1\]"),
        (lambda: check_number("step", math.inf, 0.0), r"step must be a number >= 0, got inf"),
        (lambda: check_number("x", "0.5", 0.0), r"x must be a number >= 0, got '0.5'"),
        (lambda: check_seed(-1), r"seed must be an integer in \[0, 2\*\*32\), got -1"),
    ],
)
def test_a_bad_number_is_one_error_naming_the_argument_the_range_and_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_good_numbers_pass_through():
    assert check_count("chains", 4) == 4 and isinstance(check_count("chains", 4.0), int)
    assert check_fraction("sparsity", 0) == 0.0 and check_positive("lr", 1e-3) == 1e-3
    assert check_seed(None) is None and check_seed(2**40, bits=64) == 2**40


def test_the_public_api_words_its_errors_the_same_way():
    model = ps.BayesianNetwork(ps.nets.mlp(4, (3,), 2), dataset_size=10)
    with pytest.raises(ValueError, match="density must be a number in"):
        ps.SparseSubspace(model, density=1.5)
    with pytest.raises(ValueError, match="in_features must be a positive integer"):
        ps.nets.mlp(0, (3,), 2)
    with pytest.raises(ValueError, match="friction must be a number in"):
        ps.infer.sghmc(model, 1e-3, friction=0.0)
