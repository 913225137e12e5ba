"""The guides on the user's own Pyro models: plain functions and PyroModules, under Pyro's SVI and ps.fit."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.nn import PyroModule, PyroSample
from torch import nn

import pyro_sparse as ps
from pyro_sparse.infer.pyro_elbo import traced_negative_elbo
from pyro_sparse.infer.sghmc import sghmc
from pyro_sparse.pyro_model import PyroPotential

GUIDES = {
    "MeanField": lambda model: ps.MeanField(model, init_scale=0.05),
    "SNRPruned": lambda model: ps.SNRPruned(model, init_scale=0.05),
    "SparseSubspace": lambda model: ps.SparseSubspace(model, density=0.5, update_every=10, init_scale=0.05),
}


@pytest.fixture(autouse=True)
def _fresh_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


# ----------------------------------------------------------------------------------------------
# A small classification task and one network written three ways
# ----------------------------------------------------------------------------------------------
def blobs(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four Gaussian classes in 8 dimensions: (x_train (n, 8), y_train (n,), x_test, y_test)."""
    generator = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(4, 8, generator=generator)
    labels = torch.randint(0, 4, (2 * n,), generator=generator)
    points = centers[labels] + torch.randn(2 * n, 8, generator=generator)
    return points[:n], labels[:n], points[n:], labels[n:]


