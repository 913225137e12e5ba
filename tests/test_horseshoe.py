"""The node-wise horseshoe prior (Ghosh, Yao & Doshi-Velez 2019): its Pyro model, the mean-field guide on it,
the fused objective against Pyro's ``Trace_ELBO``, unit scales that find the units a network uses, pruning by
them, digits accuracy, checkpoints, and a hand-written Pyro model."""

from __future__ import annotations

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.poutine.util import site_is_subsample

import pyro_sparse as ps
from pyro_sparse.guides import horseshoe as hs
from pyro_sparse.infer.elbo import negative_elbo
from pyro_sparse.priors import NodeHorseshoe, node_horseshoe_weight, regularized_scale


def tiny_model(prior=None, dataset_size=40):
    return ps.BayesianNetwork(ps.nets.mlp(4, (6,), 3), prior=prior or NodeHorseshoe(), dataset_size=dataset_size)


def mean_and_se(values: list[float]) -> tuple[float, float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    return tensor.mean().item(), tensor.std().item() / math.sqrt(len(values))


def agree(first: tuple[float, float], second: tuple[float, float]) -> bool:
    return abs(first[0] - second[0]) < 4 * math.hypot(first[1], second[1])


# ------------------------------------------------------------------------------------------------
# The prior and its Pyro model
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, value", [("node_scale", 0.0), ("global_scale", -1e-5), ("slab_scale", math.nan),
                                         ("slab_df", math.inf), ("node_scale", [1.0, 2.0])])
def test_bad_hyperparameters_are_one_clear_value_error(name, value):
    with pytest.raises(ValueError, match=f"NodeHorseshoe prior: {name} must be a finite number > 0"):
        NodeHorseshoe(**{name: value})


def test_the_prior_is_registered_and_the_helper_refuses_other_priors():
    prior = ps.priors.build("horseshoe")
    assert isinstance(prior, NodeHorseshoe)
    assert float(prior.global_scale) == pytest.approx(1e-5) and float(prior.slab_df) == 4.0
    with pytest.raises(ValueError, match="needs a NodeHorseshoe prior"):
        node_horseshoe_weight("w", (3, 2), ps.priors.Gaussian(1.0))
    with pytest.raises(ValueError, match="shape must be"):
        node_horseshoe_weight("w", (), prior)


def test_closed_form_scale_densities_equal_pyros_distributions():
    prior = NodeHorseshoe(node_scale=0.7, global_scale=0.01, slab_scale=2.0, slab_df=3.0)
    log_values = torch.randn(5, dtype=torch.float64) * 3
    distributions = prior.double().scale_distributions(5)
    for role in ("unit_scale", "layer_scale", "slab"):
        expected = distributions[role].log_prob(log_values.exp()) if role == "unit_scale" else \
            distributions[role].log_prob(log_values.exp()).sum()
        assert torch.allclose(prior.log_prob_scales(role, log_values), expected, rtol=1e-10), role


def test_the_network_computes_with_the_regularized_scale_times_the_standardized_weight():
    model = tiny_model()
    x = torch.randn(5, 4)
    trace = poutine.trace(model).get_trace(x, torch.zeros(5, dtype=torch.long))
    shapes = {name: tuple(site["value"].shape) for name, site in trace.nodes.items()
              if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)}
    assert shapes == {"1.weight": (6, 4), "1.weight.unit_scale": (6,), "1.weight.layer_scale": (),
                      "1.weight.slab": (), "3.weight": (3, 6), "3.weight.unit_scale": (3,),
                      "3.weight.layer_scale": (), "3.weight.slab": ()}
    weights = {}
    for name in model.sites:
        value = {role: trace.nodes[f"{name}.{role}"]["value"] for role in ("unit_scale", "layer_scale", "slab")}
        tau = torch.sqrt(value["slab"] * value["unit_scale"] ** 2 * value["layer_scale"] ** 2
                         / (value["slab"] + value["unit_scale"] ** 2 * value["layer_scale"] ** 2))
        weights[name] = trace.nodes[name]["value"] * tau[:, None]
    assert torch.allclose(trace.nodes["output"]["value"], model.apply(x, weights), atol=1e-6)


