"""Public API entry points answer a mistake with one clear error naming the problem and the fix.

One row per mistake in a table; the BatchNorm and dtype behaviour of ``check_batch`` and the
"guide built for another model" check have their own tests below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import pyro_sparse as ps
from pyro_sparse.data import check_data


@dataclass
class Setup:
    """Real models, guides and data the table's calls get wrong."""

    model: ps.BayesianNetwork
    guide: ps.MeanField
    posterior: ps.Posterior
    other_model: ps.BayesianNetwork
    other_guide: ps.MeanField
    regression: ps.BayesianNetwork
    regression_posterior: ps.Posterior
    x: torch.Tensor
    y: torch.Tensor
    x_reg: torch.Tensor
    y_reg: torch.Tensor


@pytest.fixture(scope="module")
def setup() -> Setup:
    torch.manual_seed(0)
    digits = ps.data.load("digits").subsample(train=64, test=32)
    x, y = digits.test.tensors
    model = ps.BayesianNetwork(ps.nets.mlp(64, (16,), 10), dataset_size=64)
    other_model = ps.BayesianNetwork(ps.nets.mlp(64, (32,), 10), dataset_size=64)
    guide, other_guide = ps.MeanField(model), ps.MeanField(other_model)
    regression = ps.BayesianNetwork(ps.nets.mlp(1, (8,), 1), likelihood=ps.likelihoods.Gaussian(0.1), dataset_size=20)
    x_reg = torch.linspace(-1, 1, 20).unsqueeze(1)
    return Setup(model, guide, ps.Posterior.from_guide(model, guide), other_model, other_guide, regression,
                 ps.Posterior.from_guide(regression, ps.MeanField(regression)), x, y, x_reg, torch.sin(x_reg[:, 0]))


def one_hot(y: torch.Tensor) -> torch.Tensor:
    return nn.functional.one_hot(y, 10).float()


def wrong_samples(s: Setup) -> dict[str, torch.Tensor]:
    return {name: torch.zeros(3, *site.shape[:-1], site.shape[-1] + 1) for name, site in s.model.sites.items()}


def good_samples(s: Setup) -> dict[str, torch.Tensor]:
    return {name: torch.zeros(4, *site.shape) for name, site in s.model.sites.items()}


