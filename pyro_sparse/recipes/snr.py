"""``--method snr``: dense mean-field VI, SNR pruning to ``--sparsity``, then fine-tuning.

Phases and files in the output folder:

1. dense VI with ``fit``, checkpointed to ``dense.pt`` after every epoch;
2. the dense posterior is evaluated on the test split (``accuracy_before_pruning`` ...), its SNR
   histogram drawn (``snr_histogram.png``), and it is pruned (``SNRPruned.prune``: the lowest-SNR
   fraction of all weights, one threshold across layers). With ``--structure unit`` whole units go
   (``--sparsity``: the fraction of the removable units): by their group SNR, one threshold for all
   layers; under ``--prior horseshoe`` by their posterior scale τ̃, the same fraction of every layer
   (``guides.horseshoe.prune_units``).
3. ``--finetune-epochs`` epochs of ``fit`` on the pruned guide, checkpointed to ``checkpoint.pt``
   (with 0 epochs the pruned state is written there directly); ``layer_sparsity.csv`` is written.

A crash leaves the last good checkpoint of its phase; ``--resume`` finishes the dense phase from
``dense.pt`` (or skips it when complete), then resumes fine-tuning from ``checkpoint.pt``. Pruning
is deterministic, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from .. import checkpoint as checkpoints
from .. import plots
from ..data import Dataset, as_tensors
from ..errors import TrainingDiverged
from ..evaluation import evaluate, training_flops_per_example
from ..guides.horseshoe import prune_units
from ..guides.snr import SNRPruned
from ..infer.svi import fit
from ..model import BayesianNetwork
from ..posterior import Posterior
from ..priors import NodeHorseshoe
from . import CHECKPOINT, TrainedRun, training_data
from .vi import variational_settings

DEFAULT_LR = 5e-3  # Adam's learning rate of the dense phase (and of the fine-tuning unless --finetune-lr)
OPTIONS: frozenset[str] = frozenset({"sparsity", "finetune_epochs", "finetune_lr", "kl_weight", "warmup_epochs",
                                     "precision", "structure"})
DENSE_CHECKPOINT = "dense.pt"
# Per phase checkpoint: the option that counts its epochs, and the name of its epochs in resume_changes.
PHASE_EPOCHS = {DENSE_CHECKPOINT: "epochs", CHECKPOINT: "finetune_epochs"}
PHASE_LABELS = {DENSE_CHECKPOINT: "epoch", CHECKPOINT: "fine-tuning epoch"}
# The dense phase and the pruning are fixed once done; the fine-tuning may be extended or its lr changed.
CHANGEABLE_ON_RESUME: frozenset[str] = frozenset({"finetune_epochs", "finetune_lr"})
DEFAULT_SPARSITY = {"weight": 0.8, "unit": 0.75}
"""--sparsity when not given: 80 % of the weights; with --structure unit 75 % of the removable units (on
Fashion-MNIST mlp 784-400-400-10 and lenet5 the exported network is then over 2× faster than the dense one,
benchmarks/structured.py)."""
SCOPE = "global"  # one SNR threshold for all layers (see SNRPruned.prune; benchmarks/snr_sweep.py)
HORSESHOE_SCOPE = "layer"  # --prior horseshoe --structure unit: each layer loses the fraction (scales are per layer)


def finetune_epochs(config: dict[str, Any]) -> int:
    """--finetune-epochs, or by default half the dense epochs (at least 1): on Fashion-MNIST lenet5, 5
    epochs after 10 met every target where 2 lost 4 points at 95 % (benchmarks/snr_sweep.py)."""
    given = config.get("finetune_epochs")
    return given if given is not None else max(1, config["epochs"] // 2)


def train(config: dict[str, Any], model: BayesianNetwork, dataset: Dataset, out: Path) -> TrainedRun:
    structure = config.get("structure") or "weight"
    sparsity = config["sparsity"] if config.get("sparsity") is not None else DEFAULT_SPARSITY[structure]
    epochs_ft = finetune_epochs(config)
    schedule = {"batch_size": config["batch_size"], "lr": config["lr"], "kl_weight": config["kl_weight"],
                "device": config["device"], "seed": config["seed"], "resume": config["resume"], "metadata": config,
                "precision": config.get("precision") or "fp32"}
    guide = SNRPruned(model)
    data = training_data(config, dataset)
    dense_history = fit(model, guide, data, epochs=config["epochs"], warmup_epochs=config["warmup_epochs"],
                        checkpoint=out / DENSE_CHECKPOINT, **schedule)
    x_train, _ = as_tensors(dataset.train)
    dense_flops = training_flops_per_example(model, guide.active_counts(), x_train) * len(x_train)

    before = evaluate(model, guide, dataset.test, num_samples=config["samples"])
    snr = guide.snr()
    if structure == "unit" and isinstance(model.prior, NodeHorseshoe):  # units go by their posterior scale
        prune_units(guide, sparsity=sparsity, scope=HORSESHOE_SCOPE)
    else:
        guide.prune(sparsity=sparsity, scope=SCOPE, structure=structure)
    what = "the weights" if structure == "weight" else "the units"
    plots.snr_histogram(snr, out / "snr_histogram.png",
                        thresholds=guide.pruned_threshold if structure == "weight" else None,
                        labels=model.layer_labels(),
                        title=f"{config['net']} {config['data']}: SNR before pruning {sparsity:.0%} of {what}")
    del snr

    if epochs_ft > 0:
        finetune = {**schedule, "lr": config.get("finetune_lr") or config["lr"]}
        try:
            ft_history = fit(model, guide, data, epochs=epochs_ft, checkpoint=out / CHECKPOINT, **finetune)
        except TrainingDiverged as error:  # the fine-tuning's step size is --finetune-lr
            raise TrainingDiverged(error.where, error.what, "finetune_lr", error.checkpoint) from None
    else:
        ft_history = []
        checkpoints.save({"model": model.state_dict(), "guide": guide.state_dict(), "history": [], "epoch": 0,
                          "epochs": 0, "metadata": config}, out / CHECKPOINT)
    _write_layer_sparsity(guide.layer_sparsity(), out / "layer_sparsity.csv")
    ft_flops = training_flops_per_example(model, guide.active_counts(), x_train) * len(x_train)

    dense_seconds = dense_history[-1]["seconds"] if dense_history else 0.0
    history = [{**row, "phase": "dense"} for row in dense_history]
    history += [{**row, "epoch": len(dense_history) + row["epoch"], "seconds": dense_seconds + row["seconds"],
                 "phase": "finetune"} for row in ft_history]
    scope = HORSESHOE_SCOPE if structure == "unit" and isinstance(model.prior, NodeHorseshoe) else SCOPE
    metrics = {"target_sparsity": sparsity, "scope": scope, "structure": structure, "finetune_epochs": epochs_ft,
               "finetune_lr": config.get("finetune_lr") or config["lr"],
               "accuracy_before_pruning": before["accuracy"], "nll_before_pruning": before["nll"],
               "ece_before_pruning": before["ece"], **variational_settings(guide, dense_history)}
    train_flops = dense_flops * len(dense_history) + ft_flops * len(ft_history)
    return TrainedRun(Posterior.from_guide(model, guide), history, train_flops, metrics)


def _write_layer_sparsity(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["site", "total", "active", "sparsity"])
        writer.writeheader()
        writer.writerows(rows)


def restore(config: dict[str, Any], model: BayesianNetwork, saved: dict[str, Any]) -> Posterior:
    guide = SNRPruned(model)
    model.load_state_dict(saved["model"])
    guide.load_state_dict(saved["guide"])
    return Posterior.from_guide(model, guide)


__all__ = ["OPTIONS", "restore", "train"]