def test_regularized_scale_is_capped_by_the_slab_and_never_overflows():
    log_unit = torch.tensor([-200.0, -10.0, 0.0, 200.0])
    tau = regularized_scale(log_unit, torch.tensor(0.0), torch.tensor(math.log(4.0)))
    assert torch.isfinite(tau).all() and tau[0] == 0
    assert tau[1:].tolist() == pytest.approx([math.exp(-10), math.sqrt(4 / 5), 2.0], rel=1e-5)


# ------------------------------------------------------------------------------------------------
# The guide and the objective
# ------------------------------------------------------------------------------------------------
def test_the_guide_starts_at_the_networks_initialisation_with_log_normal_scales():
    model = tiny_model()
    guide = ps.MeanField(model)
    assert set(guide.constrained_info) == {f"{site}.{role}" for site in model.sites
                                          for role in ("unit_scale", "layer_scale", "slab")}
    for name, weight in guide.mean_weights().items():  # w = μ_β τ̃ at q's median = the network's own weights
        assert torch.allclose(weight, model.initial_value(name), atol=1e-6)
    scales = hs.unit_scales(guide)
    assert {name: tuple(s.shape) for name, s in scales.items()} == {"1.weight": (6,), "3.weight": (3,)}
    spread = model.initial_value("1.weight").std()
    assert torch.allclose(scales["1.weight"], torch.full((6,), float(spread)), rtol=0.2)
    draws = torch.stack([guide.sample_weights()["1.weight"] for _ in range(2000)]).detach()
    assert torch.allclose(draws.mean(0), model.initial_value("1.weight"), atol=0.01)
    trace = poutine.trace(guide).get_trace(torch.randn(2, 4))
    assert trace.nodes["1.weight.unit_scale_unconstrained"]["fn"].base_dist.__class__.__name__ == "Normal"
    assert (trace.nodes["1.weight.unit_scale"]["value"] > 0).all()


def perturbed_guide(model, cls=ps.MeanField):
    """A guide away from its initialisation (as after some training): μ, ρ of β and of the log-scales spread."""
    guide = cls(model, init_scale=0.3)
    with torch.no_grad():
        for storage in (*guide.sites.values(), *guide.constrained_sites.values()):
            storage.loc.add_(torch.randn_like(storage.loc) * 0.5)
            storage.rho.add_(torch.randn_like(storage.rho) * 0.5)
    return guide


def tiny_conv_model():
    """(B, 1, 5, 5) -> Conv2d(1, 3, 3) -> ReLU -> Flatten -> Linear(27, 3): the conv samples weights, τ̃ per channel."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(27, 3))
    return ps.BayesianNetwork(net, prior=NodeHorseshoe(), dataset_size=40)


@pytest.mark.parametrize("kl, network", [("bound", "mlp"), ("mc", "mlp"), ("bound", "pruned conv")])
def test_fused_objective_is_pyros_trace_elbo_in_expectation(kl, network):
    torch.manual_seed(3)
    model = tiny_model() if network == "mlp" else tiny_conv_model()
    guide = perturbed_guide(model, ps.SNRPruned)
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    if network == "pruned conv":  # one of three channels removed: its filter, bias and the Linear's 9 inputs from it
        guide.set_unit_mask("0", torch.tensor([True, False, True]))
        assert int(guide.site("3.weight").mask.sum()) == 3 * 18
        x = torch.randn(40, 1, 5, 5)
    with torch.no_grad():
        fused = mean_and_se([negative_elbo(model, guide, x, y, kl=kl).loss.item() * 40 for _ in range(1000)])
        trace = mean_and_se([Trace_ELBO().loss(model, guide, x, y) for _ in range(200)])
    assert agree(fused, trace), (fused, trace)
    assert math.hypot(fused[1], trace[1]) < 0.8, (fused, trace)  # precise to about 3 nats of 130


def test_the_scale_sites_kl_is_the_log_normal_kl_to_their_priors():
    """draw_unit_scales' Monte Carlo KL against an independent one: torch's LogNormal q (its log density has the
    Jacobian built in) and Pyro's HalfCauchy / InverseGamma priors, 20,000 draws at once."""
    model = tiny_model()
    guide = perturbed_guide(model)
    prior = model.prior
    with torch.no_grad():
        ours = mean_and_se([float(hs.draw_unit_scales(guide, prior)[1]) for _ in range(3000)])
        reference = 0.0
        for name in model.sites:
            priors = prior.scale_distributions(model.sites[name].shape[0])
            for role in ("unit_scale", "layer_scale", "slab"):
                q = guide.constrained_site(f"{name}.{role}")
                log_normal = torch.distributions.LogNormal(q.loc, q.scale())
                draws = log_normal.sample((20000,))
                log_q = log_normal.log_prob(draws).reshape(20000, -1).sum(1)
                reference = reference + log_q - priors[role].log_prob(draws).reshape(20000, -1).sum(1)
        reference = mean_and_se(reference.tolist())
    assert agree(ours, reference), (ours, reference)
    assert math.hypot(ours[1], reference[1]) < 0.1  # a missing log-Jacobian (Σ log-scales) is ~1 nat here


