"""Every method with its DEFAULT settings on small tasks nobody tuned it for, against what a user might
pick instead of a BNN (issue 10, "Build" item 4).

Methods (pyro-sparse, library / CLI defaults only: no learning rate, init scale or step size is passed,
so the grid follows whatever defaults the library has):

    vi          ps.MeanField + ps.fit
    snr         ps.SNRPruned + ps.fit, prune(sparsity=0.9, scope=recipes.snr.SCOPE), then
                recipes.snr.finetune_epochs (half the epochs) of ps.fit, as ``--method snr`` does
    ssvi        ps.SparseSubspace(model, density=0.1) + ps.fit (the recipe's update_every)
    em-sghmc    ps.em_sghmc(model, data, target_sparsity=0.9) with the CLI's spike-and-slab prior
                (--prior-scale 1, the CLI's default σ₀ and π for em-sghmc); em_sghmc's own defaults otherwise

Baselines (same architecture; Adam lr 1e-3, batch 64):

    deterministic  early stopping on the validation split (best validation loss, patience 1/5 of the epochs)
    pruned         the deterministic net, its Linear weights magnitude-pruned to 90 % (one global
                   threshold), fine-tuned half the epochs (early stopping), then temperature-scaled on the
                   validation split (regression: the noise scale fitted there)
    mc-dropout     dropout 0.1 after every hidden layer, early stopping, 32 dropout samples at test time
    ensemble       5 deterministic nets (seeds), probabilities / Gaussian mixture averaged
    laplace        last-layer Laplace (laplace-torch, Kronecker-factored, prior precision by marginal
                   likelihood, GLM predictive with probit) on the deterministic net
    linear         logistic regression (sklearn, C=1) / RidgeCV (alphas 0.1, 1, 10), on the same inputs

Rules (fixed for every task, chosen before any run, never per dataset):

- architecture: an MLP with 2 hidden layers of 50 units (tabular) or 100 units (images, flattened); ReLU;
- budget: batch 64 (the CLI's default), epochs = max(30, ceil(2000 / steps per epoch)) (the CLI's 30
  epochs, but at least 2000 optimiser steps on tiny data); ``--quick``: max(2, ceil(400 / steps per epoch));
- data: the training split is cut into a fit part (85 %) and a validation part (15 %, stratified for
  classification); EVERY method trains on the fit part; the validation part is used only by the baselines
  that need it (early stopping, temperature / noise scale, Laplace's noise scale); the test split only for
  the figures. Tabular inputs and regression targets are standardised with the statistics of the whole
  training split; regression metrics are reported in the original units of y;
- BNN regression likelihood: ``likelihoods.Gaussian(0.1, learn_scale=True)`` (the CLI's); 32 posterior draws.

Acceptance (issue 10), checked per task and method on the mean over seeds: classification accuracy
>= deterministic - 2 points and ECE <= deterministic's; regression RMSE <= 1.05 x min(deterministic,
linear) and 95 % coverage in [0.90, 0.98].

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/defaults.py [--tasks ...] [--methods ...]
        [--seeds 0 1] [--quick] [--data-root /work/shared/data] [--out benchmarks/results/defaults.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
import torch.nn.functional as F
from torch import nn

import pyro_sparse as ps
from pyro_sparse.recipes import snr as snr_recipe
from pyro_sparse.recipes import ssvi as ssvi_recipe

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "defaults.json"
DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data"

BATCH_SIZE = 64  # the CLI's --batch-size default
MIN_EPOCHS, MIN_STEPS = 30, 2000
QUICK_MIN_EPOCHS, QUICK_MIN_STEPS = 2, 400
VALIDATION_FRACTION = 0.15
SPARSITY = 0.9
DENSITY = 0.1
NUM_SAMPLES = 32
ENSEMBLE_SIZE = 5
DROPOUT = 0.1
DETERMINISTIC_LR = 1e-3

BNN_METHODS = ("vi", "snr", "ssvi", "em-sghmc")
BASELINES = ("deterministic", "pruned", "mc-dropout", "ensemble", "laplace", "linear")
METHODS = BNN_METHODS + BASELINES
TASKS = ("breast-cancer", "wine", "iris", "moons", "digits-10", "fashion-10", "friedman1", "sparse-linear",
         "toy-regression")


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------
@dataclass
class Task:
    """One task, split and standardised. x_*: (N, *input_shape) float32; y_*: (N,) int64 or float32
    (regression targets standardised: original = y * y_std + y_mean)."""

    name: str
    kind: str  # "classification" | "regression"
    x_fit: torch.Tensor
    y_fit: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int | None
    hidden: tuple[int, ...]
    y_mean: float = 0.0
    y_std: float = 1.0

    @property
    def outputs(self) -> int:
        return self.num_classes if self.kind == "classification" else 1

    @property
    def in_features(self) -> int:
        return int(np.prod(self.x_fit.shape[1:]))


def _sklearn_arrays(name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """x (N, D), y (N,) and the task kind of a scikit-learn task."""
    from sklearn import datasets

    if name == "breast-cancer":
        x, y = datasets.load_breast_cancer(return_X_y=True)
    elif name == "wine":
        x, y = datasets.load_wine(return_X_y=True)
    elif name == "iris":
        x, y = datasets.load_iris(return_X_y=True)
    elif name == "moons":
        x, y = datasets.make_moons(n_samples=1000, noise=0.3, random_state=0)
    elif name == "friedman1":
        x, y = datasets.make_friedman1(n_samples=1000, n_features=10, noise=1.0, random_state=0)
        return x, y, "regression"
    elif name == "sparse-linear":
        return (*_sparse_linear(), "regression")
    else:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return x, y, "classification"


def _sparse_linear(n: int = 500, features: int = 100, relevant: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """y = x·β + ε, x ~ N(0, I_100), β non-zero on 10 inputs (|β| in [0.5, 2], random sign), ε ~ N(0, 1)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, features))
    beta = np.zeros(features)
    beta[:relevant] = rng.uniform(0.5, 2.0, relevant) * rng.choice([-1.0, 1.0], relevant)
    return x, x @ beta + rng.standard_normal(n)


