"""Posterior.to_arviz: InferenceData from sampler chains and from a VI guide; ArviZ's summary, LOO and
trace plot on it; netCDF round trip; the empty posterior; a missing ArviZ."""

from __future__ import annotations

import sys

import arviz as az
import matplotlib
import numpy as np
import pytest
import torch

import pyro_sparse as ps

matplotlib.use("Agg")
pytestmark = pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto")


@pytest.fixture(scope="module")
def em_run(digits):
    torch.manual_seed(0)
    data = digits.subsample(train=600, test=150)
    model = ps.BayesianNetwork(ps.nets.mlp(64, (32,), 10), prior=ps.priors.SpikeAndSlab(1.0, 0.01, 0.5),
                               dataset_size=600)
    result = ps.em_sghmc(model, data.train, target_sparsity=0.7, chains=2, samples=10, epochs=12, batch_size=50,
                         step_size=3e-3, seed=0)
    return model, data, result


def test_inference_data_from_chains(em_run):
    model, data, result = em_run
    idata = result.posterior.to_arviz(data=data.test, max_weights=6)
    assert {"posterior", "sample_stats", "log_likelihood", "observed_data"} <= set(idata.groups())
    post = idata.posterior
    assert post.sizes["chain"] == 2 and post.sizes["draw"] == 10
    assert {"inclusion", "slab_scale", "weight"} <= set(post.data_vars)
    assert "spike_scale" not in post.data_vars  # fixed σ₀: constant, left out
    names = list(post["weight"].coords["weight_name"].values)
    assert len(names) == 6 and all(name.split("[")[0] in model.sites for name in names)
    assert np.all(post["weight"].values != 0)
    assert set(idata.sample_stats.data_vars) == {"lp", "sparsity", "step_size"}
    assert np.allclose(idata.sample_stats["sparsity"].values, 0.7, atol=1e-3)
    assert idata.log_likelihood["y"].shape == (2, 10, 150)
    assert np.all(idata.log_likelihood["y"].values <= 0)
    assert np.array_equal(idata.observed_data["y"].values, data.test.tensors[1].numpy())

    summary = az.summary(idata)
    assert {"mean", "sd", "r_hat", "ess_bulk"} <= set(summary.columns)
    assert "inclusion" in summary.index and len(summary) == 2 + 6
    loo = az.loo(idata)
    assert np.isfinite(loo.elpd_loo) and loo.n_data_points == 150
    axes = az.plot_trace(idata, var_names=["inclusion", "slab_scale"])
    assert axes.shape == (2, 2)
    matplotlib.pyplot.close("all")

    only = result.posterior.to_arviz(var_names=["inclusion"])
    assert set(only.posterior.data_vars) == {"inclusion"} and "log_likelihood" not in only.groups()


def test_netcdf_round_trip(em_run, tmp_path):
    _, data, result = em_run
    idata = result.posterior.to_arviz(data=data.test, max_weights=4)
    idata.to_netcdf(str(tmp_path / "posterior.nc"))
    again = az.from_netcdf(str(tmp_path / "posterior.nc"))
    np.testing.assert_array_equal(again.posterior["weight"].values, idata.posterior["weight"].values)
    assert list(again.posterior["weight"].coords["weight_name"].values) == list(
        idata.posterior["weight"].coords["weight_name"].values)


def test_inference_data_from_a_guide(digits):
    data = digits.subsample(train=400, test=100)
    model = ps.BayesianNetwork(ps.nets.mlp(64, (16,), 10), dataset_size=400)
    guide = ps.MeanField(model)
    ps.fit(model, guide, data.train, epochs=15, lr=1e-2, seed=0)
    posterior = ps.Posterior.from_guide(model, guide)
    idata = posterior.to_arviz(data=data.test, train_data=data.train, num_draws=40, max_weights=5)
    assert idata.posterior.sizes["chain"] == 1 and idata.posterior.sizes["draw"] == 40
    assert set(idata.posterior.data_vars) == {"weight"}
    assert set(idata.sample_stats.data_vars) == {"sparsity", "lp"}  # lp: the log joint of data.train
    assert np.isfinite(az.loo(idata).elpd_loo)
    assert len(az.summary(idata, kind="stats")) == 5
    results = posterior.evaluate(data.test, num_samples=8)
    assert results["accuracy"] > 0.5 and results["sparsity"] == 0.0


def test_empty_posterior_is_a_clear_error(digits):
    model = ps.BayesianNetwork(ps.nets.mlp(64, (16,), 10), dataset_size=10)
    empty = ps.Posterior.from_samples(model, {name: torch.zeros(0, *site.shape) for name, site in model.sites.items()})
    with pytest.raises(ValueError, match="cannot convert an empty posterior to ArviZ"):
        empty.to_arviz()
    with pytest.raises(ValueError, match="the posterior is empty"):
        empty.predict(digits.test.tensors[0])
    guide_posterior = ps.Posterior.from_guide(model, ps.MeanField(model))
    with pytest.raises(ValueError, match="num_draws must be a positive integer"):
        guide_posterior.to_arviz(num_draws=0)


def test_missing_arviz_names_the_extra(em_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "arviz", None)
    with pytest.raises(ImportError, match=r"pip install pyro-sparse\[arviz\]"):
        em_run[2].posterior.to_arviz()


def test_draws_spread_over_the_chains(em_run):
    model, _, result = em_run
    posterior = result.posterior
    picked = list(posterior.draws(4))
    stored = posterior.samples["1.weight"]
    indices = [next(i for i in range(len(stored)) if torch.equal(stored[i], draw["1.weight"])) for draw in picked]
    assert indices == [0, 6, 13, 19]  # evenly spread: both chains are used
    assert all("net.1.bias" in draw for draw in picked)  # deterministic parameters are sampled too