def test_fit_trains_every_scale_site():
    model = tiny_model()
    guide = ps.MeanField(model)
    before = {name: site.loc.detach().clone() for name, site in guide.constrained_sites.items()}
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    history = ps.fit(model, guide, (x, y), epochs=3, batch_size=20, lr=0.01, progress=False, seed=0)
    assert history.column("objective") == ["fused"] * 3
    for name, site in guide.constrained_sites.items():
        assert not torch.equal(site.loc, before[name]), name


# ------------------------------------------------------------------------------------------------
# Unit scales find the units a network uses
# ------------------------------------------------------------------------------------------------
def teacher_data(n: int = 400, d: int = 5, hidden: int = 20, active: int = 3):
    """y = a 2-layer ReLU network with ``active`` of its ``hidden`` units switched on, plus noise 0.05."""
    teacher = ps.nets.mlp(d, (hidden,), 1)
    with torch.no_grad():
        teacher[1].weight.zero_()
        teacher[1].bias.zero_()
        teacher[1].weight[:active] = torch.randn(active, d)
        teacher[3].weight.zero_()
        teacher[3].weight[0, :active] = torch.tensor([1.0, -1.0, 0.8])
        x = torch.randn(n, d)
        return x, teacher(x).squeeze(-1) + 0.05 * torch.randn(n)


def test_posterior_scales_separate_the_units_the_network_uses_from_the_others():
    x, y = teacher_data()
    model = ps.BayesianNetwork(ps.nets.mlp(5, (20,), 1), prior=NodeHorseshoe(),
                               likelihood=ps.likelihoods.Gaussian(0.05), dataset_size=len(x))
    guide = ps.MeanField(model, init_scale=0.5)
    ps.fit(model, guide, (x, y), epochs=400, batch_size=len(x), lr=0.1, scale_lr=0.3, progress=False, seed=0)
    weights = {name: w.detach() for name, w in guide.mean_weights().items()}
    assert (model.apply(x, weights).squeeze(-1) - y).pow(2).mean().sqrt() < 0.2  # y has standard deviation ~1
    # how much unit k contributes to the output: |outgoing weight| × ‖incoming weights‖
    use = weights["3.weight"][0].abs() * weights["1.weight"].norm(dim=1)
    scale = hs.unit_scales(guide)["1.weight"]
    by_use = use.argsort(descending=True)
    most_used, least_used = scale[by_use[:3]], scale[by_use[10:]]
    assert most_used.min() > least_used.max(), (scale[by_use], use[by_use])
    assert most_used.median() > 3 * least_used.median()


def test_digits_mlp_keeps_its_accuracy_and_loses_half_its_hidden_units_by_scale(digits):
    model = ps.BayesianNetwork(ps.nets.mlp(64, (100,), 10), prior=ps.priors.build("horseshoe"),
                               dataset_size=len(digits.train))
    guide = ps.SNRPruned(model)
    ps.fit(model, guide, digits.train, epochs=30, progress=False, seed=0)
    assert ps.evaluate(model, guide, digits.test, num_samples=16)["accuracy"] >= 0.9
    scales = hs.unit_scales(guide)["1.weight"]
    removed = hs.prune_units(guide, sparsity=0.5)["1"]
    assert int(removed.sum()) == 50 and guide.unit_counts() == (100, 50)
    assert scales[removed].max() <= scales[~removed].min()  # the 50 smallest posterior scales went
    assert ps.evaluate(model, guide, digits.test, num_samples=16)["accuracy"] >= 0.9
    history = ps.fit(model, guide, digits.train, epochs=1, progress=False, seed=1)  # the 50 units' network
    assert math.isfinite(history[-1]["loss"]) and guide.unit_counts() == (100, 50)
    small = ps.sparse.export(model, guide)
    x = digits.test.tensors[0][:64]
    assert small[1].out_features == 50 and small[3].in_features == 50
    with torch.no_grad():
        assert torch.allclose(small(x), model.apply(x, guide.mean_weights()), atol=1e-4)