def _as_task(name: str, kind: str, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
             y_test: torch.Tensor, num_classes: int | None, hidden: tuple[int, ...], standardise_x: bool) -> Task:
    """Standardise with the training split's statistics and cut the validation part off the training split."""
    from sklearn.model_selection import train_test_split

    if standardise_x:
        mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-8)
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_mean, y_std = 0.0, 1.0
    if kind == "regression":
        y_mean, y_std = float(y_train.mean()), float(y_train.std())
        y_train, y_test = (y_train - y_mean) / y_std, (y_test - y_mean) / y_std
    stratify = y_train.numpy() if kind == "classification" else None
    fit_index, val_index = train_test_split(np.arange(len(x_train)), test_size=VALIDATION_FRACTION,
                                            stratify=stratify, random_state=0)
    fit_index, val_index = torch.as_tensor(fit_index), torch.as_tensor(val_index)
    return Task(name, kind, x_train[fit_index], y_train[fit_index], x_train[val_index], y_train[val_index],
                x_test, y_test, num_classes, hidden, y_mean, y_std)


def load_task(name: str, data_root: str | Path | None = None) -> Task:
    """The task ``name`` (see TASKS): tabular ones split 75 / 25 (stratified, seed 0)."""
    if name == "digits-10":
        dataset = ps.data.load("digits").subsample(train=135, seed=0)  # 10 % of the 1347 training images
        return _image_task(name, dataset)
    if name == "fashion-10":
        dataset = ps.data.load("fashion-mnist", root=data_root or DEFAULT_DATA_ROOT).subsample(train=6000, test=2000,
                                                                                             seed=0)
        return _image_task(name, dataset)
    if name == "toy-regression":
        dataset = ps.data.load("toy-regression")
        (x_train, y_train), (x_test, y_test) = ps.data.as_tensors(dataset.train), ps.data.as_tensors(dataset.test)
        return _as_task(name, "regression", x_train, y_train, x_test, y_test, None, (50, 50), True)
    from sklearn.model_selection import train_test_split

    x, y, kind = _sklearn_arrays(name)
    stratify = y if kind == "classification" else None
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=stratify, random_state=0)
    as_y = (lambda v: torch.as_tensor(v, dtype=torch.int64)) if kind == "classification" else (
        lambda v: torch.as_tensor(v, dtype=torch.float32))
    num_classes = int(y.max()) + 1 if kind == "classification" else None
    return _as_task(name, kind, torch.as_tensor(x_train, dtype=torch.float32), as_y(y_train),
                    torch.as_tensor(x_test, dtype=torch.float32), as_y(y_test), num_classes, (50, 50), True)


