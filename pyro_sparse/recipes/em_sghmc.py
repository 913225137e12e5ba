"""``--method em-sghmc``: SGHMC with EM updates of a spike-and-slab prior and one-shot pruning.

Reads ``--sparsity`` (target, default 0.9), ``--chains`` (default 2) and ``--samples`` (draws kept per
chain; prediction uses at most the stored draws). ``--structure unit`` puts one inclusion variable on each
unit (a group spike-and-slab) and removes whole units (``--sparsity``: the fraction of the removable units,
default 0.75), so the exported network is smaller and faster. ``--lr`` is the SGHMC step size ε, in preconditioned
units (about the distance a weight drifts per step; default ``DEFAULT_LR``, chosen on validation splits
of four tasks: ``benchmarks/em_sghmc.py --part validation``). The prior is spike-and-slab (the only
``--prior`` it takes), built from ``--prior-scale`` (σ₁) and ``--inclusion`` (π); σ₀ is set per layer
(2 % of the std of the layer's initial weights) unless ``--spike-scale`` gives one value for all.
``--kl-weight`` and ``--warmup-epochs`` (VI options) do not apply.
Besides the common outputs it writes ``posterior.nc`` (ArviZ InferenceData: hyperparameters, the
16 weights of largest |mean|, lp / sparsity / step size, and the pointwise log-likelihood of up to
2000 training examples, a seeded random subset, so that ``az.loo`` estimates the expected log
predictive density of new data) and ``trace.png`` (az.plot_trace of the hyperparameters and weights).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..data import Dataset, as_tensors
from ..evaluation import inference_flops
from ..infer.em import DEFAULT_STEP_SIZE, em_sghmc, restore_result
from ..metrics import total_flops
from ..model import BayesianNetwork
from ..posterior import Posterior
from ..priors import SpikeAndSlab
from . import CHECKPOINT, TrainedRun, training_data

DEFAULT_LR = DEFAULT_STEP_SIZE  # the SGHMC step size ε (--lr), in preconditioned units
OPTIONS: frozenset[str] = frozenset({"sparsity", "chains", "structure"})
DEFAULT_SPARSITY = {"weight": 0.9, "unit": 0.75}
"""--sparsity when not given: 90 % of the weights; with --structure unit 75 % of the removable units (on
Fashion-MNIST mlp 784-400-400-10, 0.5 points below unpruned EM-SGHMC with a 2× / 3.5× faster export)."""
# The step size, the epochs (burn-in is half of them) and the draws per chain fix the chain: none may change.
CHANGEABLE_ON_RESUME: frozenset[str] = frozenset()
ALSO_DEFINES: frozenset[str] = frozenset({"samples"})
PRIORS = ("spike-slab",)
MAX_WEIGHTS = 16
LOO_EXAMPLES = 2000  # training examples whose pointwise log-likelihood goes to posterior.nc (for az.loo)


PLACEHOLDER_SPIKE_SCALE = 0.01  # the prior's scalar σ₀ when σ₀ is set per layer (not used for sampling)


def _spike_scale(config: dict[str, Any]) -> float | str:
    """``em_sghmc``'s spike_scale: the --spike-scale given, else "per-layer"."""
    return "per-layer" if config.get("spike_scale") is None else config["spike_scale"]


def _use_spike_and_slab(config: dict[str, Any], model: BayesianNetwork) -> None:
    spike = config.get("spike_scale") or PLACEHOLDER_SPIKE_SCALE
    model.prior = SpikeAndSlab(config["prior_scale"], spike, config["inclusion"]).to(
        next(iter(model.net.buffers())).device
    )


def train(config: dict[str, Any], model: BayesianNetwork, dataset: Dataset, out: Path) -> TrainedRun:
    from ..inference_data import diagnostics, import_arviz

    az = import_arviz()
    _use_spike_and_slab(config, model)
    model.to(config["device"])
    structure = config.get("structure") or "weight"
    sparsity = DEFAULT_SPARSITY[structure] if config.get("sparsity") is None else config["sparsity"]
    chains = 2 if config.get("chains") is None else config["chains"]
    result = em_sghmc(
        model, training_data(config, dataset), target_sparsity=sparsity, structure=structure, chains=chains,
        samples=config["samples"],
        epochs=config["epochs"], batch_size=config["batch_size"], step_size=config["lr"], seed=config["seed"],
        spike_scale=_spike_scale(config), checkpoint=out / CHECKPOINT, resume=config["resume"], metadata=config,
    )
    x_train, y_train = as_tensors(dataset.train)
    subset = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(config["seed"]))[:LOO_EXAMPLES]
    idata = result.posterior.to_arviz(data=(x_train[subset], y_train[subset]), max_weights=MAX_WEIGHTS)
    _write_netcdf(idata, out / "posterior.nc")
    _trace_plot(az, idata, out / "trace.png")

    dense = total_flops(inference_flops(model, {name: site.numel for name, site in model.sites.items()}, x_train))
    # forward + backward (3x forward) per example and chain; the active fraction of each epoch
    train_flops = sum(3 * dense * (1 - row["sparsity"]) * len(x_train) * chains for row in result.history)
    metrics = {"target_sparsity": sparsity, "structure": structure, "num_chains": chains,
               "num_draws": result.posterior.num_stored // chains, **diagnostics(idata)}
    if structure == "unit":
        metrics["prior_unit_inclusion"] = float(result.traces["unit_inclusion"][0, -1])
    for name in ("inclusion", "slab_scale"):
        metrics[f"prior_{name}"] = float(getattr(model.prior, name))
    if config.get("spike_scale") is None:  # σ₀ per layer: one key per site
        metrics.update({f"prior_spike_scale.{site}": value for site, value in result.spike_scale.items()})
    else:
        metrics["prior_spike_scale"] = float(config["spike_scale"])
    return TrainedRun(result.posterior, result.history, train_flops, metrics)


def _write_netcdf(idata, path: Path) -> None:
    """``idata.to_netcdf`` through a temporary file beside ``path``: a killed run leaves no half file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        idata.to_netcdf(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _trace_plot(az, idata, path: Path) -> None:
    import matplotlib.pyplot as plt  # the backend is left as the user has it

    axes = az.plot_trace(idata, compact=True)
    figure = axes.ravel()[0].figure
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def restore(config: dict[str, Any], model: BayesianNetwork, saved: dict[str, Any]) -> Posterior:
    _use_spike_and_slab(config, model)
    model.load_state_dict(saved["model"])
    return restore_result(model, saved).posterior
