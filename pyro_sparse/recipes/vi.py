"""``--method vi``: dense mean-field VI with the fused ELBO.

Defaults (see ``guides.meanfield.DEFAULT_INIT_SCALE`` and ``infer.svi.SCALE_LR_FACTOR``): σ starts at
1e-3, Adam's lr 5e-3 for μ and ρ, no KL warm-up, the closed-form KL. history.csv has ``mean_sigma`` and
``mean_sigma[<site>]`` per epoch: σ has converged when they have stopped moving. metrics.json records
``init_scale``, ``scale_lr`` and ``kl_estimator``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data import Dataset, as_tensors
from ..evaluation import training_flops_per_example
from ..guides.meanfield import MeanField
from ..infer.svi import History, fit
from ..model import BayesianNetwork
from ..posterior import Posterior
from . import CHECKPOINT, TrainedRun, training_data

DEFAULT_LR = 5e-3  # Adam's learning rate
OPTIONS: frozenset[str] = frozenset({"kl_weight", "warmup_epochs", "precision"})
CHANGEABLE_ON_RESUME: frozenset[str] = frozenset({"epochs", "lr", "kl_weight"})


def train(config: dict[str, Any], model: BayesianNetwork, dataset: Dataset, out: Path) -> TrainedRun:
    guide = MeanField(model)
    history = fit(
        model, guide, training_data(config, dataset), epochs=config["epochs"], batch_size=config["batch_size"],
        lr=config["lr"], kl_weight=config["kl_weight"], warmup_epochs=config["warmup_epochs"], device=config["device"],
        seed=config["seed"], checkpoint=out / CHECKPOINT, resume=config["resume"], metadata=config,
        precision=config.get("precision") or "fp32",
    )
    x_train, _ = as_tensors(dataset.train)
    per_example = training_flops_per_example(model, guide.active_counts(), x_train)
    return TrainedRun(Posterior.from_guide(model, guide), history, per_example * len(x_train) * len(history),
                      variational_settings(guide, history))


def variational_settings(guide: MeanField, history: History) -> dict[str, Any]:
    """metrics.json keys of a fit run: the guide's initial σ, the last epoch's ρ learning rate, the KL estimator."""
    last = history[-1] if history else {}
    return {"init_scale": guide.init_scale, "scale_lr": last.get("scale_lr"), "kl_estimator": last.get("kl_estimator")}


def restore(config: dict[str, Any], model: BayesianNetwork, saved: dict[str, Any]) -> Posterior:
    guide = MeanField(model)
    model.load_state_dict(saved["model"])
    guide.load_state_dict(saved["guide"])
    return Posterior.from_guide(model, guide)
