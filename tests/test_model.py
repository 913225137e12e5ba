"""BayesianNetwork: any nn.Module as a Pyro model, without touching the caller's module."""

from __future__ import annotations

import pyro
import pyro.poutine as poutine
import pytest
import torch
import torchvision
from torch import nn

import pyro_sparse as ps


def _snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in net.named_parameters()}


@pytest.mark.parametrize(
    "make_net, example, expected_sites",
    [
        (lambda: ps.nets.mlp(64, (32,), 10), torch.randn(5, 1, 8, 8), {"1.weight", "3.weight"}),
        (ps.nets.lenet5, torch.randn(5, 1, 28, 28),
         {"0.weight", "3.weight", "7.weight", "9.weight", "11.weight"}),
        (lambda: torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32), None),
    ],
    ids=["mlp", "lenet5", "torchvision-resnet18"],
)
def test_any_network_becomes_a_pyro_model(make_net, example, expected_sites):
    net = make_net()
    before = _snapshot(net)
    classes_before = {name: type(m) for name, m in net.named_modules()}
    model = ps.BayesianNetwork(net, dataset_size=1000)

    weights = {name for name, m in net.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}
    assert set(model.sites) == {f"{name}.weight" for name in weights}
    if expected_sites is not None:
        assert set(model.sites) == expected_sites
    # biases and BatchNorm stay deterministic parameters of the model
    deterministic = {name for name, _ in model.net.named_parameters()}
    assert not deterministic & set(model.sites)
    assert all(name.endswith(("bias", "weight")) for name in deterministic)

    y = torch.randint(0, 10, (len(example),))
    trace = poutine.trace(model).get_trace(example, y)
    samples = {n for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]}
    assert set(model.sites) <= samples
    obs = trace.nodes["obs"]
    assert obs["is_observed"] and obs["scale"] == pytest.approx(1000 / len(example))  # N / B
    assert trace.nodes["output"]["value"].shape == (len(example), 10)

    # the caller's module is untouched: same classes, same parameter objects and values
    assert {name: type(m) for name, m in net.named_modules()} == classes_before
    after = dict(net.named_parameters())
    assert set(after) == set(before)
    assert all(torch.equal(after[n], before[n]) for n in before)
    for name in model.sites:
        assert isinstance(net.get_parameter(name), nn.Parameter)


def test_include_and_exclude_select_bayesian_parameters():
    net = ps.nets.mlp(64, (32, 16), 10)
    everything = ps.BayesianNetwork(net, dataset_size=10, include="*")
    assert set(everything.sites) == {name for name, _ in net.named_parameters()}
    no_last = ps.BayesianNetwork(net, dataset_size=10, exclude=["5.*"])
    assert set(no_last.sites) == {"1.weight", "3.weight"}
    biases = ps.BayesianNetwork(net, dataset_size=10, include=lambda name, module, p: name.endswith("bias"))
    assert set(biases.sites) == {"1.bias", "3.bias", "5.bias"}
    with pytest.raises(ValueError, match="no Bayesian parameters"):
        ps.BayesianNetwork(net, dataset_size=10, include="nothing.*")


def test_local_reparameterization_samples_the_right_preactivation_moments():
    """A Linear layer's output under LRT is N(x·μ + b, x²·σ²) per example."""
    layer = nn.Linear(6, 3)
    model = ps.BayesianNetwork(layer, dataset_size=10, likelihood=ps.likelihoods.Gaussian(1.0))
    x = torch.randn(4, 6)
    loc, var = torch.randn(3, 6), torch.rand(3, 6) * 0.5
    draws = torch.stack([model.apply(x, moments={"weight": (loc, var)}) for _ in range(20000)])
    mean = x @ loc.T + layer.bias.detach()
    assert torch.allclose(draws.mean(0), mean, atol=0.03)
    assert torch.allclose(draws.var(0), (x * x) @ var.T, rtol=0.05, atol=1e-3)
    # examples get independent noise
    corr = torch.corrcoef(torch.stack([draws[:, 0, 0], draws[:, 1, 0]]))[0, 1]
    assert abs(corr) < 0.05
    # outside the context the layer is the plain layer again
    assert torch.allclose(model.apply(x), layer(x))


def test_convolutions_never_use_local_reparameterization():
    """LRT is not exact for a convolution (its spatial positions share one weight draw): refused."""
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 25, 2))
    auto = ps.BayesianNetwork(net, dataset_size=10)
    assert [s.local_reparameterization for s in auto.sites.values()] == [False, True]
    assert not isinstance(auto.net[0], ps.layers.LocalReparameterization)
    with pytest.raises(ValueError, match="not exact for convolutions"):
        ps.BayesianNetwork(net, dataset_size=10, local_reparameterization="all")
    with pytest.raises(ValueError, match="local_reparameterization must be one of"):
        ps.BayesianNetwork(net, dataset_size=10, local_reparameterization="sometimes")