def plain_model(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """An 8-16-4 ReLU network as a Pyro function: two weight sites, biases as pyro.param."""
    w1 = pyro.sample("w1", dist.Normal(0.0, 1.0).expand([16, 8]).to_event(2))
    w2 = pyro.sample("w2", dist.Normal(0.0, 1.0).expand([4, 16]).to_event(2))
    b1 = pyro.param("b1", torch.zeros(16))
    logits = torch.relu(x @ w1.transpose(-1, -2) + b1) @ w2.transpose(-1, -2)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
    return logits


class PyroNet(PyroModule):
    """The same network in Pyro's BNN idiom: PyroModule[nn.Linear] with PyroSample weights."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = PyroModule[nn.Linear](8, 16)
        self.fc1.weight = PyroSample(dist.Normal(0.0, 1.0).expand([16, 8]).to_event(2))
        self.fc2 = PyroModule[nn.Linear](16, 4, bias=False)
        self.fc2.weight = PyroSample(dist.Normal(0.0, 1.0).expand([4, 16]).to_event(2))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.fc2(torch.relu(self.fc1(x)))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


def make_model(kind: str, n: int):
    if kind == "function":
        return plain_model
    if kind == "PyroModule":
        return PyroNet()
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4, bias=False))
    return ps.BayesianNetwork(net, dataset_size=n)


def predictive_accuracy(model, guide, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of the posterior predictive through Pyro's Predictive (the model's return value: logits)."""
    site = "output" if isinstance(model, ps.BayesianNetwork) else "_RETURN"  # a BayesianNetwork's logits site
    logits = Predictive(model, guide=guide, num_samples=32, return_sites=[site])(x)[site]
    return float((logits.softmax(-1).mean(0).argmax(-1) == y).float().mean())


def train(kind: str, guide_name: str, how: str, seed: int = 0) -> float:
    x, y, x_test, y_test = blobs()
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    model = make_model(kind, len(x))
    guide = GUIDES[guide_name](model)
    steps = 150
    if how == "fit":
        ps.fit(model, guide, (x, y), epochs=steps * 50 // len(x), batch_size=50, lr=2e-2, seed=seed, progress=False)
    else:
        elbo = Trace_ELBO() if how == "Trace_ELBO" else TraceMeanField_ELBO()
        optimizer = pyro.optim.Adam({"lr": 2e-2})
        svi = SVI(model, guide, optimizer, elbo)
        for step in range(1, steps + 1):
            index = torch.randint(0, len(x), (50,))
            svi.step(x[index], y[index]) if kind != "function" else svi.step(x, y)
            if isinstance(guide, ps.SparseSubspace):
                guide.step_support(step, steps, x[index], y[index], optimizer=optimizer)
    if isinstance(model, ps.BayesianNetwork):
        model.eval()
    return predictive_accuracy(model, guide, x_test, y_test)


@pytest.mark.parametrize("how", ["Trace_ELBO", "TraceMeanField_ELBO", "fit"])
@pytest.mark.parametrize("guide_name", list(GUIDES))
def test_every_guide_trains_every_kind_of_model_to_its_bayesian_network_twins_accuracy(guide_name, how):
    accuracies = {kind: train(kind, guide_name, how) for kind in ("BayesianNetwork", "function", "PyroModule")}
    twin = accuracies["BayesianNetwork"]
    assert twin > 0.85, accuracies
    for kind in ("function", "PyroModule"):
        assert accuracies[kind] >= twin - 0.05, accuracies


# ----------------------------------------------------------------------------------------------
# Sparse linear regression written as a plain Pyro model
# ----------------------------------------------------------------------------------------------
def sparse_regression(n: int = 200, p: int = 100, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=generator)
    beta = torch.zeros(p)
    relevant = min(p, 10)
    beta[:relevant] = (torch.linspace(1.0, 2.0, 10) * torch.tensor([1.0, -1.0] * 5))[:relevant]
    y = x @ beta + 0.5 * torch.randn(n, generator=generator)
    return x, y, beta


def regression_model(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    noise = pyro.sample("noise", dist.HalfNormal(2.0))  # a constrained (positive) site
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(x @ w, noise), obs=y)


KNOWN_NOISE = 0.5


def known_noise_model(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Bayesian linear regression with a N(0, 1) prior and the noise known: a conjugate model."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(x @ w, KNOWN_NOISE), obs=y)


def conjugate_posterior(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact posterior of ``known_noise_model``'s w, N(m, S): (m, S⁻¹), computed in closed form."""
    precision = torch.eye(x.shape[-1]) + x.T @ x / KNOWN_NOISE**2
    return torch.linalg.solve(precision, x.T @ y / KNOWN_NOISE**2), precision


def test_snr_pruning_of_a_plain_pyro_regression_keeps_exactly_the_true_inputs():
    x, y, beta = sparse_regression()
    guide = ps.SNRPruned(regression_model)
    svi = SVI(regression_model, guide, pyro.optim.Adam({"lr": 0.03}), Trace_ELBO())
    for _ in range(600):
        svi.step(x, y)
    assert list(guide.site_info) == ["w"] and list(guide.constrained_info) == ["noise"]
    guide.prune(sparsity=0.9)
    kept = guide.masks()["w"]
    assert torch.equal(kept, beta != 0)
    # the pruned weights are exact zeros in every draw; the noise scale is positive and near the truth
    draws = Predictive(regression_model, guide=guide, num_samples=50, return_sites=["w", "noise"])(x)
    assert bool((draws["w"][..., ~kept] == 0).all())
    assert bool((draws["noise"] > 0).all()) and 0.3 < float(guide.median()["noise"]) < 1.0


def test_fit_on_a_plain_model_matches_the_mean_field_optimum_of_a_conjugate_regression():
    """Known noise: the posterior of w is N(m, S) with S⁻¹ = I + XᵀX / s², m = S Xᵀy / s²; the mean-field
    optimum has means m and variances 1 / diag(S⁻¹) (an independent, closed-form computation). ``fit``
    with minibatches must scale the batch likelihood by N / B to reach it."""
    x, y, _ = sparse_regression(n=120, p=5, seed=1)
    model = known_noise_model
    mean, precision = conjugate_posterior(x, y)
    mean_field_std = precision.diagonal().rsqrt()
    guide = ps.MeanField(model, init_scale=0.05)
    ps.fit(model, guide, (x, y), epochs=400, batch_size=40, lr=1e-2, seed=0, progress=False)
    site = guide.site("w")
    assert torch.allclose(site.loc.detach(), mean, atol=0.05)  # Adam's jitter at a constant lr: ~1 posterior std
    assert torch.allclose(site.scale().detach(), mean_field_std, rtol=0.15)


def test_fit_and_pyro_trace_elbo_agree_in_expectation_on_a_pruned_plain_model():
    x, y, beta = sparse_regression(n=100, p=20)
    guide = ps.SNRPruned(regression_model, init_scale=0.1)
    ps.fit(regression_model, guide, (x, y), epochs=100, batch_size=100, lr=2e-2, seed=0, progress=False)
    guide.prune(sparsity=0.5)
    torch.manual_seed(0)
    with torch.no_grad():
        ours = torch.stack([traced_negative_elbo(regression_model, guide, x, y, dataset_size=len(x), kl="mc").loss
                            for _ in range(400)]).mean() * len(x)
        masked = guide.masked_model()
        pyros = torch.tensor([Trace_ELBO().loss(masked, guide, x, y) for _ in range(400)]).mean()
        unmasked = torch.tensor([Trace_ELBO().loss(regression_model, guide, x, y) for _ in range(400)]).mean()
    assert abs(float(ours - pyros)) < 0.02 * abs(float(pyros)) + 1.0
    # left in, the pruned weights' log p(0) would shift Pyro's ELBO by a constant: ½ log 2π per weight
    assert abs(float(pyros - unmasked) + 10 * 0.9189) < 1.0


def test_sparse_subspace_moves_its_support_on_schedule_inside_a_pyro_svi_loop():
    x, y, _, _ = blobs()
    guide = ps.SparseSubspace(PyroNet(), density=0.25, update_every=10, stop_fraction=0.5, init_scale=0.05)
    model = guide.traced_model
    optimizer = pyro.optim.Adam({"lr": 1e-2})
    svi = SVI(model, guide, optimizer, TraceMeanField_ELBO())
    total, supports = 60, []
    for step in range(1, total + 1):
        svi.step(x, y)
        guide.step_support(step, total, x, y, optimizer=optimizer)
        supports.append({name: site.index.clone() for name, site in guide.compact_sites().items()})
    assert [entry["step"] for entry in guide.update_log] == [10, 20]
    for step, support in enumerate(supports, start=1):
        for name, index in support.items():
            assert index.numel() == round(0.25 * guide.site(name).shape.numel())
            changed = step > 1 and not torch.equal(index, supports[step - 2][name])
            assert changed == (step in (10, 20)), (step, name)


def test_fit_resumes_a_plain_model_exactly(tmp_path):
    x, y, _, _ = blobs(200)
    checkpoint = tmp_path / "checkpoint.pt"

    def run(epochs: int, resume: bool) -> ps.MeanField:
        pyro.clear_param_store()
        torch.manual_seed(0)
        guide = ps.MeanField(plain_model)
        ps.fit(plain_model, guide, (x, y), epochs=epochs, batch_size=50, seed=3, checkpoint=checkpoint,
               resume=resume, progress=False)
        return guide

    straight = run(4, False)
    straight_state = {k: v.clone() for k, v in straight.state_dict().items()}
    straight_bias = pyro.param("b1").detach().clone()
    checkpoint.unlink()
    run(2, False)
    resumed = run(4, True)
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, straight_state[key]), key
    assert torch.equal(pyro.param("b1").detach(), straight_bias)


def test_models_the_guides_cannot_take_are_refused_with_the_way_out():
    with pytest.raises(ValueError, match="wrap a network as ps.BayesianNetwork"):
        ps.MeanField(nn.Linear(3, 2))

    def local_latents(x, y=None):
        with pyro.plate("data", 1000, subsample_size=len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=y)

    guide = ps.MeanField(local_latents)
    with pytest.raises(ValueError, match="subsampled plate 'data'.*poutine.block"):
        guide.setup(torch.zeros(10), torch.zeros(10))
    with pytest.raises(RuntimeError, match="guide.setup"):
        ps.MeanField(regression_model).masks()
    with pytest.raises(TypeError, match="ps.PyroPosterior"):
        ps.Posterior.from_guide(regression_model, ps.MeanField(regression_model))
    hidden = poutine.block(regression_model, hide=["noise"])
    blocked = ps.MeanField(hidden)
    blocked.setup(torch.zeros(4, 3), torch.zeros(4))
    assert list(blocked.site_info) == ["w"] and not blocked.constrained_info


def test_sghmc_samples_a_plain_pyro_models_exact_conjugate_posterior():
    """SGHMC on ``PyroPotential`` of a plain model (known noise): the draws match the conjugate posterior
    N(m, S), S⁻¹ = I + XᵀX / s², computed in closed form. The full batch, so that no minibatch noise
    inflates the variance; the N / B scaling is checked on its own against the full-batch log joint."""
    x, y, _ = sparse_regression(n=200, p=3, seed=2)
    model = known_noise_model
    mean, precision = conjugate_posterior(x, y)
    var = torch.linalg.inv(precision).diagonal()
    potential = PyroPotential(model, (x[:50], y[:50]), dataset_size=len(x))
    w = {"w": torch.tensor([0.3, -0.2, 0.1])}
    halves = [potential.log_joint(w, (x[i::2], y[i::2])) for i in range(2)]  # each scaled by N / B = 2
    prior = dist.Normal(0.0, 1.0).log_prob(w["w"]).sum()
    assert torch.allclose((halves[0] + halves[1]) / 2, potential.log_joint(w, (x, y)))
    assert torch.allclose(potential.log_joint(w, (x, y)) - prior,
                          dist.Normal(x @ w["w"], KNOWN_NOISE).log_prob(y).sum())
    sampler = sghmc(potential.log_joint, step_size=0.02, friction=0.1, dataset_size=len(x), preconditioner=False)
    state = sampler.init(potential.initial, seed=0)
    draws = []
    for k in range(6000):
        state = sampler.step(state, (x, y))
        if k >= 1000 and k % 2 == 0:
            draws.append(state.params["w"].clone())
    draws = torch.stack(draws)
    assert ((draws.mean(0) - mean).abs() / var.sqrt()).max() < 0.15
    ratio = draws.var(0) / var
    assert ratio.min() > 0.75 and ratio.max() < 1.3, ratio


def test_sghmc_on_a_pyro_model_samples_a_positive_scale_in_the_unconstrained_space():
    x, y, _ = sparse_regression(n=200, p=3, seed=3)

    model = regression_model  # 3 inputs here, a positive noise site

    potential = PyroPotential(model, (x, y), dataset_size=len(x))
    sampler = sghmc(potential.log_joint, step_size=1e-2, dataset_size=len(x), burn_in=300)
    state = sampler.init(potential.initial, seed=0)
    noises = []
    for k in range(2000):
        state = sampler.step(state, (x, y))
        if k >= 1000:
            noises.append(potential.constrain(state.params)["noise"].item())
    noises = torch.tensor(noises)
    assert bool((noises > 0).all()) and abs(float(noises.mean()) - 0.5) < 0.1


def test_sghmc_chains_of_a_plain_model_go_to_arviz_with_pointwise_log_likelihoods():
    import arviz as az  # the test extras install it

    from pyro_sparse.inference_data import from_pyro_draws

    x, y, _ = sparse_regression(n=60, p=3, seed=4)

    model = regression_model  # 3 inputs here, a positive noise site

    potential = PyroPotential(model, (x, y), dataset_size=len(x))
    sampler = sghmc(potential.log_joint, step_size=1e-2, dataset_size=len(x), burn_in=200)
    chains = []
    for chain in range(2):
        state, kept = sampler.init(potential.initial, seed=chain), []
        for k in range(2000):
            state = sampler.step(state, (x, y))
            if k >= 1000 and k % 25 == 0:
                kept.append(potential.constrain(state.params))
        chains.append({name: torch.stack([draw[name] for draw in kept]) for name in kept[0]})
    draws = {name: torch.stack([chain[name] for chain in chains]) for name in chains[0]}
    idata = from_pyro_draws(model, draws, x, y)
    assert idata.log_likelihood["obs"].shape == (2, 40, 60)
    # the pointwise values are the model's own: log N(y_i | x_i w, noise) of one draw, computed by hand
    w, noise = draws["w"][1, 3], draws["noise"][1, 3]
    by_hand = dist.Normal(x @ w, noise).log_prob(y).double().numpy()
    assert torch.allclose(torch.as_tensor(idata.log_likelihood["obs"].values[1, 3]), torch.as_tensor(by_hand))
    summary = az.summary(idata, var_names=["w", "noise"], kind="diagnostics")
    assert float(summary["r_hat"].max()) < 1.2
    assert az.loo(idata).elpd_loo < 0


def test_regrown_weights_restart_adam_in_the_units_of_fits_loss():
    """Under ``fit`` (loss −ELBO / N), the growth gradient that seeds Adam's moments of a regrown weight must be
    in the same units: seeded with a batch sum, their second moment was ~B² too large and they barely moved."""
    x, y, _, _ = blobs()
    guide = ps.SparseSubspace(PyroNet(), density=0.25, update_every=12, init_scale=0.05)
    ratios = []

    class Watch:
        previous = None

        def on_step_end(self, state):
            site = state.guide.site("fc1.weight")
            if self.previous is not None and not torch.equal(site.index, self.previous):
                moved = site.index != self.previous
                second = state.optimizer.state[site.loc]["exp_avg_sq"]
                ratios.append(float(second[moved].mean() / second[~moved].mean()))
            self.previous = site.index.clone()

    ps.fit(guide.traced_model, guide, (x, y), epochs=3, batch_size=50, lr=1e-2, seed=0, callbacks=[Watch()],
           progress=False)
    assert ratios and all(0.01 < ratio < 100 for ratio in ratios), ratios