CASES: list[tuple[str, Callable[[Setup], object], type[Exception], str]] = [
    # num_samples and batch_size: positive integers
    ("predict num_samples=2.5", lambda s: s.posterior.predict(s.x, num_samples=2.5), ValueError,
     r"^num_samples must be a positive integer, got 2\.5$"),
    ("predict num_samples=0", lambda s: s.posterior.predict(s.x, num_samples=0), ValueError,
     "num_samples must be a positive integer, got 0"),
    ("predict num_samples=True", lambda s: s.posterior.predict(s.x, num_samples=True), ValueError,
     "num_samples must be a positive integer, got True"),
    ("predict batch_size=0", lambda s: s.posterior.predict(s.x, batch_size=0), ValueError,
     "batch_size must be a positive integer, got 0"),
    ("predict batch_size=-1", lambda s: s.posterior.predict(s.x, batch_size=-1), ValueError,
     "batch_size must be a positive integer, got -1"),
    ("evaluate num_samples=2.5", lambda s: ps.evaluate(s.model, s.guide, (s.x, s.y), num_samples=2.5), ValueError,
     r"num_samples must be a positive integer, got 2\.5"),
    ("evaluate num_samples=0", lambda s: ps.evaluate(s.model, s.guide, (s.x, s.y), num_samples=0), ValueError,
     "num_samples must be a positive integer, got 0"),
    ("evaluate batch_size=0", lambda s: ps.evaluate(s.model, s.guide, (s.x, s.y), batch_size=0), ValueError,
     "batch_size must be a positive integer, got 0"),
    ("evaluate batch_size=-1", lambda s: ps.evaluate(s.model, s.guide, (s.x, s.y), batch_size=-1), ValueError,
     "batch_size must be a positive integer, got -1"),
    ("evaluate batch_size=True", lambda s: ps.evaluate(s.model, s.guide, (s.x, s.y), batch_size=True), ValueError,
     "batch_size must be a positive integer, got True"),
    ("draws(0)", lambda s: list(s.posterior.draws(0)), ValueError, "num_samples must be a positive integer, got 0"),
    # a guide of another model; arguments swapped or of the wrong kind
    ("evaluate with another model's guide", lambda s: ps.evaluate(s.other_model, s.guide, (s.x, s.y)), ValueError,
     r"this guide was built for another model \(sites of the guide vs the model: shapes 0?\.?1\.weight \(16, 64\) "
     r"vs \(32, 64\).*\): build the guide from the model you train/evaluate, e\.g\. ps\.guides\.MeanField\(model\)"),
    ("Posterior.from_guide with another model's guide", lambda s: ps.Posterior.from_guide(s.other_model, s.guide),
     ValueError, "this guide was built for another model"),
    ("evaluate with a posterior of another model", lambda s: ps.evaluate(s.other_model, s.posterior, (s.x, s.y)),
     ValueError, "this guide was built for another model"),
    ("evaluate with stored draws of another model",
     lambda s: ps.evaluate(s.other_model, ps.Posterior.from_samples(s.model, good_samples(s)), (s.x, s.y)),
     ValueError, r"this posterior holds draws of another model .*: evaluate it with the model it was sampled for"),
    ("evaluate(guide, model, data)", lambda s: ps.evaluate(s.guide, s.model, (s.x, s.y)), TypeError,
     "evaluate: model must be a pyro_sparse.BayesianNetwork, got MeanField: pass the model first"),
    ("Posterior.from_guide(guide, model)", lambda s: ps.Posterior.from_guide(s.guide, s.model), TypeError,
     "Posterior.from_guide: model must be a pyro_sparse.BayesianNetwork, got MeanField"),
    ("evaluate with a string guide", lambda s: ps.evaluate(s.model, "meanfield", (s.x, s.y)), TypeError,
     r"guide must be a pyro-sparse guide \(MeanField, SNRPruned, SparseSubspace\) or a Posterior, got str"),
    ("evaluate on an int", lambda s: ps.evaluate(s.model, s.guide, 123), TypeError,
     "expected a Dataset, TensorDataset or \\(x, y\\) pair; got int"),
    # inputs the network cannot take
    ("predict on a numpy array", lambda s: s.posterior.predict(s.x.numpy()), TypeError,
     r"inputs must be a torch.Tensor, got ndarray: convert them with torch.as_tensor\(x, dtype=torch.float32\)"),
    ("predict on the wrong shape", lambda s: s.posterior.predict(torch.rand(4, 1, 7, 7)), ValueError,
     r"wrong input shape: the network cannot take examples of shape \(1, 7, 7\)"),
    ("predict on float64", lambda s: s.posterior.predict(s.x.double()), ValueError,
     r"^inputs have dtype torch.float64 but the network computes in torch.float32: convert them with x.float\(\)"),
    ("evaluate on numpy's default ints",
     lambda s: ps.evaluate(s.model, s.guide, (np.round(s.x.numpy() * 16).astype(np.int64), s.y.numpy())),
     ValueError, "inputs have dtype torch.int64 but the network computes in torch.float32: convert them with x.float"),
    ("predict on nothing", lambda s: s.posterior.predict(s.x[:0]), ValueError, "dataset is empty"),
    ("predict on a scalar", lambda s: s.posterior.predict(torch.tensor(1.0)), ValueError,
     "inputs must have a leading batch dimension"),
    ("predict on NaN", lambda s: s.posterior.predict(s.x.index_fill(0, torch.tensor([3]), float("nan"))), ValueError,
     "inputs contain NaN or inf"),
    ("predict_proba of a regression model", lambda s: s.regression_posterior.predict_proba(s.x_reg), ValueError,
     r"predict_proba is for classification, but this model's likelihood is regression: use predict\(x\)"),
    # targets
    ("classification targets (N, 1)", lambda s: ps.evaluate(s.model, s.guide, (s.x, s.y.unsqueeze(1))), ValueError,
     r"^classification targets must have shape \(N,\) of class indices, got \(N, 1\): use y.squeeze\(1\)$"),
    ("one-hot targets", lambda s: ps.evaluate(s.model, s.guide, (s.x, one_hot(s.y))), ValueError,
     r"got \(32, 10\): for one-hot or probability targets use y.argmax\(1\)"),
    ("float class indices", lambda s: ps.evaluate(s.model, s.guide, (s.x, s.y.float())), ValueError,
     r"labels must be integers \(class indices\), got dtype torch.float32: convert them with y.long\(\)"),
    ("labels beyond the outputs", lambda s: s.model.check_batch(s.x, s.y + 5), ValueError,
     r"labels must lie in \[0, 10\); found 1[0-4]: the network has 10 outputs, one per class"),
    ("check_data targets (N, 1)", lambda s: check_data(s.x, s.y.unsqueeze(1)), ValueError,
     r"classification targets must have shape \(N,\) of class indices, got \(N, 1\): use y.squeeze\(1\)"),
    ("regression targets (N, 1)",
     lambda s: ps.evaluate(s.regression, s.regression_posterior, (s.x_reg, s.y_reg.unsqueeze(1))), ValueError,
     r"^regression targets must have shape \(N,\), got \(N, 1\): use y.squeeze\(1\)$"),
    ("check_data regression targets (N, 1)",
     lambda s: check_data(s.x_reg, s.y_reg.unsqueeze(1), task="regression"), ValueError,
     r"regression targets must have shape \(N,\), got \(N, 1\): use y.squeeze\(1\)"),
    ("integer regression targets", lambda s: s.regression.check_batch(s.x_reg, s.y_reg.long()), ValueError,
     r"regression targets must be floating point, got dtype torch.int64: convert them with y.float\(\)"),
    ("Gaussian likelihood on 3 outputs",
     lambda s: ps.BayesianNetwork(ps.nets.mlp(1, (8,), 3), likelihood=ps.likelihoods.Gaussian(0.1),
                                  dataset_size=20).check_batch(s.x_reg, s.y_reg), ValueError,
     "the Gaussian likelihood models one output per example, but the network gives 3: give the network's last layer"),
    ("Gaussian scale as a string", lambda s: ps.likelihoods.Gaussian("0.1"), ValueError,
     "scale must be a finite number > 0, got '0.1'"),
    # stored draws
    ("from_samples of a tensor", lambda s: ps.Posterior.from_samples(s.model, torch.zeros(3, 4)), TypeError,
     r"samples must be a dict of site name -> tensor \(S, ...\), got Tensor"),
    ("from_samples of the wrong shape", lambda s: ps.Posterior.from_samples(s.model, wrong_samples(s)), ValueError,
     r"samples\['1.weight'\] has shape \(3, 16, 65\), expected \(S, 16, 64\): one draw per row"),
    ("from_samples of lists", lambda s: ps.Posterior.from_samples(s.model, {n: [0.0] for n in s.model.sites}),
     TypeError, "are not tensors: convert them with torch.as_tensor"),
    ("from_samples chains=1.5", lambda s: ps.Posterior.from_samples(s.model, good_samples(s), chains=1.5), ValueError,
     "chains must be a positive integer dividing the 4 draws, got 1.5"),
    # datasets
    ("load digits with root=123", lambda s: ps.data.load("digits", root=123), TypeError,
     r"root must be a folder path \(str or os.PathLike\), got int: pass e.g. root='data'"),
    ("load mnist with root=123", lambda s: ps.data.load("mnist", root=123), TypeError, "root must be a folder path"),
    ("load a dataset named 123", lambda s: ps.data.load(123), TypeError,
     "name must be a str, got int: choose one of: digits, mnist"),
    ("load with download='yes'", lambda s: ps.data.load("mnist", download="yes"), TypeError,
     "download must be True or False, got 'yes'"),
    ("subsample 2.5 examples", lambda s: ps.data.load("digits").subsample(train=2.5), ValueError,
     r"subsample size for train must be a positive integer \(or None for all\); got 2\.5"),
    ("check_batch of a list", lambda s: s.model.check_batch([[0.0] * 64]), TypeError,
     "inputs must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize(("call", "error", "message"), [row[1:] for row in CASES], ids=[row[0] for row in CASES])
def test_a_mistake_is_one_clear_error(setup: Setup, call, error, message):
    with pytest.raises(error, match=message) as raised:
        call(setup)
    assert type(raised.value) in (ValueError, TypeError)
    assert "\n" not in str(raised.value)


# --------------------------------------------------------------------------- check_batch: BatchNorm and dtypes


def test_check_batch_probes_a_batchnorm_network_in_eval_mode_and_leaves_it_as_it_was(digits):
    model = ps.BayesianNetwork(ps.nets.build("resnet18", (1, 8, 8), 10), dataset_size=len(digits.train))
    x, y = digits.train.tensors
    model.train()
    norms = [m for m in model.net.modules() if isinstance(m, nn.BatchNorm2d)]
    norms[0].eval()  # a mixed state must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    statistics = {name: value.clone() for name, value in model.net.named_buffers()
                  if "running" in name or "tracked" in name}
    model.check_batch(x[:1], y[:1])  # one example would break BatchNorm in training mode
    model.check_batch(x[:5], y[:5])
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(value, model.net.get_buffer(name)) for name, value in statistics.items())
    with pytest.raises(ValueError, match="labels must lie in"):
        model.check_batch(x[:5], y[:5] + 10)


