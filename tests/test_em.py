"""EM-SGHMC: variable selection on a sparse linear regression, sparse draws on digits, exact resume,
the CLI, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import pyro_sparse as ps
from pyro_sparse import checkpoint, cli
from pyro_sparse.errors import CheckpointError
from pyro_sparse.infer.em import restore_result

P, TRUE_COEFS = 100, [1.5, -2.0, 1.0, -1.0, 2.0, 1.2, -1.5, 0.8, -0.8, 1.0]


@pytest.fixture(scope="module")
def sparse_regression():
    """y = x·w + 0.5 ε with 10 non-zero coefficients among 100 inputs, 400 examples."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, P, generator=gen)
    true = torch.randperm(P, generator=gen)[: len(TRUE_COEFS)]
    w = torch.zeros(P)
    w[true] = torch.tensor(TRUE_COEFS)
    y = x @ w + 0.5 * torch.randn(400, generator=gen)
    return x, y, set(true.tolist())


def _linear_model(n: int) -> ps.BayesianNetwork:
    return ps.BayesianNetwork(nn.Linear(P, 1), prior=ps.priors.SpikeAndSlab(1.0, 0.01, 0.5),
                              likelihood=ps.likelihoods.Gaussian(0.5), dataset_size=n)


def test_inclusion_probabilities_select_exactly_the_true_inputs(sparse_regression):
    x, y, true = sparse_regression
    model = _linear_model(len(x))
    # the test's own σ₀ (spike_scale=None); the E/M-steps stop after burn-in, so give them 60 of the 80 epochs
    result = ps.em_sghmc(model, (x, y), target_sparsity=0.0, chains=2, samples=20, epochs=80, batch_size=50,
                         burn_in=60, step_size=3e-3, em_every=1, seed=0, spike_scale=None)
    rho = result.inclusion_probability["weight"].reshape(-1)
    assert set((rho > 0.5).nonzero().reshape(-1).tolist()) == true
    assert result.traces["inclusion"].shape[0] == 2
    assert abs(result.traces["inclusion"][:, -1].mean() - 0.1) < 0.05  # the M-step finds π ≈ 10 / 100
    assert abs(float(model.prior.inclusion) - 0.1) < 0.05  # and leaves the chains' mean in the prior
    assert result.history[-1]["sparsity"] == 0.0


def test_pruning_keeps_the_true_inputs_and_exact_zeros(sparse_regression):
    x, y, true = sparse_regression
    result = ps.em_sghmc(_linear_model(len(x)), (x, y), target_sparsity=0.9, chains=2, samples=10, epochs=40,
                         batch_size=50, step_size=3e-3, em_every=1, seed=1, spike_scale=None)
    masks = result.masks["weight"].reshape(2, -1)
    for mask in masks:
        assert set(mask.nonzero().reshape(-1).tolist()) == true
    draws = result.posterior.samples["weight"].reshape(2, 10, -1)
    assert torch.all(draws[~masks.unsqueeze(1).expand_as(draws)] == 0)
    assert torch.all(result.traces["sparsity"][:, -1] == 0.9)
    assert result.posterior.num_chains == 2 and result.posterior.num_stored == 20


def test_digits_at_90_percent_sparsity(digits):
    model = ps.BayesianNetwork(ps.nets.mlp(64, (64,), 10), prior=ps.priors.SpikeAndSlab(1.0, 0.01, 0.5),
                               dataset_size=len(digits.train))
    result = ps.em_sghmc(model, digits.train, target_sparsity=0.9, chains=2, samples=8, epochs=16, batch_size=64,
                         step_size=3e-3, seed=0)
    metrics = result.posterior.evaluate(digits.test)
    assert metrics["accuracy"] >= 0.9, metrics
    assert abs(metrics["sparsity"] - 0.9) < 0.005
    for name, draws in result.posterior.samples.items():
        if name in model.sites:  # every draw of a chain is zero exactly where its mask is off
            mask = result.masks[name].repeat_interleave(8, dim=0)
            assert torch.all(draws[~mask] == 0) and torch.all(draws[mask] != 0)
    assert {"inclusion", "slab_scale", "sparsity", "log_joint", "step_size"} <= set(result.traces)
    assert result.posterior.hyperparameters["inclusion"].shape == (2, 8)
    assert set(result.posterior.sample_stats) == {"lp", "sparsity", "step_size"}
    assert [row["epoch"] for row in result.history] == list(range(1, 17))
    assert all(row["seconds"] > 0 for row in result.history)


