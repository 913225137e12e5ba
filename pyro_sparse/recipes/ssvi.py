"""``--method ssvi``: sparse-subspace VI (``guides.SparseSubspace``), sparse for the whole of training.

Options: ``--density`` (default 0.1; 0.25 with ``--structure unit``) and ``--update-every`` (default 100
steps); ``--structure unit`` keeps that fraction of the units (neurons, channels) of every removable layer
active instead of weights, and trains the smaller network of the active units (``infer.compact``).
Besides the common metrics, metrics.json gets ``density``, ``train_flops_dense_vi`` (the same run with
every weight active), ``support_updates`` (how many times the support moved), ``support_changes``
(weights moved in all; units with ``--structure unit``), ``trainable_bytes`` (parameters + Adam state)
and ``trainable_bytes_dense`` (the same for dense VI of this model); history.csv gets
``support_changes`` per epoch (and per update), and ``support_updates.csv`` in the output folder lists
every update and layer.

Training FLOPs (DESIGN.md's counting): the support size is constant, so a step costs the same
throughout: training_flops_per_example(active) × N × epochs, plus for every gradient-growth update
one dense forward and backward pass (3 × the dense forward) over that update's batch.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ..data import Dataset, as_tensors
from ..evaluation import training_flops_per_example
from ..guides.subspace import SparseSubspace, dense_trainable_bytes, trainable_bytes
from ..infer.svi import fit
from ..model import BayesianNetwork
from ..posterior import Posterior
from . import CHECKPOINT, TrainedRun, training_data
from .vi import variational_settings

DEFAULT_LR = 5e-3  # Adam's learning rate
OPTIONS: frozenset[str] = frozenset({"density", "update_every", "kl_weight", "warmup_epochs", "precision",
                                     "structure"})
CHANGEABLE_ON_RESUME: frozenset[str] = frozenset({"epochs", "lr", "kl_weight"})
DEFAULT_DENSITY = {"weight": 0.1, "unit": 0.25}
"""--density when not given: 10 % of the weights; with --structure unit 25 % of the units of every removable layer
(the 75 % unit sparsity that SNR and EM-SGHMC default to)."""
DEFAULT_UPDATE_EVERY = 100


def make_guide(config: dict[str, Any], model: BayesianNetwork) -> SparseSubspace:
    density = config.get("density")
    update_every = config.get("update_every")
    structure = config.get("structure") or "weight"
    return SparseSubspace(
        model,
        density=DEFAULT_DENSITY[structure] if density is None else density,
        update_every=DEFAULT_UPDATE_EVERY if update_every is None else update_every,
        structure=structure,
    )


def train(config: dict[str, Any], model: BayesianNetwork, dataset: Dataset, out: Path) -> TrainedRun:
    guide = make_guide(config, model)
    history = fit(
        model, guide, training_data(config, dataset), epochs=config["epochs"], batch_size=config["batch_size"],
        lr=config["lr"], kl_weight=config["kl_weight"], warmup_epochs=config["warmup_epochs"], device=config["device"],
        seed=config["seed"], checkpoint=out / CHECKPOINT, resume=config["resume"], metadata=config,
        precision=config.get("precision") or "fp32",
    )
    x_train, _ = as_tensors(dataset.train)
    examples = len(x_train) * len(history)
    train_flops = training_flops_per_example(model, guide.active_counts(), x_train) * examples
    train_flops += guide.gradient_flops(x_train)
    dense_flops = training_flops_per_example(model, {}, x_train) * examples
    _write_update_log(guide, out / "support_updates.csv")
    metrics = {
        "density": guide.density,
        "structure": guide.structure,
        "update_every": guide.update_every,
        "train_flops_dense_vi": dense_flops,
        "train_flops_ratio": train_flops / dense_flops,
        "support_updates": len(guide.update_log),
        "support_changes": sum(entry["moved"] for entry in guide.update_log),
        "trainable_bytes": trainable_bytes([*guide.parameters(), *model.parameters()]),
        "trainable_bytes_dense": dense_trainable_bytes(model),
        **variational_settings(guide, history),
    }
    return TrainedRun(Posterior.from_guide(model, guide), history, train_flops, metrics)


def restore(config: dict[str, Any], model: BayesianNetwork, saved: dict[str, Any]) -> Posterior:
    guide = make_guide(config, model)
    model.load_state_dict(saved["model"])
    guide.load_state_dict(saved["guide"])
    return Posterior.from_guide(model, guide)


def _write_update_log(guide: SparseSubspace, path: Path) -> None:
    """One row per update and sparse layer: step, fraction r_t, layer, weights moved."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "fraction", "layer", "moved"])
        for entry in guide.update_log:
            for layer, moved in entry["layers"].items():
                writer.writerow([entry["step"], f"{entry['fraction']:.6g}", layer, moved])