def test_check_batch_names_a_dtype_mismatch_only_when_the_network_fails():
    model = ps.BayesianNetwork(ps.nets.mlp(4, (8,), 3), dataset_size=10)
    with pytest.raises(ValueError, match=r"inputs have dtype torch.float64 but the network computes in torch.float32"):
        model.check_batch(torch.rand(5, 4, dtype=torch.float64))
    double = ps.BayesianNetwork(ps.nets.mlp(4, (8,), 3).double(), dataset_size=10)
    double.check_batch(torch.rand(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1]))
    with pytest.raises(ValueError, match=r"torch.float32 but the network computes in torch.float64: .* x.double\(\)"):
        double.check_batch(torch.rand(5, 4))


def test_check_batch_accepts_integer_inputs_for_a_network_that_takes_them():
    net = nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(12, 3))
    model = ps.BayesianNetwork(net, dataset_size=10)
    tokens = torch.randint(0, 20, (6, 3))
    model.check_batch(tokens, torch.tensor([0, 1, 2, 0, 1, 2]))
    posterior = ps.Posterior.from_guide(model, ps.MeanField(model))
    assert posterior.predict(tokens, num_samples=2).shape == (2, 6, 3)


# --------------------------------------------------------------------------- guides and the model they were built for


def test_a_guide_accepts_a_rebuilt_model_of_the_same_architecture(setup: Setup):
    rebuilt = ps.BayesianNetwork(ps.nets.mlp(64, (16,), 10), dataset_size=64)
    rebuilt.load_state_dict(setup.model.state_dict())
    setup.guide.check_model(rebuilt)
    results = ps.evaluate(rebuilt, setup.guide, (setup.x, setup.y), num_samples=2)
    assert 0.0 <= results["accuracy"] <= 1.0
    assert ps.Posterior.from_guide(rebuilt, setup.guide).predict(setup.x, num_samples=2).shape == (2, 32, 10)


def test_a_guide_names_the_sites_that_differ(setup: Setup):
    with pytest.raises(ValueError) as refused:
        setup.other_guide.check_model(setup.model)
    message = str(refused.value)
    assert "1.weight (32, 64) vs (16, 64)" in message and "3.weight (10, 32) vs (10, 16)" in message
    deeper = ps.BayesianNetwork(ps.nets.mlp(64, (16, 16), 10), dataset_size=64)
    with pytest.raises(ValueError, match=r"only the model has 5\.weight"):
        setup.guide.check_model(deeper)
    snr = ps.guides.SNRPruned(setup.model)
    with pytest.raises(ValueError, match=r"e\.g\. ps\.guides\.SNRPruned\(model\)"):
        snr.check_model(setup.other_model)
    with pytest.raises(ValueError, match="model must be a pyro_sparse.BayesianNetwork"):
        setup.guide.check_model(setup.guide)
