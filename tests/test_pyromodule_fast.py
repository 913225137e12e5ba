"""fit's fused objective on Pyro's own BNN idiom (``infer.pyromodule_elbo``): taken when the model qualifies,
equal in expectation to Pyro's TraceMeanField_ELBO (dense, pruned and compact guides), as accurate as the
BayesianNetwork twin, resumable, SSVI under it; the traced objective for every model that does not qualify."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.autoguide import init_to_value
from pyro.nn import PyroModule, PyroSample
from pyro.nn.module import to_pyro_module_
from torch import nn

import pyro_sparse as ps
from pyro_sparse.infer.pyro_elbo import traced_negative_elbo
from pyro_sparse.infer.pyromodule_elbo import PyroModuleElbo, fused_objective


@pytest.fixture(autouse=True)
def _fresh_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def blobs(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four Gaussian classes in 8 dimensions: x (n, 8), y (n,)."""
    generator = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(4, 8, generator=generator)
    labels = torch.randint(0, 4, (n,), generator=generator)
    return centers[labels] + torch.randn(n, 8, generator=generator), labels


class Idiom(PyroModule):
    """Pyro's BNN idiom: ``net``'s Linear / Conv weights (and, with ``biases``, biases) ``PyroSample``d from
    ``prior(shape)`` (default N(0, 1)); a Categorical likelihood in a ``pyro.plate``."""

    def __init__(self, net: nn.Module, prior=None, biases: bool = False):
        super().__init__()
        prior = prior or (lambda shape: dist.Normal(0.0, 1.0).expand(shape).to_event(len(shape)))
        to_pyro_module_(net)
        for layer in net.modules():
            if isinstance(layer, nn.Linear | nn.modules.conv._ConvNd):
                layer.weight = PyroSample(prior(layer.weight.shape))
                if biases and layer.bias is not None:
                    layer.bias = PyroSample(prior(layer.bias.shape))
        self.body = net

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.body(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def small_convnet() -> nn.Module:
    """A convolution (weights drawn once per batch) and a Linear layer on its (B, 32) output."""
    return nn.Sequential(nn.Unflatten(1, (1, 8)), nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))


def trained(guide_name: str, model: PyroModule, x: torch.Tensor, y: torch.Tensor) -> ps.MeanField:
    """A guide of ``model`` after a short fit (SNRPruned: then pruned to 50 %)."""
    guide = {"MeanField": lambda: ps.MeanField(model, init_scale=0.1),
             "SNRPruned": lambda: ps.SNRPruned(model, init_scale=0.1),
             "SparseSubspace": lambda: ps.SparseSubspace(model, density=0.5, init_scale=0.1)}[guide_name]()
    history = ps.fit(model, guide, (x, y), epochs=3, batch_size=50, lr=1e-2, seed=0, progress=False)
    assert history.column("objective") == ["fused"] * 3
    if guide_name == "SNRPruned":
        guide.prune(sparsity=0.5)
    return guide


# ----------------------------------------------------------------------------------------------
# The objective: the same ELBO as Pyro's
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("net, prior", [
    (mlp, None),
    (mlp, lambda shape: ps.priors.SpikeAndSlab(1.0, 0.05, 0.3).distribution(shape)),
    (small_convnet, lambda shape: ps.priors.Gaussian(0.5).distribution(shape)),
], ids=["mlp-normal", "mlp-spike-and-slab", "conv-gaussian"])
@pytest.mark.parametrize("guide_name", ["MeanField", "SNRPruned", "SparseSubspace"])
def test_fused_objective_is_pyros_trace_mean_field_elbo_in_expectation(guide_name, net, prior):
    """N × the fused loss, averaged over draws, equals Pyro's own TraceMeanField_ELBO (its closed-form KL where
    registered; the spike-and-slab bound) of the masked model: an independent computation of the same ELBO."""
    torch.manual_seed(0)
    x, y = blobs(100)
    model = Idiom(net(), prior, biases=True)
    guide = trained(guide_name, model, x, y)
    objective = fused_objective(model, guide, (x, y), dataset_size=len(x))
    assert isinstance(objective, PyroModuleElbo)
    local_reparameterization = {"body.0.weight", "body.2.weight"} if net is mlp else {"body.4.weight"}
    assert {name for name, _ in objective.lrt_layers.values()} == local_reparameterization  # not the convolution
    draws = 600
    with torch.no_grad():
        ours = torch.stack([objective(model, guide, x, y).loss * len(x) for _ in range(draws)])
        elbo, masked = TraceMeanField_ELBO(), guide.masked_model()
        pyros = torch.tensor([elbo.loss(masked, guide, x, y) for _ in range(draws)])
        # on a batch of B = N / 2 the data term is scaled by N / B, as the traced objective scales it
        ours_on_batch = torch.stack([objective(model, guide, x[:50], y[:50]).loss for _ in range(draws)])
        traced_on_batch = torch.stack([traced_negative_elbo(model, guide, x[:50], y[:50], dataset_size=len(x)).loss
                                       for _ in range(draws)])
    assert_equal_means(ours, pyros)
    assert_equal_means(ours_on_batch, traced_on_batch)