def _image_task(name: str, dataset: ps.data.Dataset) -> Task:
    (x_train, y_train), (x_test, y_test) = ps.data.as_tensors(dataset.train), ps.data.as_tensors(dataset.test)
    return _as_task(name, "classification", x_train, y_train, x_test, y_test, dataset.num_classes, (100, 100), False)


def epochs_for(task: Task, quick: bool = False) -> int:
    """The fixed budget rule: max(30, ceil(2000 / steps per epoch)) epochs of batch 64 (quick: 2, 400)."""
    min_epochs, min_steps = (QUICK_MIN_EPOCHS, QUICK_MIN_STEPS) if quick else (MIN_EPOCHS, MIN_STEPS)
    steps_per_epoch = math.ceil(len(task.x_fit) / BATCH_SIZE)
    return max(min_epochs, math.ceil(min_steps / steps_per_epoch))


# ----------------------------------------------------------------------------------------------
# Predictions of any method, in standardised units, and their metrics in original units
# ----------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """Test-set predictions: classification probs (S, N, C); regression means (S, N) and noise scales (S,)."""

    probs: torch.Tensor | None = None
    means: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    sparsity: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def score(task: Task, prediction: Prediction) -> dict[str, float]:
    """accuracy, ece, nll, ... (classification) or rmse, nll, coverage_95 (regression, original units)."""
    if task.kind == "classification":
        results = ps.metrics.classification_metrics(prediction.probs.double(), task.y_test)
    else:
        means = prediction.means.double() * task.y_std + task.y_mean
        scales = prediction.scales.double() * task.y_std  # (S,) or (S, N)
        results = ps.metrics.regression_metrics(means, scales, task.y_test.double() * task.y_std + task.y_mean)
    return {**results, "sparsity": prediction.sparsity, **prediction.extra}


# ----------------------------------------------------------------------------------------------
# pyro-sparse methods
# ----------------------------------------------------------------------------------------------
def bayesian_model(task: Task, prior: ps.priors.Prior | None = None) -> ps.BayesianNetwork:
    """The task's MLP as a BayesianNetwork with the CLI's likelihood (and the library's default prior)."""
    net = ps.nets.mlp(task.in_features, task.hidden, task.outputs)
    likelihood = ps.likelihoods.Categorical() if task.kind == "classification" else ps.likelihoods.Gaussian(
        0.1, learn_scale=True)
    return ps.BayesianNetwork(net, prior=prior, likelihood=likelihood, dataset_size=len(task.x_fit))


def posterior_prediction(task: Task, posterior: ps.Posterior) -> Prediction:
    """32 posterior draws on the test split, each with its own deterministic parameters."""
    predictions = posterior.predictive(task.x_test, num_samples=NUM_SAMPLES)
    active = sum(posterior.active_counts().values())
    sparsity = 1.0 - active / posterior.model.num_weights
    if task.kind == "classification":
        return Prediction(probs=predictions.outputs.softmax(-1), sparsity=sparsity)
    outputs = predictions.outputs
    return Prediction(means=outputs.reshape(len(outputs), -1), scales=predictions.noise_scales, sparsity=sparsity)


def run_vi(task: Task, seed: int, epochs: int) -> Prediction:
    model = bayesian_model(task)
    guide = ps.MeanField(model)
    ps.fit(model, guide, (task.x_fit, task.y_fit), epochs=epochs, batch_size=BATCH_SIZE, seed=seed, progress=False)
    return posterior_prediction(task, ps.Posterior.from_guide(model, guide))


def run_snr(task: Task, seed: int, epochs: int) -> Prediction:
    model = bayesian_model(task)
    guide = ps.SNRPruned(model)
    data = (task.x_fit, task.y_fit)
    ps.fit(model, guide, data, epochs=epochs, batch_size=BATCH_SIZE, seed=seed, progress=False)
    guide.prune(sparsity=SPARSITY, scope=snr_recipe.SCOPE)
    finetune = snr_recipe.finetune_epochs({"epochs": epochs, "finetune_epochs": None})
    ps.fit(model, guide, data, epochs=finetune, batch_size=BATCH_SIZE, seed=seed + 1, progress=False)
    return posterior_prediction(task, ps.Posterior.from_guide(model, guide))