def test_gaussian_likelihood_with_learned_noise_is_a_model_parameter():
    model = ps.BayesianNetwork(ps.nets.mlp(1, (8,), 1), likelihood=ps.likelihoods.Gaussian(0.5, learn_scale=True),
                               dataset_size=20)
    assert "likelihood.log_scale" in dict(model.named_parameters())
    x, y = torch.randn(7, 1), torch.randn(7)
    trace = poutine.trace(model).get_trace(x, y)
    assert trace.nodes["obs"]["fn"].batch_shape == (7,)
    assert f"{model.pyro_name}$$$likelihood.log_scale" in pyro.get_param_store()
    fixed = ps.BayesianNetwork(ps.nets.mlp(1, (8,), 1), likelihood=ps.likelihoods.Gaussian(0.5), dataset_size=20)
    assert "likelihood.log_scale" not in dict(fixed.named_parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dataset_size": 0}, "dataset_size must be a positive integer"),
        ({"dataset_size": None}, "dataset_size must be a positive integer"),
        ({"dataset_size": 2.5}, "dataset_size must be a positive integer"),
        ({"dataset_size": 10, "prior": "gaussian"}, "prior must be a pyro_sparse.priors.Prior"),
        ({"dataset_size": 10, "likelihood": 3}, "likelihood must be"),
    ],
)
def test_bad_model_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ps.BayesianNetwork(ps.nets.mlp(4, (3,), 2), **kwargs)
    with pytest.raises(ValueError, match="net must be a torch.nn.Module"):
        ps.BayesianNetwork("mlp", dataset_size=10)


def test_check_batch_names_the_problem():
    model = ps.BayesianNetwork(ps.nets.mlp(64, (8,), 10), dataset_size=10)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    model.check_batch(x, y)
    with pytest.raises(ValueError, match="labels must lie in \\[0, 10\\); found 12"):
        model.check_batch(x, torch.tensor([0, 1, 2, 12]))
    with pytest.raises(ValueError, match="labels must lie in \\[0, 10\\); found -1"):
        model.check_batch(x, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match="inputs contain NaN or inf"):
        model.check_batch(x.index_fill(0, torch.tensor([1]), float("nan")), y)
    with pytest.raises(ValueError, match="inputs contain NaN or inf"):
        model.check_batch(x.index_fill(0, torch.tensor([2]), float("inf")), y)
    with pytest.raises(ValueError, match="wrong input shape.*\\(1, 7, 7\\)"):
        model.check_batch(torch.rand(4, 1, 7, 7), y)
    with pytest.raises(ValueError, match="dataset is empty"):
        model.check_batch(torch.rand(0, 1, 8, 8), y[:0])


def test_local_reparameterization_with_a_bayesian_bias():
    """With include="*" a Linear layer's bias is Bayesian too: N(x·μ + μ_b, x²·σ² + σ_b²)."""
    layer = nn.Linear(5, 2)
    model = ps.BayesianNetwork(layer, dataset_size=10, include="*", likelihood=ps.likelihoods.Gaussian(1.0))
    assert set(model.sites) == {"weight", "bias"}
    assert all(site.local_reparameterization for site in model.sites.values())
    guide = ps.MeanField(model, init_scale=0.3)
    x = torch.randn(3, 5)
    moments, _ = guide.moments_and_kl(model.prior)
    lrt = {name: (q.loc.detach(), q.var.detach()) for name, q in moments.items()}
    draws = torch.stack([model.apply(x, moments=lrt) for _ in range(20000)])
    (w_loc, w_var), (b_loc, b_var) = lrt["weight"], lrt["bias"]
    assert torch.allclose(draws.mean(0), x @ w_loc.T + b_loc, atol=0.03)
    assert torch.allclose(draws.var(0), (x * x) @ w_var.T + b_var, rtol=0.05)


def test_a_whole_model_survives_torch_save_and_deepcopy(tmp_path):
    import copy

    model = ps.BayesianNetwork(ps.nets.lenet5(), dataset_size=100)
    torch.save(model, tmp_path / "model.pt")
    for restored in (torch.load(tmp_path / "model.pt", weights_only=False), copy.deepcopy(model)):
        assert set(restored.sites) == set(model.sites)
        for name, (layer, _) in restored._site_layers.items():
            assert layer is restored.net.get_submodule(model.sites[name].module_path)
            assert type(layer) is type(model._site_layers[name][0])
        x = torch.randn(2, 1, 28, 28)
        assert torch.allclose(restored.apply(x), model.apply(x))
        guide = ps.MeanField(restored)
        moments, _ = guide.moments_and_kl(restored.prior)
        assert restored.apply(x, moments={n: (q.loc, q.var) for n, q in moments.items()}).shape == (2, 10)


def test_layer_labels_name_unnamed_layers_by_kind_and_keep_named_paths():
    lenet = ps.BayesianNetwork(ps.nets.lenet5(), dataset_size=10)
    assert lenet.layer_labels() == {
        "0.weight": "conv1", "3.weight": "conv2", "7.weight": "fc1", "9.weight": "fc2", "11.weight": "fc3"
    }
    with_biases = ps.BayesianNetwork(ps.nets.mlp(4, (5,), 2), dataset_size=10, include=lambda name, module, p: True)
    assert with_biases.layer_labels() == {"1.weight": "fc1", "1.bias": "fc1.bias", "3.weight": "fc2",
                                          "3.bias": "fc2.bias"}
    resnet_labels = ps.BayesianNetwork(ps.nets.resnet20(), dataset_size=10).layer_labels()
    assert resnet_labels["stages.0.0.conv1.weight"] == "stages.0.0.conv1"