class _Crash(Exception):
    pass


def test_resume_equals_an_uninterrupted_run(digits, tmp_path):
    data = digits.subsample(train=320, test=10)
    kwargs = dict(target_sparsity=0.8, chains=2, samples=4, epochs=6, batch_size=32, step_size=3e-3, seed=5)

    def model():
        torch.manual_seed(0)
        return ps.BayesianNetwork(ps.nets.mlp(64, (16,), 10), prior=ps.priors.SpikeAndSlab(1.0, 0.01, 0.5),
                                  dataset_size=320)

    whole = ps.em_sghmc(model(), data.train, **kwargs)

    def crash_after_epoch_3(row):
        if row["epoch"] == 3:
            raise _Crash

    with pytest.raises(_Crash):
        ps.em_sghmc(model(), data.train, checkpoint=tmp_path / "run.pt", callback=crash_after_epoch_3, **kwargs)
    resumed = ps.em_sghmc(model(), data.train, checkpoint=tmp_path / "run.pt", resume=True, **kwargs)
    for name, value in whole.posterior.samples.items():
        assert torch.equal(value, resumed.posterior.samples[name]), name
    for name, value in whole.traces.items():
        assert torch.equal(value, resumed.traces[name]), name
    assert [row["epoch"] for row in resumed.history] == list(range(1, 7))


def _small_model(hidden=16):
    return ps.BayesianNetwork(ps.nets.mlp(64, (hidden,), 10), prior=ps.priors.SpikeAndSlab(1.0, 0.01, 0.5),
                              dataset_size=320)


def _small_em_run(digits, path, hidden=16, **kwargs):
    data = digits.subsample(train=320, test=10)
    model = _small_model(hidden)
    options = {"target_sparsity": 0.5, "chains": 2, "samples": 4, "epochs": 4, "batch_size": 64, "step_size": 3e-3,
               "seed": 5, "checkpoint": path, **kwargs}
    return model, ps.em_sghmc(model, data.train, **options)


def test_checkpoint_tells_a_finished_run_from_an_interrupted_one_and_restores_partial_draws(digits, tmp_path):
    path = tmp_path / "run.pt"

    def stop_after(epoch):
        def callback(row):
            if row["epoch"] == epoch:
                raise _Crash
        return callback

    with pytest.raises(_Crash):  # interrupted in burn-in (epochs 1-2): no draws yet
        _small_em_run(digits, path, callback=stop_after(1))
    model, saved = _small_model(), checkpoint.load(path)
    assert saved["epoch"] == 1 and saved["epochs"] == 4
    with pytest.raises(ValueError, match=r"the run has no posterior draws yet \(epoch 1 of 4; draws start after the 2 "
                                         r"burn-in epochs\): finish it with --resume"):
        restore_result(model, saved)

    with pytest.raises(_Crash):  # interrupted half-way through sampling
        _small_em_run(digits, path, callback=stop_after(3), resume=True)
    saved = checkpoint.load(path)
    assert saved["epoch"] == 3 < saved["epochs"]
    partial = restore_result(model, saved).posterior
    assert partial.num_chains == 2 and partial.num_stored == 2 * 2  # 2 of the 4 draws per chain
    _, finished = _small_em_run(digits, path, resume=True)
    saved = checkpoint.load(path)
    assert saved["epoch"] == saved["epochs"] == 4 and finished.posterior.num_stored == 8