def run_ssvi(task: Task, seed: int, epochs: int) -> Prediction:
    model = bayesian_model(task)
    guide = ssvi_recipe.make_guide({"density": DENSITY, "update_every": None}, model)
    ps.fit(model, guide, (task.x_fit, task.y_fit), epochs=epochs, batch_size=BATCH_SIZE, seed=seed, progress=False)
    return posterior_prediction(task, ps.Posterior.from_guide(model, guide))


def cli_spike_and_slab() -> ps.priors.SpikeAndSlab:
    """The prior ``pyro-sparse train --method em-sghmc`` builds when no prior option is given."""
    from pyro_sparse import cli
    from pyro_sparse.recipes import em_sghmc as em_recipe

    # None: σ₀ is set per layer by em_sghmc (its default); the prior's scalar σ₀ is then the recipe's placeholder
    spike = getattr(cli, "DEFAULT_SPIKE_SCALE", {}).get("em-sghmc") or getattr(em_recipe, "PLACEHOLDER_SPIKE_SCALE",
                                                                                0.01)
    inclusion = getattr(cli, "DEFAULT_INCLUSION", 0.5)
    return ps.priors.SpikeAndSlab(1.0, spike, inclusion)  # 1.0: --prior-scale's default


def run_em_sghmc(task: Task, seed: int, epochs: int) -> Prediction:
    model = bayesian_model(task, prior=cli_spike_and_slab())
    result = ps.em_sghmc(model, (task.x_fit, task.y_fit), target_sparsity=SPARSITY, epochs=epochs,
                         batch_size=BATCH_SIZE, seed=seed, progress=False)
    return posterior_prediction(task, result.posterior)


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------
def plain_net(task: Task, dropout: float = 0.0) -> nn.Sequential:
    """The same MLP as a plain network (optionally with dropout after every hidden activation)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = task.in_features
    for hidden in task.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
        width = hidden
    layers.append(nn.Linear(width, task.outputs))
    return nn.Sequential(*layers)


def _loss(task: Task, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, y) if task.kind == "classification" else F.mse_loss(output.reshape(-1), y)


def train_net(task: Task, net: nn.Module, seed: int, epochs: int, masks: dict[str, torch.Tensor] | None = None
              ) -> nn.Module:
    """Adam (lr 1e-3, batch 64) for up to ``epochs`` epochs; keeps the state of best validation loss and stops
    after max(3, epochs // 5) epochs without improvement. ``masks``: parameter name -> 0/1, held at zero."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=DETERMINISTIC_LR)
    patience = max(3, epochs // 5)
    best, best_state, since = math.inf, copy.deepcopy(net.state_dict()), 0
    parameters = dict(net.named_parameters())
    for _ in range(epochs):
        net.train()
        for batch in torch.randperm(len(task.x_fit), generator=generator).split(BATCH_SIZE):
            optimizer.zero_grad()
            _loss(task, net(task.x_fit[batch]), task.y_fit[batch]).backward()
            optimizer.step()
            if masks:
                with torch.no_grad():
                    for name, mask in masks.items():
                        parameters[name].mul_(mask)
        net.eval()
        with torch.no_grad():
            loss = float(_loss(task, net(task.x_val), task.y_val))
        if not math.isfinite(loss):
            raise ps.errors.TrainingDiverged("validation", "loss", "lr")
        if loss < best:
            best, best_state, since = loss, copy.deepcopy(net.state_dict()), 0
        else:
            since += 1
            if since > patience:
                break
    net.load_state_dict(best_state)
    return net.eval()


def _grid() -> torch.Tensor:
    return torch.logspace(-2.0, 1.5, 300, dtype=torch.float64)


def fit_temperature(logits_val: torch.Tensor, y_val: torch.Tensor) -> float:
    """The temperature T minimising the validation NLL of softmax(logits / T) (grid of 300 values in [0.01, 31.6])."""
    grid = _grid()
    nll = torch.stack([F.cross_entropy(logits_val.double() / t, y_val) for t in grid])
    return float(grid[nll.argmin()])


def fit_noise_scale(means_val: torch.Tensor, y_val: torch.Tensor) -> float:
    """σ maximising the validation log-likelihood of the mixture (1/S) Σ_s N(μ_s, σ²): means_val (S, N)."""
    grid = _grid()
    y = y_val.double()
    log_lik = torch.stack([(torch.logsumexp(torch.distributions.Normal(means_val.double(), s).log_prob(y), 0)).sum()
                           for s in grid])
    return float(grid[log_lik.argmax()])


def net_prediction(task: Task, nets: list[nn.Module], samples_per_net: int = 1, sparsity: float = 0.0,
                   temperature: float = 1.0) -> Prediction:
    """Predictions of plain networks (each sampled ``samples_per_net`` times: MC dropout keeps dropout on);
    regression noise scale fitted on the validation split."""
    def outputs(x: torch.Tensor) -> torch.Tensor:
        rows = []
        with torch.no_grad():
            for net in nets:
                net.train(samples_per_net > 1)
                rows += [net(x) for _ in range(samples_per_net)]
                net.eval()
        return torch.stack(rows)

    test = outputs(task.x_test)
    if task.kind == "classification":
        return Prediction(probs=(test / temperature).softmax(-1), sparsity=sparsity)
    means_val = outputs(task.x_val).reshape(-1, len(task.x_val))
    scale = fit_noise_scale(means_val, task.y_val)
    means = test.reshape(-1, len(task.x_test))
    return Prediction(means=means, scales=torch.full((len(means),), scale), sparsity=sparsity)


def deterministic_net(task: Task, seed: int, epochs: int, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return train_net(task, plain_net(task, dropout), seed, epochs)


def run_deterministic(task: Task, seed: int, epochs: int) -> Prediction:
    return net_prediction(task, [deterministic_net(task, seed, epochs)])


def magnitude_masks(net: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """name -> 0/1 mask of every Linear weight: one global threshold keeps the largest (1 - sparsity) |w|."""
    weights = {name: p for name, p in net.named_parameters() if name.endswith("weight")}
    magnitudes = torch.cat([p.detach().abs().reshape(-1) for p in weights.values()])
    k = round(sparsity * magnitudes.numel())
    threshold = magnitudes.kthvalue(k).values if k > 0 else magnitudes.min() - 1
    return {name: (p.detach().abs() > threshold).float() for name, p in weights.items()}


def run_pruned(task: Task, seed: int, epochs: int) -> Prediction:
    net = deterministic_net(task, seed, epochs)
    masks = magnitude_masks(net, SPARSITY)
    parameters = dict(net.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            parameters[name].mul_(mask)
    net = train_net(task, net, seed + 1, max(1, epochs // 2), masks=masks)
    total = sum(mask.numel() for mask in masks.values())
    sparsity = 1.0 - sum(float(mask.sum()) for mask in masks.values()) / total
    if task.kind == "regression":  # the noise scale is fitted on the validation split instead
        return net_prediction(task, [net], sparsity=sparsity)
    with torch.no_grad():
        temperature = fit_temperature(net(task.x_val), task.y_val)
    prediction = net_prediction(task, [net], sparsity=sparsity, temperature=temperature)
    prediction.extra["temperature"] = temperature
    return prediction


def run_mc_dropout(task: Task, seed: int, epochs: int) -> Prediction:
    return net_prediction(task, [deterministic_net(task, seed, epochs, dropout=DROPOUT)], samples_per_net=NUM_SAMPLES)


def run_ensemble(task: Task, seed: int, epochs: int) -> Prediction:
    nets = [deterministic_net(task, 1000 * seed + member, epochs) for member in range(ENSEMBLE_SIZE)]
    return net_prediction(task, nets)


def run_laplace(task: Task, seed: int, epochs: int) -> Prediction:
    """Last-layer Laplace (laplace-torch) on the deterministic net; regression noise σ from the validation split."""
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset

    net = deterministic_net(task, seed, epochs)
    targets = task.y_fit if task.kind == "classification" else task.y_fit.unsqueeze(1)
    loader = DataLoader(TensorDataset(task.x_fit, targets), batch_size=BATCH_SIZE)
    if task.kind == "classification":
        laplace = Laplace(net, "classification", subset_of_weights="last_layer", hessian_structure="kron")
        laplace.fit(loader)
        laplace.optimize_prior_precision(method="marglik")
        with torch.no_grad():
            probs = laplace(task.x_test, pred_type="glm", link_approx="probit")
        return Prediction(probs=probs.unsqueeze(0))
    with torch.no_grad():
        noise = fit_noise_scale(net(task.x_val).reshape(1, -1), task.y_val)
    laplace = Laplace(net, "regression", subset_of_weights="last_layer", hessian_structure="kron", sigma_noise=noise)
    laplace.fit(loader)
    laplace.optimize_prior_precision(method="marglik")
    with torch.no_grad():
        mean, variance = laplace(task.x_test, pred_type="glm")
    scale = (variance.reshape(-1) + noise**2).sqrt()
    # one Gaussian per point: a "mixture" of one component whose scale differs per point
    return Prediction(means=mean.reshape(1, -1), scales=scale.reshape(1, -1))


def run_linear(task: Task, seed: int, epochs: int) -> Prediction:
    """Logistic regression (C=1) or RidgeCV (alphas 0.1, 1, 10) on the flattened inputs of the fit split."""
    from sklearn.linear_model import LogisticRegression, RidgeCV

    x_fit, x_val, x_test = (x.reshape(len(x), -1).double().numpy() for x in (task.x_fit, task.x_val, task.x_test))
    if task.kind == "classification":
        classifier = LogisticRegression(max_iter=2000, random_state=seed).fit(x_fit, task.y_fit.numpy())
        return Prediction(probs=torch.as_tensor(classifier.predict_proba(x_test)).unsqueeze(0))
    regressor = RidgeCV().fit(x_fit, task.y_fit.numpy())
    scale = fit_noise_scale(torch.as_tensor(regressor.predict(x_val)).reshape(1, -1), task.y_val)
    return Prediction(means=torch.as_tensor(regressor.predict(x_test)).reshape(1, -1),
                      scales=torch.full((1,), scale))


RUNNERS: dict[str, Callable[[Task, int, int], Prediction]] = {
    "vi": run_vi, "snr": run_snr, "ssvi": run_ssvi, "em-sghmc": run_em_sghmc, "deterministic": run_deterministic,
    "pruned": run_pruned, "mc-dropout": run_mc_dropout, "ensemble": run_ensemble, "laplace": run_laplace,
    "linear": run_linear,
}


# ----------------------------------------------------------------------------------------------
# The grid, the acceptance check and the tables
# ----------------------------------------------------------------------------------------------
def run_one(task: Task, method: str, seed: int, epochs: int) -> dict[str, Any]:
    """One run: its metrics and seconds, or the error that stopped it (a crash or a divergence)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    row: dict[str, Any] = {"task": task.name, "kind": task.kind, "method": method, "seed": seed, "epochs": epochs}
    start = time.perf_counter()
    try:
        prediction = RUNNERS[method](task, seed, epochs)
        row.update(score(task, prediction))
        row["diverged"] = not all(math.isfinite(value) for key, value in row.items()
                                  if key in ("accuracy", "nll", "rmse") and isinstance(value, float))
    except Exception as error:  # noqa: BLE001 - a crash is a result of the benchmark, recorded per run
        row["error"] = f"{type(error).__name__}: {error}"
    row["seconds"] = time.perf_counter() - start
    return row


def mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, method): the mean of each number over seeds (an errored run makes the row errored)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["method"]), []).append(row)
    means = []
    for (task, method), group in groups.items():
        summary: dict[str, Any] = {"task": task, "kind": group[0]["kind"], "method": method, "seeds": len(group)}
        errors = [row["error"] for row in group if "error" in row]
        if errors:
            summary["error"] = errors[0]
        for key in group[0]:
            values = [row.get(key) for row in group]
            if key not in ("seed", "epochs") and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                     for v in values):
                summary[key] = float(np.mean(values))
        summary["diverged"] = any(row.get("diverged", False) for row in group)
        means.append(summary)
    return means


def acceptance(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task and method: whether issue 10's acceptance holds (see the module docstring), and why not."""
    by_key = {(row["task"], row["method"]): row for row in summary}
    verdicts = []
    for row in summary:
        reference = by_key.get((row["task"], "deterministic"))
        verdict = {"task": row["task"], "method": row["method"]}
        if "error" in row or row.get("diverged"):
            verdict.update(passed=False, why=row.get("error", "diverged"))
        elif reference is None or "error" in reference:
            verdict.update(passed=None, why="no deterministic reference")
        elif row["kind"] == "classification":
            accurate = row["accuracy"] >= reference["accuracy"] - 0.02
            calibrated = row["ece"] <= reference["ece"]
            why = [] if accurate else [f"accuracy {row['accuracy']:.3f} < {reference['accuracy']:.3f} - 0.02"]
            why += [] if calibrated else [f"ECE {row['ece']:.3f} > {reference['ece']:.3f}"]
            verdict.update(passed=accurate and calibrated, why="; ".join(why))
        else:
            linear = by_key.get((row["task"], "linear"))
            best = min(reference["rmse"], linear["rmse"] if linear and "rmse" in linear else math.inf)
            accurate = row["rmse"] <= 1.05 * best
            covered = 0.90 <= row["coverage_95"] <= 0.98
            why = [] if accurate else [f"RMSE {row['rmse']:.3f} > 1.05 x {best:.3f}"]
            why += [] if covered else [f"coverage {row['coverage_95']:.3f} outside [0.90, 0.98]"]
            verdict.update(passed=accurate and covered, why="; ".join(why))
        verdicts.append(verdict)
    return verdicts


COLUMNS = {"classification": ("accuracy", "ece", "nll", "sparsity", "seconds"),
           "regression": ("rmse", "nll", "coverage_95", "sparsity", "seconds")}


def table(summary: list[dict[str, Any]], verdicts: list[dict[str, Any]], kind: str) -> str:
    """A Markdown table of one task kind: task, method, the kind's columns, and the acceptance verdict."""
    passed = {(v["task"], v["method"]): v for v in verdicts}
    columns = COLUMNS[kind]
    lines = ["| task | method | " + " | ".join(columns) + " | accept |", "|---" * (len(columns) + 3) + "|"]
    for row in summary:
        if row["kind"] != kind:
            continue
        verdict = passed[(row["task"], row["method"])]
        mark = {True: "yes", False: "NO", None: "-"}[verdict["passed"]]
        if "error" in row:
            cells = ["error"] * len(columns)
        else:
            cells = [f"{row[c]:.1f}" if c == "seconds" else f"{row[c]:.3f}" for c in columns]
        lines.append(f"| {row['task']} | {row['method']} | " + " | ".join(cells) + f" | {mark} |")
    return "\n".join(lines)


def available(methods: list[str]) -> list[str]:
    """``methods`` less "laplace" when laplace-torch is not installed (it is an optional baseline)."""
    import importlib.util

    if "laplace" in methods and importlib.util.find_spec("laplace") is None:
        print("laplace-torch is not installed: the laplace baseline is skipped", file=sys.stderr)
        return [method for method in methods if method != "laplace"]
    return list(methods)


def run_grid(tasks: list[str], methods: list[str], seeds: list[int], quick: bool = False,
             data_root: str | Path | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every (task, method, seed); returns {"runs", "summary", "acceptance"}."""
    methods = available(methods)
    rows = []
    for name in tasks:
        task = load_task(name, data_root)
        epochs = epochs_for(task, quick)
        for method in methods:
            for seed in seeds:
                row = run_one(task, method, seed, epochs)
                rows.append(row)
                if log:
                    shown = {k: round(v, 4) for k, v in row.items() if isinstance(v, float)}
                    log(f"{name} {method} seed {seed}: {row.get('error', shown)}")
    summary = mean_rows(rows)
    return {"runs": rows, "summary": summary, "acceptance": acceptance(summary)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--quick", action="store_true", help="a few epochs (for the test)")
    parser.add_argument("--data-root", default=None, help=f"Fashion-MNIST's folder (default {DEFAULT_DATA_ROOT})")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = run_grid(args.tasks, args.methods, args.seeds, args.quick, args.data_root,
                       log=lambda line: print(line, file=sys.stderr, flush=True))
    results["config"] = {"argv": sys.argv if argv is None else argv, "quick": args.quick, "seeds": args.seeds,
                         "wall_seconds": time.perf_counter() - start, "machine": platform.platform(),
                         "processor": platform.processor(), "torch_threads": torch.get_num_threads(),
                         "torch": torch.__version__}
    for kind in ("classification", "regression"):
        if any(row["kind"] == kind for row in results["summary"]):
            print(f"\n## {kind}\n\n{table(results['summary'], results['acceptance'], kind)}")
    failed = [v for v in results["acceptance"] if v["passed"] is False]
    print(f"\nacceptance: {sum(v['passed'] is True for v in results['acceptance'])} pass, {len(failed)} fail")
    for verdict in failed:
        print(f"  FAIL {verdict['task']} {verdict['method']}: {verdict['why']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"\nwall time {results['config']['wall_seconds']:.0f} s; written to {out}")
    return results


if __name__ == "__main__":
    main()
