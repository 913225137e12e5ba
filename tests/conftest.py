"""Shared fixtures: seeded RNGs, a clean Pyro param store, and small datasets."""

from __future__ import annotations

import pyro
import pytest
import torch

import pyro_sparse as ps


@pytest.fixture(autouse=True)
def _seeded():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.manual_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def digits() -> ps.data.Dataset:
    return ps.data.load("digits")