def assert_equal_means(a: torch.Tensor, b: torch.Tensor) -> None:
    """The means of two samples (n,) of estimates agree within 4 standard errors of their difference."""
    standard_error = (a.var() / len(a) + b.var() / len(b)).sqrt()
    assert abs(float(a.mean() - b.mean())) < 4 * float(standard_error), (float(a.mean()), float(b.mean()))


def test_pruned_weights_are_out_of_the_fused_kl():
    """The KL term equals Σ over the active weights only of the closed-form Gaussian KL, computed here."""
    torch.manual_seed(0)
    x, y = blobs(100)
    model = Idiom(mlp())
    guide = trained("SNRPruned", model, x, y)
    terms = fused_objective(model, guide, (x, y), dataset_size=len(x))(model, guide, x, y)
    expected = 0.0
    for _, site in guide.named_sites():
        loc, scale = site.loc.detach()[site.mask], site.scale().detach()[site.mask]
        expected += float((0.5 * (loc**2 + scale**2) - scale.log() - 0.5).sum())  # KL(N(μ, σ²) ‖ N(0, 1))
    assert 0.45 < guide.sparsity < 0.55
    assert float(terms.kl) == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Which objective fit runs
# ----------------------------------------------------------------------------------------------
class LearnedNoise(PyroModule):
    """A regression in Pyro's idiom with a learned noise scale: a latent site that is not a layer weight."""

    def __init__(self):
        super().__init__()
        self.fc = PyroModule[nn.Linear](8, 1)
        self.fc.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 8]).to_event(2))
        self.noise = PyroSample(dist.HalfNormal(1.0))

    def forward(self, x, y=None):
        mean = self.fc(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, self.noise), obs=y)
        return mean


NOT_QUALIFYING = {
    "laplace prior": lambda: Idiom(mlp(), lambda shape: dist.Laplace(0.0, 1.0).expand(shape).to_event(len(shape))),
    "non-zero prior mean": lambda: Idiom(mlp(), lambda shape: dist.Normal(0.5, 1.0).expand(shape).to_event(len(shape))),
    "per-weight prior scales": lambda: Idiom(mlp(), lambda shape: dist.Normal(0.0, torch.rand(shape) + 0.5).to_event(
        len(shape))),
    "learned noise scale": LearnedNoise,
}


@pytest.mark.parametrize("case", list(NOT_QUALIFYING))
def test_fit_falls_back_to_the_traced_objective_for_a_model_that_does_not_qualify(case):
    torch.manual_seed(0)
    x, y = blobs(100)
    model = NOT_QUALIFYING[case]()
    targets = x[:, 0] if case == "learned noise scale" else y
    guide = ps.MeanField(model, init_scale=0.1)
    history = ps.fit(model, guide, (x, targets), epochs=2, batch_size=50, lr=1e-2, seed=0, progress=False)
    assert history.column("objective") == ["traced", "traced"]
    assert all(torch.isfinite(torch.tensor(history.column("loss"))))
    assert fused_objective(model, guide, (x, targets), dataset_size=len(x)) is None


def test_fit_takes_the_fused_path_for_the_idiom_and_the_traced_one_for_kl_mc():
    torch.manual_seed(0)
    x, y = blobs(100)
    model = Idiom(mlp())
    guide = ps.MeanField(model, init_scale=0.1)
    assert ps.fit(model, guide, (x, y), epochs=1, batch_size=50, seed=0, progress=False).column("objective") == [
        "fused"]
    assert ps.fit(model, guide, (x, y), epochs=1, batch_size=50, seed=0, progress=False, kl="mc").column(
        "objective") == ["traced"]


