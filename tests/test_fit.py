"""fit(): accuracy and calibration on digits, callbacks, warm-up, exact resume, bad input."""

from __future__ import annotations

import pyro
import pytest
import torch

import pyro_sparse as ps
from pyro_sparse import checkpoint
from pyro_sparse.errors import CheckpointError


def digits_model(digits, prior=None, **kwargs):
    return ps.BayesianNetwork(ps.nets.mlp(64, (100,), 10), prior=prior, dataset_size=len(digits.train), **kwargs)


@pytest.mark.parametrize(
    "prior", [ps.priors.Gaussian(1.0), ps.priors.SpikeAndSlab(1.0, 0.01, 0.5)], ids=["gaussian", "spike-slab"]
)
def test_default_fit_is_accurate_and_calibrated_on_digits(digits, prior):
    model = digits_model(digits, prior)
    guide = ps.MeanField(model)
    history = ps.fit(model, guide, digits.train, epochs=30, seed=0)
    assert len(history) == 30 and history[-1]["loss"] < history[0]["loss"]
    assert set(history[0]) >= {"epoch", "loss", "nll", "kl", "kl_factor", "seconds"}
    results = ps.evaluate(model, guide, digits.test, num_samples=32)
    assert results["accuracy"] >= 0.95
    assert results["ece"] <= 0.05
    assert results["mean_sample_accuracy"] >= 0.9
    sigma = history.column("mean_sigma")  # σ grows from its initial 1e-3 (history.csv shows how far)
    assert sigma[0] < sigma[-1] and {"mean_sigma[1.weight]", "mean_sigma[3.weight]"} <= set(history[-1])
    assert results["sparsity"] == 0.0 and results["active_weights"] == results["total_weights"] == 7400


def test_callbacks_see_every_step_and_warmup_ramps_the_kl_weight(digits):
    model = digits_model(digits)
    guide = ps.MeanField(model)
    seen_steps, epoch_ends, betas = [], [], []

    class Recorder:
        def on_step_end(self, state):
            seen_steps.append(state.global_step)
            assert state.terms.loss.requires_grad and state.batch[0].shape[1:] == (1, 8, 8)

        def on_epoch_end(self, state):
            state.record["custom"] = state.epoch * 10

    history = ps.fit(model, guide, digits.train, epochs=3, batch_size=500, warmup_epochs=2,
                     callbacks=[Recorder(), lambda state: epoch_ends.append(state.epoch)], seed=0)
    betas = history.column("kl_factor")
    assert seen_steps == list(range(9))  # 1347 examples / 500 = 3 steps per epoch
    assert epoch_ends == [0, 1, 2]
    assert history.column("custom") == [0, 10, 20]
    assert betas[0] < betas[1] < betas[2] == 1.0


