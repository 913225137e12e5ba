"""Every posterior draw is evaluated with its own parameters, everywhere (W1), and a guide's "lp" is the
log joint of the training data (M5).

The references are computed by hand, independently of ``pyro_sparse.posterior``: the network is run
with ``torch.func.functional_call`` on the draw's weights and biases, and the Gaussian density and the
mixture CDF are written out with ``torch.distributions.Normal``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal
from torch.func import functional_call

import pyro_sparse as ps

pytestmark = pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto")


def _network_values(model: ps.BayesianNetwork, draw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The draw as a plain state of ``model.net`` (site "1.weight" -> "1.weight", "net.1.bias" -> "1.bias")."""
    values = {name: value for name, value in draw.items() if name in model.sites}
    values.update({name.removeprefix("net."): value for name, value in draw.items() if name.startswith("net.")})
    return values


def _by_hand_means(model: ps.BayesianNetwork, samples: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """(S, N): the network's output under each stored draw, run with functional_call."""
    total = len(next(iter(samples.values())))
    means = []
    with torch.no_grad():
        for s in range(total):
            draw = {name: value[s] for name, value in samples.items()}
            means.append(functional_call(model.net, _network_values(model, draw), (x,)).reshape(-1))
    return torch.stack(means)


@pytest.fixture(scope="module")
def regression_run():
    """SGHMC on the toy regression with a learned noise scale, started far from the data's (1.0 vs 0.1)."""
    torch.manual_seed(0)
    data = ps.data.load("toy-regression")
    model = ps.BayesianNetwork(ps.nets.mlp(1, (16,), 1), likelihood=ps.likelihoods.Gaussian(1.0, learn_scale=True),
                               dataset_size=len(data.train))
    result = ps.sample_sghmc(model, data.train, chains=2, samples=8, epochs=40, batch_size=32, seed=0)
    return model, data, result.posterior


def test_draws_carry_their_own_likelihood_scale(regression_run):
    model, _, posterior = regression_run
    draw_scales = posterior.samples["likelihood.log_scale"].exp()
    assert float(model.likelihood.scale.detach()) == pytest.approx(1.0)  # the model keeps its initial scale
    assert float(draw_scales.max()) < 0.7  # the sampled scales moved: the test below can tell them apart


def test_pointwise_log_likelihood_uses_each_draws_scale(regression_run):
    model, data, posterior = regression_run
    x, y = data.test.tensors
    idata = posterior.to_arviz(data=(x, y), max_weights=2)
    reported = torch.as_tensor(idata.log_likelihood["y"].values).reshape(16, -1)
    means = _by_hand_means(model, posterior.samples, x)
    scales = posterior.samples["likelihood.log_scale"].exp()
    by_hand = Normal(means, scales[:, None]).log_prob(y).double()
    torch.testing.assert_close(reported, by_hand, rtol=1e-4, atol=1e-4)


def test_evaluate_uses_each_draws_scale(regression_run):
    model, data, posterior = regression_run
    x, y = data.test.tensors
    results = posterior.evaluate(data.test, num_samples=16)
    means = _by_hand_means(model, posterior.samples, x).double()
    components = Normal(means, posterior.samples["likelihood.log_scale"].exp().double()[:, None])
    nll = -(torch.logsumexp(components.log_prob(y.double()), 0) - torch.log(torch.tensor(16.0))).mean()
    mixture_cdf = components.cdf(y.double()).mean(0)  # y lies in the central 95 % iff its CDF is in [0.025, 0.975]
    coverage = ((mixture_cdf >= 0.025) & (mixture_cdf <= 0.975)).double().mean()
    assert results["nll"] == pytest.approx(float(nll), rel=1e-4)
    assert results["coverage_95"] == pytest.approx(float(coverage), abs=1.5 / len(y))
    assert results["rmse"] == pytest.approx(float((means.mean(0) - y).pow(2).mean().sqrt()), rel=1e-4)


def test_summarize_of_bare_outputs_matches_evaluate(regression_run):
    """The CLI path: outputs of predict(), then summarize looks up the same draws' scales."""
    model, data, posterior = regression_run
    x, y = data.test.tensors
    outputs = posterior.predict(x, num_samples=6)
    from_outputs = ps.evaluation.summarize(model, posterior, outputs, x, y)
    direct = ps.evaluation.summarize(model, posterior, posterior.predictive(x, num_samples=6), x, y)
    assert from_outputs["nll"] == pytest.approx(direct["nll"])
    assert from_outputs["coverage_95"] == pytest.approx(direct["coverage_95"])


def _stored_classifier(digits):
    """A small classifier with three hand-made stored draws (one weight pruned in every draw)."""
    data = digits.subsample(train=200, test=60)
    model = ps.BayesianNetwork(ps.nets.mlp(64, (8,), 10), dataset_size=200)
    generator = torch.Generator().manual_seed(1)
    samples = {name: 0.3 * torch.randn(3, *site.shape, generator=generator) for name, site in model.sites.items()}
    samples["1.weight"][:, 0, 0] = 0.0
    return model, data, samples


def test_lp_of_a_guide_is_the_training_log_joint(digits):
    model, data, samples = _stored_classifier(digits)
    posterior = ps.Posterior.from_samples(model, samples)
    x_train, y_train = data.train.tensors
    idata = posterior.to_arviz(data=data.test, train_data=data.train, max_weights=2)
    reported = torch.as_tensor(idata.sample_stats["lp"].values).reshape(3)
    with torch.no_grad():
        logits = torch.stack([functional_call(model.net, _network_values(model, {n: v[s] for n, v in samples.items()}),
                                              (x_train,)) for s in range(3)])
        log_likelihood = -F.cross_entropy(logits.transpose(1, 2), y_train.expand(3, -1), reduction="none").sum(1)
        weights = torch.cat([value.reshape(3, -1) for value in samples.values()], 1)
        log_prior = torch.where(weights != 0, Normal(0.0, 1.0).log_prob(weights), 0.0).sum(1)
    torch.testing.assert_close(reported, (log_likelihood + log_prior).double(), rtol=1e-5, atol=1e-3)
    assert idata.log_likelihood["y"].shape == (1, 3, 60)  # the pointwise log-likelihood stays on `data`


def test_lp_of_a_guide_needs_the_training_data(digits):
    data = digits.subsample(train=200, test=60)
    model = ps.BayesianNetwork(ps.nets.mlp(64, (8,), 10), dataset_size=200)
    guide = ps.MeanField(model)
    ps.fit(model, guide, data.train, epochs=2, seed=0)
    posterior = ps.Posterior.from_guide(model, guide)
    assert "lp" not in posterior.to_arviz(data=data.test, num_draws=5, max_weights=2).sample_stats
    torch.manual_seed(3)
    on_test = posterior.to_arviz(data=data.test, train_data=data.train, num_draws=5, max_weights=2)
    torch.manual_seed(3)
    on_train = posterior.to_arviz(data=data.train, train_data=data.train, num_draws=5, max_weights=2)
    assert on_test.log_likelihood["y"].shape == (1, 5, 60)
    assert on_train.log_likelihood["y"].shape == (1, 5, 200)
    # the same draws: lp does not depend on the data given for the pointwise log-likelihood
    assert (on_test.sample_stats["lp"].values == on_train.sample_stats["lp"].values).all()