def test_a_layer_whose_weight_the_model_reads_elsewhere_draws_its_weights():
    """Local reparameterization is exact only when the layer's weight is used in its own call alone."""

    class ReadsItsWeight(Idiom):
        def forward(self, x, y=None):
            logits = self.body(x) + 0.0 * self.body[0].weight.sum()
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
            return logits

    x, y = blobs(100)
    model = ReadsItsWeight(mlp())
    guide = ps.MeanField(model)
    guide.setup(x, y)
    objective = fused_objective(model, guide, (x, y), dataset_size=len(x))
    assert [name for name, _ in objective.lrt_layers.values()] == ["body.2.weight"]


# ----------------------------------------------------------------------------------------------
# Training on the fused path
# ----------------------------------------------------------------------------------------------
def test_fit_on_the_idiom_reaches_its_bayesian_network_twins_accuracy_on_digits():
    data = ps.data.load("digits")
    (x, y), (x_test, y_test) = data.train.tensors, data.test.tensors
    accuracies = {}
    for kind in ("BayesianNetwork", "PyroModule"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        if kind == "BayesianNetwork":
            model = ps.BayesianNetwork(net, dataset_size=len(x))
            guide = ps.MeanField(model)
        else:
            initial = {f"body.{path}": param.detach().clone() for path, param in net.named_parameters()
                       if path.endswith("weight")}
            model = Idiom(net)
            guide = ps.MeanField(model, init_loc_fn=init_to_value(values=initial))
        history = ps.fit(model, guide, (x, y), epochs=8, batch_size=64, lr=1e-2, seed=0, progress=False)
        assert history.column("objective")[-1] == "fused"
        with torch.no_grad():
            probabilities = 0.0
            for _ in range(16):
                draws = guide.sample_weights()
                if kind == "BayesianNetwork":
                    logits = model.apply(x_test, draws)
                else:
                    logits = pyro.poutine.condition(model, data=draws)(x_test)
                probabilities = probabilities + logits.softmax(-1)
        accuracies[kind] = float((probabilities.argmax(-1) == y_test).float().mean())
    assert accuracies["BayesianNetwork"] > 0.9, accuracies
    assert accuracies["PyroModule"] >= accuracies["BayesianNetwork"] - 0.03, accuracies


def test_fit_resumes_the_fused_path_exactly(tmp_path):
    x, y = blobs(200)
    checkpoint = tmp_path / "checkpoint.pt"

    def run(epochs: int, resume: bool) -> tuple[Idiom, ps.MeanField]:
        pyro.clear_param_store()
        torch.manual_seed(0)
        model = Idiom(mlp())
        guide = ps.MeanField(model, init_scale=0.1)
        history = ps.fit(model, guide, (x, y), epochs=epochs, batch_size=50, seed=3, checkpoint=checkpoint,
                         resume=resume, progress=False)
        assert set(history.column("objective")) == {"fused"}
        return model, guide

    straight_model, straight = run(4, False)
    checkpoint.unlink()
    run(2, False)
    resumed_model, resumed = run(4, True)
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, straight.state_dict()[key]), key
    for (name, value), straight_value in zip(resumed_model.named_parameters(), straight_model.parameters(),
                                             strict=True):
        assert torch.equal(value, straight_value), name  # the model's own (deterministic) biases


def test_sparse_subspace_moves_its_support_under_fit_on_the_fused_path():
    torch.manual_seed(0)
    x, y = blobs(200)
    model = Idiom(mlp())
    guide = ps.SparseSubspace(model, density=0.5, update_every=5, init_scale=0.1)
    guide.setup(x[:50], y[:50])
    before = {name: mask.clone() for name, mask in guide.masks().items()}
    counts = guide.active_counts()
    history = ps.fit(model, guide, (x, y), epochs=6, batch_size=50, lr=1e-2, seed=0, progress=False)
    assert set(history.column("objective")) == {"fused"}
    assert sum(history.column("support_changes")) > 0
    assert guide.active_counts() == counts
    assert any(not torch.equal(mask, before[name]) for name, mask in guide.masks().items())