def test_resumed_run_equals_uninterrupted_run(digits, tmp_path):
    def run(epochs, path, resume):
        torch.manual_seed(0)
        model = digits_model(digits, name="resume-model")
        guide = ps.MeanField(model, name="resume-guide")
        history = ps.fit(model, guide, digits.train, epochs=epochs, batch_size=128, seed=3, checkpoint=path,
                         resume=resume)
        return model, guide, history

    model_a, guide_a, history_a = run(4, tmp_path / "a.pt", resume=False)
    run(2, tmp_path / "b.pt", resume=False)  # "interrupted" after 2 epochs
    saved = checkpoint.load(tmp_path / "b.pt")
    assert saved["epoch"] == 2
    model_b, guide_b, history_b = run(4, tmp_path / "b.pt", resume=True)
    for (name, a), b in zip(guide_a.state_dict().items(), guide_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [r["loss"] for r in history_a] == [r["loss"] for r in history_b]


def test_resume_applies_the_arguments_of_this_call_and_history_shows_from_when(digits, tmp_path):
    path = tmp_path / "run.pt"
    model = digits_model(digits)
    guide = ps.MeanField(model)
    seen = []
    kwargs = dict(batch_size=500, seed=0, checkpoint=path, callbacks=[lambda s: seen.append(s.optimizer.param_groups)])
    ps.fit(model, guide, digits.train, epochs=2, lr=5e-3, **kwargs)
    saved = checkpoint.load(path)
    assert saved["epoch"] == saved["epochs"] == 2  # a finished run
    history = ps.fit(model, guide, digits.train, epochs=4, lr=1e-3, warmup_epochs=8, resume=True, **kwargs)
    assert history.column("lr") == [5e-3, 5e-3, 1e-3, 1e-3]
    assert [group["lr"] for group in seen[-1]] == [1e-3, 1e-3]  # this call's lr (μ and ρ groups), not the saved
    assert history.column("kl_factor")[:2] == [1.0, 1.0] and history.column("kl_factor")[2] < 0.5  # warm-up too
    saved = checkpoint.load(path)
    assert saved["epoch"] == saved["epochs"] == 4 and saved["history"][-1]["lr"] == 1e-3
    history.to_csv(tmp_path / "history.csv")
    assert (tmp_path / "history.csv").read_text().splitlines()[0].split(",")[:7] == [
        "epoch", "loss", "nll", "kl", "kl_factor", "lr", "seconds"]


def test_resume_with_another_model_is_a_checkpoint_error(digits, tmp_path):
    path = tmp_path / "run.pt"
    model = digits_model(digits)
    ps.fit(model, ps.MeanField(model), digits.train, epochs=1, batch_size=500, seed=0, checkpoint=path)
    other = ps.BayesianNetwork(ps.nets.mlp(64, (32,), 10), dataset_size=len(digits.train))
    with pytest.raises(CheckpointError, match=r"refused: it was written for another model or guide \(Error\(s\) in "
                                              r"loading state_dict.*\); resume with the same model, or start a new"):
        ps.fit(other, ps.MeanField(other), digits.train, epochs=2, batch_size=500, checkpoint=path, resume=True)
    checkpoint.save({"chains": [], "epoch": 1}, tmp_path / "em.pt")
    with pytest.raises(CheckpointError, match="it was not written by fit"):
        ps.fit(other, ps.MeanField(other), digits.train, epochs=2, checkpoint=tmp_path / "em.pt", resume=True)


def test_fit_asks_the_guide_to_check_the_model(digits):
    class Picky(ps.MeanField):
        def check_model(self, model):
            raise ValueError("this guide wants another model")

    model = digits_model(digits)
    with pytest.raises(ValueError, match="this guide wants another model"):
        ps.fit(model, Picky(model), digits.train, epochs=1)


def test_checkpoints_are_written_atomically(tmp_path):
    path = tmp_path / "state.pt"
    checkpoint.save({"value": torch.arange(3)}, path)

    class Exploding:
        def __reduce__(self):
            raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError, match="crash while writing"):
        checkpoint.save({"value": Exploding()}, path)
    assert torch.equal(checkpoint.load(path)["value"], torch.arange(3))  # the last good file survives
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary left behind
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        checkpoint.load(tmp_path / "missing.pt")


def test_two_models_of_the_same_architecture_train_side_by_side(digits):
    """Separate parameters, no param-store collisions, also through pyro.infer.SVI."""
    x, y = digits.train.tensors
    pairs = [(model, ps.MeanField(model)) for model in (digits_model(digits), digits_model(digits))]
    for model, guide in pairs:
        ps.fit(model, guide, digits.train, epochs=2, seed=0)
    (model_a, guide_a), (model_b, guide_b) = pairs
    assert model_a.pyro_name != model_b.pyro_name and guide_a.pyro_name != guide_b.pyro_name
    assert not torch.equal(guide_a.site("1.weight").loc, guide_b.site("1.weight").loc)

    optim = pyro.optim.Adam({"lr": 1e-3})
    svis = [pyro.infer.SVI(m, g, optim, pyro.infer.TraceMeanField_ELBO()) for m, g in pairs]
    for svi in svis:
        svi.step(x[:64], y[:64])
    store = pyro.get_param_store()
    for model, guide in pairs:
        loc = store[f"{guide.pyro_name}$$$sites.1__weight.loc"]
        assert loc is guide.site("1.weight").loc  # the store holds each guide's own tensors
        assert store[f"{model.pyro_name}$$$net.1.bias"] is model.net.get_parameter("1.bias")


