"""One recipe per ``pyro-sparse train --method``: how a run is trained and how it is restored.

A recipe is a module with

- ``OPTIONS``: the method-specific command-line options it reads (the CLI rejects the others);
- ``DEFAULT_LR``: ``--lr`` when it is not given (a learning rate, or em-sghmc's step size);
- ``train(config, model, dataset, out) -> TrainedRun``: trains ``model`` on ``dataset.train``, writing
  its checkpoint to ``out / "checkpoint.pt"`` (atomically, so ``--resume`` continues it);
- ``restore(config, model, saved) -> Posterior``: the posterior of a run from its checkpoint;

and optionally

- ``CHANGEABLE_ON_RESUME``: the schedule options (``run_options.SCHEDULE``) that ``--resume`` may change,
  applied from the next epoch on (default: none);
- ``ALSO_DEFINES``: options that define this method's run although they do not define others';
- ``PHASE_EPOCHS`` / ``PHASE_LABELS``: for a run in phases, each phase checkpoint's epoch-count option and
  the name of its epochs (default: ``"epochs"`` and ``"epoch"``). ``CHECKPOINT_FILES`` lists every
  checkpoint a run may hold; the first present is the latest.

The CLI owns everything common to all methods: parsing, the output folder, the dataset and the
model, history.csv, the training curve, metrics.json and the reliability diagram.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from ..posterior import Posterior

CHECKPOINT = "checkpoint.pt"
# Every checkpoint file a run may hold, the final one first (``--method snr`` has a dense phase).
CHECKPOINT_FILES = (CHECKPOINT, "dense.pt")


@dataclass
class TrainedRun:
    """What a recipe hands back to the CLI.

    posterior: the trained posterior (predictions and active-weight counts come from it);
    history: one dict per epoch (written to history.csv; a training curve is drawn if it has "loss");
    train_flops: multiply-adds of the whole training run (DESIGN.md's counting);
    metrics: extra flat keys for metrics.json (e.g. the accuracy before pruning).
    """

    posterior: Posterior
    history: list[dict[str, Any]]
    train_flops: float
    metrics: dict[str, Any] = field(default_factory=dict)


def training_data(config: dict[str, Any], dataset: Any) -> Any:
    """What a recipe trains on: the train split in memory (fit and em_sghmc shuffle it themselves), or, with
    ``--augment`` or ``--workers N`` > 0, a seeded ``DataLoader`` over it that augments colour images by random
    crops and flips and reads batches in N worker processes (``loaders.training_loader``)."""
    if not config.get("augment") and not config.get("workers"):
        return dataset.train
    from ..loaders import training_loader

    return training_loader(dataset.train, config["batch_size"], augment=bool(config.get("augment")),
                           workers=int(config.get("workers") or 0), seed=config["seed"])


def recipe(method: str) -> ModuleType:
    """The recipe module of ``--method``; a ValueError names the available ones."""
    from . import em_sghmc, snr, ssvi, vi  # here, not at the top: the recipes import TrainedRun from this module

    recipes = {"vi": vi, "snr": snr, "ssvi": ssvi, "em-sghmc": em_sghmc}
    if method not in recipes:
        raise ValueError(f"method {method!r} is not available; choose one of: {', '.join(recipes)}")
    return recipes[method]