def test_prune_units_by_threshold_keeps_the_output_layer_and_refuses_bad_arguments():
    model = tiny_model()
    guide = ps.MeanField(model)
    with torch.no_grad():  # unit scales 1, 0.5, 0.3, 0.2, 1, 1 (λ; υ, c² unchanged)
        guide.constrained_site("1.weight.unit_scale").loc.copy_(torch.tensor([1.0, 0.5, 0.3, 0.2, 1, 1]).log())
    removed = hs.prune_units(guide, threshold=0.4)
    assert list(removed) == ["1"]  # the output layer's units are no unit group
    assert removed["1"].tolist() == [False, False, True, True, False, False]
    assert guide.unit_keep_mask("1").tolist() == [True, True, False, False, True, True]
    assert not guide.site("3.weight").mask[:, 2:4].any() and guide.site("3.weight").mask[:, [0, 1, 4, 5]].all()
    assert hs.unit_scales(guide)["1.weight"][2:4].eq(0).all()  # removed units score 0 ...
    assert not hs.prune_units(guide, threshold=0.4)["1"].any()  # ... and are not removed twice
    for kwargs, message in [({}, "exactly one"), ({"threshold": 0.5, "sparsity": 0.5}, "exactly one"),
                            ({"threshold": 0.0}, "threshold must lie in"), ({"sparsity": 1.0}, "sparsity must lie"),
                            ({"sparsity": 0.5, "scope": "net"}, "scope must be one of")]:
        with pytest.raises(ValueError, match=message):
            hs.prune_units(guide, **kwargs)
    with pytest.raises(ValueError, match="needs a model under the node-wise horseshoe"):
        hs.prune_units(ps.MeanField(tiny_model(ps.priors.Gaussian(1.0))), sparsity=0.5)


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
def test_guide_state_round_trips_and_fit_resumes_exactly(tmp_path):
    x, y = torch.randn(60, 4), torch.randint(0, 3, (60,))
    net = ps.nets.mlp(4, (6,), 3)  # both models start from this network (each takes a copy)
    model = ps.BayesianNetwork(net, prior=NodeHorseshoe(), dataset_size=60)
    straight = ps.MeanField(model, name="straight")
    ps.fit(model, straight, (x, y), epochs=3, batch_size=20, progress=False, seed=5)
    resumed_model = ps.BayesianNetwork(net, prior=NodeHorseshoe(), dataset_size=60)
    resumed = ps.MeanField(resumed_model, name="resumed")
    path = tmp_path / "checkpoint.pt"
    ps.fit(resumed_model, resumed, (x, y), epochs=2, batch_size=20, progress=False, seed=5, checkpoint=path)
    ps.fit(resumed_model, resumed, (x, y), epochs=3, batch_size=20, progress=False, seed=5, checkpoint=path,
           resume=True)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert any("unit_scale" in key for key in straight.state_dict())
    fresh = ps.MeanField(model, name="fresh")
    fresh.load_state_dict(torch.load(_saved(tmp_path, straight), weights_only=True))
    for name, weight in straight.mean_weights().items():
        assert torch.equal(fresh.mean_weights()[name], weight)
    assert all(torch.equal(hs.unit_scales(fresh)[n], s) for n, s in hs.unit_scales(straight).items())