@pytest.mark.parametrize(
    "data, kwargs, match",
    [
        ("labels", {}, r"labels must lie in \[0, 10\); found 10"),
        ("nan", {}, "inputs contain NaN or inf"),
        ("inf", {}, "inputs contain NaN or inf"),
        ("shape", {}, "wrong input shape"),
        ("empty", {}, "dataset is empty"),
        ("ok", {"epochs": 0}, "epochs must be a positive integer"),
        ("ok", {"batch_size": -4}, "batch_size must be a positive integer"),
        ("ok", {"lr": 0.0}, "lr must be a number > 0"),
        ("ok", {"kl_weight": -1.0}, "kl_weight must be a number >= 0"),
        ("ok", {"resume": True}, "resume=True needs a checkpoint path"),
        ("ok", {"seed": 2**70}, r"seed must be an integer in \[0, 2\*\*32\), got 1180591620717411303424"),
        ("ok", {"seed": -1}, r"seed must be an integer in \[0, 2\*\*32\)"),
        ("ok", {"seed": 1.5}, r"seed must be an integer in \[0, 2\*\*32\)"),
        ("ok", {"seed": True}, r"seed must be an integer in \[0, 2\*\*32\)"),
    ],
)
def test_bad_input_to_fit_gives_one_clear_error(digits, data, kwargs, match):
    x, y = digits.train.tensors
    x, y = x[:100].clone(), y[:100].clone()
    if data == "labels":
        y[3] = 10
    elif data == "nan":
        x[5, 0, 2, 2] = float("nan")
    elif data == "inf":
        x[5, 0, 2, 2] = float("-inf")
    elif data == "shape":
        x = torch.rand(100, 1, 7, 7)
    elif data == "empty":
        x, y = x[:0], y[:0]
    model = digits_model(digits)
    guide = ps.MeanField(model)
    with pytest.raises(ValueError, match=match):
        ps.fit(model, guide, (x, y), **kwargs)


def test_regression_fit_learns_the_noise_and_reports_regression_metrics():
    data = ps.data.load("toy-regression")
    model = ps.BayesianNetwork(ps.nets.mlp(1, (50, 50), 1), likelihood=ps.likelihoods.Gaussian(0.5, learn_scale=True),
                               dataset_size=len(data.train))
    guide = ps.MeanField(model)
    ps.fit(model, guide, data.train, epochs=300, batch_size=32, lr=1e-2, seed=0)
    x, y = data.test.tensors
    inside = (x.abs().squeeze() > 1.5) & (x.abs().squeeze() < 4)
    results = ps.evaluate(model, guide, (x[inside], y[inside]), num_samples=64)
    assert set(results) >= {"rmse", "nll", "coverage_95", "predictive_std"}
    assert results["rmse"] < 0.25
    assert 0.8 <= results["coverage_95"] <= 1.0
    assert 0.05 < model.likelihood.scale.item() < 0.25
    spread = ps.Posterior.from_guide(model, guide).predict(x, 64).squeeze(-1).std(0)
    far = x.abs().squeeze() > 5
    assert spread[far].mean() > 3 * spread[inside].mean()  # epistemic uncertainty grows away from the data


def test_cifar_shaped_training_path_with_batchnorm_resnet():
    """CIFAR-10 itself is not available offline: run the same path on generated 3x32x32 tensors."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (96,), generator=generator)
    x[y == 3, 0] += 2.0  # something to learn
    net = ps.nets.resnet20()
    model = ps.BayesianNetwork(net, dataset_size=96)
    # 19 convolutions + 2 shortcut 1x1 convolutions + the classifier; BatchNorm stays deterministic
    assert len(model.sites) == 22 and "fc.weight" in model.sites and "stem.0.weight" in model.sites
    assert "stem.1.weight" in dict(model.net.named_parameters())
    guide = ps.MeanField(model)
    history = ps.fit(model, guide, (x, y), epochs=2, batch_size=32, seed=0)
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in history)
    results = ps.evaluate(model, guide, (x, y), num_samples=2)
    assert 0.0 <= results["accuracy"] <= 1.0 and results["total_weights"] == model.num_weights
    assert results["inference_flops"] > 40_000_000  # resnet20 ≈ 41M multiply-adds per 32x32 image


def test_fit_warns_when_the_data_size_differs_from_the_models(digits):
    model = ps.BayesianNetwork(ps.nets.mlp(64, (8,), 10), dataset_size=100)
    with pytest.warns(UserWarning, match="fit got 1347 training examples but model.dataset_size is 100"):
        ps.fit(model, ps.MeanField(model), digits.train, epochs=1)


def test_bf16_autocast_trains_as_well_as_fp32(digits):
    """precision="bf16" runs the forward pass under bfloat16 autocast (for GPUs; slower on this CPU): the same
    accuracy on digits as fp32, within seed noise."""
    accuracies = {}
    for precision in ("fp32", "bf16"):
        model = digits_model(digits)
        guide = ps.MeanField(model)
        history = ps.fit(model, guide, digits.train, epochs=15, seed=0, precision=precision)
        assert history.column("precision") == [precision] * 15
        model.eval()
        accuracies[precision] = ps.evaluate(model, guide, digits.test)["accuracy"]
    assert accuracies["bf16"] >= 0.93 and abs(accuracies["bf16"] - accuracies["fp32"]) < 0.02, accuracies
    with pytest.raises(ValueError, match="precision must be one of 'fp32', 'bf16', got 'fp16'"):
        ps.fit(model, guide, digits.train, epochs=1, precision="fp16")
