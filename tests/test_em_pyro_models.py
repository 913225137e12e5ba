"""EM-SGHMC and dense SGHMC on the user's own Pyro models: a plain function and a PyroModule, their
spike-and-slab sites learned through the ``ps.priors.SpikeAndSlab`` object they draw from."""

from __future__ import annotations

import arviz as az
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroSample
from test_pyro_models import KNOWN_NOISE, blobs, conjugate_posterior, known_noise_model, plain_model, sparse_regression
from torch import nn

import pyro_sparse as ps


@pytest.fixture(autouse=True)
def _fresh_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def sparse_regression_model(prior: ps.priors.SpikeAndSlab):
    """y ~ N(x w, σ²), w ~ the spike-and-slab ``prior`` (p,), σ ~ HalfNormal(1): a plain Pyro function."""

    def model(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        w = pyro.sample("w", prior.distribution((x.shape[-1],)))
        noise = pyro.sample("noise", dist.HalfNormal(1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(x @ w, noise), obs=y)

    return model


def test_em_sghmc_on_a_plain_sparse_regression_includes_exactly_the_true_inputs():
    """n = 200, p = 100, 10 true inputs: the inclusion probabilities exceed 0.5 on exactly those, with no
    pruning ramp (EM alone decides); the prior object holds the learned π, σ₁; σ (a constrained site
    sampled alongside) lands at the true noise; the draws go to ArviZ with the model's own pointwise
    log-likelihood."""
    x, y, beta = sparse_regression()
    prior = ps.priors.SpikeAndSlab(slab_scale=1.0, spike_scale=0.05, inclusion=0.5)
    model = sparse_regression_model(prior)
    result = ps.em_sghmc(model, (x, y), target_sparsity=0.0, chains=2, samples=20, epochs=500, batch_size=50,
                         seed=0, progress=False)
    inclusion = result.inclusion_probability["w"]
    assert torch.equal(inclusion > 0.5, beta != 0), inclusion
    assert result.spike_scale == {"w": pytest.approx(0.05)}  # a Pyro model's default: the prior's own σ₀
    assert 0.05 < float(prior.inclusion) < 0.3  # 10 of 100 matter; started at 0.5
    assert float(prior.slab_scale) > 0.5
    posterior = result.posterior
    assert isinstance(posterior, ps.PyroPosterior) and posterior.samples["w"].shape == (40, 100)
    assert abs(float(posterior.samples["noise"].mean()) - 0.5) < 0.1
    assert bool((posterior.samples["noise"] > 0).all())
    x_test, y_test, _ = sparse_regression(n=300, seed=5)
    metrics = ps.evaluate(model, posterior, (x_test, x_test @ beta + 0.5 * torch.randn(300)))
    assert metrics["rmse"] < 0.8 and metrics["coverage_95"] > 0.85

    idata = posterior.to_arviz(x, y)
    assert idata.log_likelihood["y"].shape == (2, 20, 200)
    w, noise = posterior.samples["w"][23], posterior.samples["noise"][23]  # chain 1, draw 3
    by_hand = dist.Normal(x @ w, noise).log_prob(y).double()
    assert torch.allclose(torch.as_tensor(idata.log_likelihood["y"].values[1, 3]), by_hand)
    assert {"inclusion", "slab_scale", "w", "noise"} <= set(idata.posterior.data_vars)
    assert idata.sample_stats["lp"].shape == (2, 20)
    assert float(az.summary(idata, var_names=["noise"], kind="diagnostics")["r_hat"].max()) < 1.1


def test_sample_sghmc_on_a_plain_model_matches_the_conjugate_posterior():
    """Dense SGHMC by ``sample_sghmc`` (the whole loop: chains, preconditioner, thinning) on a conjugate
    model: the pooled draws have the closed-form posterior's mean and variance."""
    x, y, _ = sparse_regression(n=200, p=3, seed=2)
    mean, precision = conjugate_posterior(x, y)
    sd = torch.linalg.inv(precision).diagonal().sqrt()
    result = ps.sample_sghmc(known_noise_model, (x, y), chains=2, samples=200, epochs=3000, batch_size=200,
                             step_size=3e-3, seed=0, progress=False)
    draws = result.posterior.samples["w"]
    assert draws.shape == (400, 3) and KNOWN_NOISE == 0.5
    assert ((draws.mean(0) - mean).abs() / sd).max() < 0.25
    ratio = draws.var(0) / sd**2
    assert ratio.min() > 0.75 and ratio.max() < 1.25, ratio


class SpikeAndSlabNet(PyroModule):
    """An 8-16-4 network in Pyro's BNN idiom whose weights ``PyroSample`` one SpikeAndSlab prior; the
    biases stay nn.Parameters (sampled under a flat prior)."""

    def __init__(self, prior: ps.priors.SpikeAndSlab) -> None:
        super().__init__()
        self.prior = prior
        self.fc1 = PyroModule[nn.Linear](8, 16)
        self.fc1.weight = PyroSample(prior.distribution((16, 8)))
        self.fc2 = PyroModule[nn.Linear](16, 4)
        self.fc2.weight = PyroSample(prior.distribution((4, 16)))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.fc2(torch.relu(self.fc1(x)))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


def test_em_sghmc_prunes_a_pyromodule_network_and_classifies_like_its_bayesian_network_twin():
    x, y, x_test, y_test = blobs()
    torch.manual_seed(0)
    prior = ps.priors.SpikeAndSlab(slab_scale=1.0, spike_scale=0.01, inclusion=0.5)
    model = SpikeAndSlabNet(prior)
    bias_before = model.fc1.bias.detach().clone()
    result = ps.em_sghmc(model, (x, y), target_sparsity=0.5, chains=2, samples=8, epochs=60, batch_size=50,
                         seed=0, progress=False)
    twin = ps.BayesianNetwork(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), dataset_size=len(x),
                              prior=ps.priors.SpikeAndSlab(slab_scale=1.0, spike_scale=0.01, inclusion=0.5))
    twin_result = ps.em_sghmc(twin, (x, y), target_sparsity=0.5, chains=2, samples=8, epochs=60, batch_size=50,
                              seed=0, progress=False)
    twin.eval()
    mine = ps.evaluate(model, result.posterior, (x_test, y_test))
    theirs = ps.evaluate(twin, twin_result.posterior, (x_test, y_test))
    assert mine["accuracy"] >= theirs["accuracy"] - 0.05 and mine["accuracy"] > 0.85, (mine, theirs)
    assert set(result.masks) == {"fc1.weight", "fc2.weight"}
    assert result.history[-1]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert mine["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert float(prior.inclusion) != 0.5  # the object the weights are drawn from holds the estimates
    biases = result.posterior.samples["fc1.bias"]  # the module's parameters are sampled too
    assert biases.shape == (16, 16) and not torch.allclose(biases[0], bias_before)


def test_em_sghmc_on_a_pyro_model_resumes_exactly(tmp_path):
    x, y, _ = sparse_regression(n=100, p=10)
    settings = dict(target_sparsity=0.5, chains=2, samples=4, epochs=8, batch_size=25, seed=3, progress=False)
    whole = ps.em_sghmc(sparse_regression_model(ps.priors.SpikeAndSlab(spike_scale=0.05)), (x, y), **settings)

    class Stop(Exception):
        pass

    def stop_after_five(row):
        if row["epoch"] == 5:
            raise Stop

    checkpoint = tmp_path / "em.pt"
    with pytest.raises(Stop):
        ps.em_sghmc(sparse_regression_model(ps.priors.SpikeAndSlab(spike_scale=0.05)), (x, y), **settings,
                    checkpoint=checkpoint, callback=stop_after_five)
    prior = ps.priors.SpikeAndSlab(spike_scale=0.05)
    resumed = ps.em_sghmc(sparse_regression_model(prior), (x, y), **settings, checkpoint=checkpoint, resume=True)
    for name in ("w", "noise"):
        assert torch.equal(resumed.posterior.samples[name], whole.posterior.samples[name])
    assert float(prior.inclusion) == pytest.approx(whole.history[-1]["inclusion"])


def test_models_em_cannot_sample_are_refused_with_the_way_out():
    x, y, _ = sparse_regression(n=40, p=5)

    def gaussian_weights(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([5]).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)

    with pytest.raises(ValueError, match="SpikeAndSlab.*prior.distribution"):
        ps.em_sghmc(gaussian_weights, (x, y), epochs=2, samples=1, progress=False)

    first, second = ps.priors.SpikeAndSlab(), ps.priors.SpikeAndSlab()

    def two_priors(x, y=None):
        w = pyro.sample("w", first.distribution((4,)))
        v = pyro.sample("v", second.distribution((1,)))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(x[:, :4] @ w + v, 1.0), obs=y)

    with pytest.raises(ValueError, match="2 different SpikeAndSlab objects"):
        ps.em_sghmc(two_priors, (x, y), epochs=2, samples=1, progress=False)

    def hand_built(x, y=None):
        slab = ps.distributions.SpikeAndSlabNormal(1.0, 0.01, 0.5)
        w = pyro.sample("w", slab.expand([5]).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)

    with pytest.raises(ValueError, match="built by hand.*prior.distribution"):
        ps.em_sghmc(hand_built, (x, y), epochs=2, samples=1, progress=False)
    x8, y8, _, _ = blobs(n=20)
    with pytest.raises(ValueError, match=r"learns \[.b1.\] with pyro.param.*pyro.sample"):
        ps.sample_sghmc(plain_model, (x8, y8), epochs=2, samples=1, progress=False)
    with pytest.raises(ValueError, match="plain nn.Module.*ps.BayesianNetwork"):
        ps.sample_sghmc(nn.Linear(8, 4), (x8, y8), epochs=2, samples=1, progress=False)

    def discrete(x, y=None):
        switch = pyro.sample("switch", dist.Bernoulli(0.5))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(switch * x[:, 0], 1.0), obs=y)

    with pytest.raises(ValueError, match="'switch' is discrete.*config_enumerate"):
        ps.sample_sghmc(discrete, (x, y), epochs=2, samples=1, progress=False)


def test_evaluate_takes_a_pyro_model_with_its_guide():
    """``ps.evaluate(model, guide, data)`` on a plain Pyro classifier: the metrics of the guide's predictive."""
    from pyro.infer import SVI, Trace_ELBO

    x, y, x_test, y_test = blobs()

    def classifier(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([4, 8]).to_event(2))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Categorical(logits=x @ w.T), obs=y)

    guide = ps.MeanField(classifier, init_scale=0.05)
    svi = SVI(classifier, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(200):
        svi.step(x, y)
    metrics = ps.evaluate(classifier, guide, (x_test, y_test), num_samples=16)
    assert metrics["accuracy"] > 0.85 and 0 <= metrics["ece"] < 0.2
    assert metrics["total_weights"] == 32 and metrics["sparsity"] == 0.0