def test_resume_with_another_model_or_chain_count_is_a_checkpoint_error(digits, tmp_path):
    path = tmp_path / "run.pt"
    _small_em_run(digits, path, epochs=2, samples=1)
    with pytest.raises(CheckpointError, match=r"it was written for another model or guide \('1.weight' has shape "
                                              r"\(16, 64\) there, \(8, 64\) here\); resume with the same model"):
        _small_em_run(digits, path, hidden=8, epochs=3, samples=1, resume=True)
    with pytest.raises(CheckpointError, match="it holds 2 chains, this run asks for 3; resume with chains=2"):
        _small_em_run(digits, path, epochs=3, samples=1, chains=3, resume=True)
    model = ps.BayesianNetwork(ps.nets.mlp(64, (16,), 10), dataset_size=320)
    with pytest.raises(CheckpointError, match="it was written by em_sghmc, not sample_sghmc"):
        ps.sample_sghmc(model, digits.subsample(train=320, test=10).train, epochs=3, samples=1, checkpoint=path,
                        resume=True)


def test_cli_em_sghmc_run(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--method", "em-sghmc", "--net", "mlp", "--data", "digits", "--epochs", "8", "--lr", "3e-3",
            "--sparsity", "0.8", "--chains", "2", "--samples", "4", "--out", str(out)]
    assert cli.main(args) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "em-sghmc" and metrics["num_chains"] == 2 and metrics["num_draws"] == 4
    assert abs(metrics["sparsity"] - 0.8) < 0.005 and metrics["accuracy"] > 0.8
    assert metrics["r_hat_max"] >= 1.0 and metrics["ess_bulk_min"] > 0
    for name in ("posterior.nc", "trace.png", "checkpoint.pt", "history.csv", "reliability.png"):
        assert (out / name).stat().st_size > 0
    capsys.readouterr()
    assert cli.main(["evaluate", str(out)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-9)
    assert cli.main(["train", "--method", "em-sghmc", "--density", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "--density does not apply to --method em-sghmc" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_sparsity": 1.0}, "target_sparsity must be a number in"),
        ({"target_sparsity": -0.1}, "target_sparsity must be a number in"),
        ({"chains": 0}, "chains must be a positive integer"),
        ({"step_size": 0.0}, "step_size must be a number > 0"),
        ({"step_size": -1e-3}, "step_size must be a number > 0"),
        ({"samples": 1000}, "samples=1000 per chain need at least"),
        ({"burn_in": 3}, "burn_in must be an integer in"),
        ({"seed": 2**70}, r"seed must be an integer in \[0, 2\*\*32\)"),
        ({"seed": -3}, r"seed must be an integer in \[0, 2\*\*32\)"),
        ({"seed": 0.5}, r"seed must be an integer in \[0, 2\*\*32\)"),
    ],
)
def test_bad_input_is_one_clear_error(sparse_regression, kwargs, message):
    x, y, _ = sparse_regression
    with pytest.raises(ValueError, match=message):
        ps.em_sghmc(_linear_model(len(x)), (x, y), **{"epochs": 2, "samples": 2, **kwargs})


def test_a_gaussian_prior_is_refused(sparse_regression):
    x, y, _ = sparse_regression
    model = ps.BayesianNetwork(nn.Linear(P, 1), likelihood=ps.likelihoods.Gaussian(0.5), dataset_size=len(x))
    with pytest.raises(ValueError, match="em_sghmc needs a SpikeAndSlab prior"):
        ps.em_sghmc(model, (x, y), epochs=2, samples=2)
    dense = ps.sample_sghmc(model, (x, y), chains=1, samples=2, epochs=2, batch_size=100, step_size=3e-3, seed=0)
    assert dense.posterior.num_stored == 2 and dense.inclusion_probability == {}