def _saved(folder, guide):
    path = folder / "guide.pt"
    torch.save(guide.state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------------
# A hand-written Pyro model
# ------------------------------------------------------------------------------------------------
def hand_written(prior: NodeHorseshoe):
    def model(x, y=None):
        w1 = node_horseshoe_weight("fc1.weight", (10, 3), prior)
        w2 = node_horseshoe_weight("fc2.weight", (1, 10), prior)
        mean = (torch.relu(x @ w1.T) @ w2.T).squeeze(-1)
        with pyro.plate("data", len(x)):
            return pyro.sample("obs", pyro.distributions.Normal(mean, 0.1), obs=y)

    return model


def test_a_hand_written_pyro_model_trains_with_fit_and_svi_and_prunes_units():
    x = torch.randn(200, 3)
    y = torch.relu(x @ torch.tensor([1.0, -1.0, 0.5])) - torch.relu(x[:, 0]) + 0.1 * torch.randn(200)
    model = hand_written(NodeHorseshoe())
    guide = ps.MeanField(model)
    guide.setup(x, y)  # the scales start at their hints (υ = 1/√fan_in), not at the prior's median υ = 1e-5
    assert guide.median()["fc1.weight.layer_scale"] == pytest.approx(1 / math.sqrt(3))
    assert guide.median()["fc2.weight.layer_scale"] == pytest.approx(1 / math.sqrt(10))
    history = ps.fit(model, guide, (x, y), epochs=80, batch_size=100, lr=0.03, progress=False, seed=0)
    assert history.column("objective")[-1] == "traced"
    assert set(guide.constrained_info) == {f"{site}.{role}" for site in ("fc1.weight", "fc2.weight")
                                          for role in ("unit_scale", "layer_scale", "slab")}
    predictive = pyro.infer.Predictive(model, guide=guide, num_samples=64, return_sites=["obs"])
    with torch.no_grad():
        mean = predictive(x)["obs"].mean(0)
    assert (mean - y).pow(2).mean().sqrt() < 0.3
    assert ps.evaluate(model, guide, (x, y), num_samples=16)["rmse"] < 0.3
    removed = hs.prune_units(guide, sparsity=0.5)  # the output layer, sampled last, is left alone
    assert list(removed) == ["fc1.weight"] and int(removed["fc1.weight"].sum()) == 5
    assert guide.site("fc1.weight").mask.any(1).sum() == 5  # the removed units' incoming weights went
    svi = SVI(guide.masked_model(), guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    assert math.isfinite(svi.step(x, y))


def test_pyros_svi_with_trace_mean_field_elbo_and_predictive_take_the_model_and_guide(recwarn):
    model = tiny_model()
    guide = ps.MeanField(model)
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.TraceMeanField_ELBO())
    assert all(math.isfinite(svi.step(x, y)) for _ in range(3))
    assert not [w for w in recwarn if "mean field" in str(w.message)]  # the guide samples in the model's order
    draws = pyro.infer.Predictive(model, guide=guide, num_samples=4)(x)
    assert draws["1.weight.unit_scale"].shape == (4, 1, 6) and (draws["1.weight.unit_scale"] > 0).all()
    assert draws["output"].shape == (4, 40, 3)


def test_sparse_subspace_grows_its_support_by_the_gradient_with_respect_to_the_standardized_weights():
    model = tiny_model()
    guide = ps.SparseSubspace(model, density=0.5)
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    grads = guide.dense_gradients(x, y)
    # independently: −mean log p(y | x, w) at w = μ_β τ̃ (τ̃ at q's median), differentiated by μ_β
    scales = hs.unit_scales(guide)
    means = {name: guide.moments()[name][0].detach().requires_grad_() for name in model.sites}
    model.eval()
    output = model.apply(x, {name: means[name] * scales[name][:, None] for name in model.sites})
    expected = torch.autograd.grad(-model.likelihood.log_prob(output, y).mean(), list(means.values()))
    for name, grad in zip(model.sites, expected, strict=True):
        assert torch.allclose(grads[name], grad, atol=1e-6), name
    history = ps.fit(model, guide, (x, y), epochs=2, batch_size=20, progress=False, seed=0)
    assert math.isfinite(history[-1]["loss"]) and guide.sparsity == pytest.approx(0.5, abs=0.05)


def test_the_samplers_refuse_a_bayesian_network_under_the_horseshoe_in_one_line():
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    with pytest.raises(ValueError, match="has latent scale sites of its own: train it by VI"):
        ps.sample_sghmc(tiny_model(), (x, y), samples=2)
