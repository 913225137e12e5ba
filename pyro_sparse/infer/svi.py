"""``fit``: the training loop for the mean-field guides (KL weight and warm-up, callbacks,
progress bar, atomic checkpoints with exact resume)."""

from __future__ import annotations

import csv
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import checkpoint as checkpoints
from ..data import as_tensors
from ..guides.meanfield import MeanField
from ..model import BayesianNetwork
from .elbo import ElboTerms, negative_elbo


class History(list):
    """One dict per epoch: epoch, loss (−ELBO per example), nll (per example), kl (nats, total),
    kl_factor, seconds (training time so far), plus whatever callbacks recorded."""

    def column(self, key: str) -> list[Any]:
        return [record.get(key) for record in self]

    def to_csv(self, path: str | os.PathLike) -> None:
        keys = list(dict.fromkeys(key for record in self for key in record))
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self)


@dataclass
class TrainingState:
    """What callbacks and guide hooks see. ``record`` entries are added to the epoch's history."""

    model: BayesianNetwork
    guide: MeanField
    optimizer: torch.optim.Optimizer
    epoch: int
    step: int
    global_step: int
    steps_per_epoch: int
    epochs: int
    batch: tuple[torch.Tensor, torch.Tensor] | None = None
    terms: ElboTerms | None = None
    history: History = field(default_factory=History)
    record: dict[str, Any] = field(default_factory=dict)


Callback = Callable[[TrainingState], None] | Any


def _hooks(callbacks: Iterable[Callback], name: str) -> list[Callable[[TrainingState], None]]:
    hooks = []
    for callback in callbacks:
        hook = getattr(callback, name, None)
        if hook is None and name == "on_epoch_end" and callable(callback):
            hook = callback
        if hook is not None:
            hooks.append(hook)
    return hooks


def _check_positive(name: str, value: float, integer: bool = False, allow_zero: bool = False) -> None:
    bad = not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value)
    bad = bad or (integer and int(value) != value) or value < 0 or (value == 0 and not allow_zero)
    if bad:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind} {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def make_adam(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam, fused into one kernel per step where this torch build supports it (several times faster
    than the per-tensor loop on CPU)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def fit(
    model: BayesianNetwork,
    guide: MeanField,
    data,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 5e-3,
    kl_weight: float = 1.0,
    warmup_epochs: int = 0,
    callbacks: Iterable[Callback] = (),
    device: str | torch.device | None = None,
    seed: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool | None = None,
    metadata: dict[str, Any] | None = None,
) -> History:
    """Train ``guide`` (and the model's deterministic parameters) by maximising the ELBO.

    Args:
        model: the BayesianNetwork.
        guide: a MeanField guide (or one of its subclasses) of ``model``.
        data: training data: (x, y) tensors, a TensorDataset or a ``ps.data.Dataset`` (its train split).
        epochs, batch_size, lr: the Adam schedule.
        kl_weight: β, the weight of the KL term (1 = the ELBO; < 1 is a "cold" posterior).
        warmup_epochs: ramp β linearly from 0 to ``kl_weight`` over this many epochs (0 = none).
        callbacks: objects with ``on_step_end(state)`` and/or ``on_epoch_end(state)``; a plain
            callable is called at each epoch end. The guide's own hooks run first.
        device: where to train ("cpu", "cuda", ...); default: where the guide's parameters are.
        seed: seeds the shuffling and the Monte Carlo noise (default: drawn from torch's RNG).
        checkpoint: a path; the full training state is written there atomically after every epoch.
        resume: continue from ``checkpoint`` if it exists (the result equals an uninterrupted run).
        progress: show a tqdm progress bar (default: when stderr is a terminal).
        metadata: saved in the checkpoint under "metadata" (e.g. how to rebuild the model).

    Returns:
        the History (one record per epoch, including the epochs before a resume).
    """
    _check_positive("epochs", epochs, integer=True)
    _check_positive("batch_size", batch_size, integer=True)
    _check_positive("lr", lr)
    _check_positive("kl_weight", kl_weight, allow_zero=True)
    _check_positive("warmup_epochs", warmup_epochs, integer=True, allow_zero=True)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    x, y = as_tensors(data)
    model.check_batch(x, y)
    if len(x) != model.dataset_size:
        warnings.warn(
            f"fit got {len(x)} training examples but model.dataset_size is {model.dataset_size}: the "
            f"likelihood of each batch of B is scaled by {model.dataset_size} / B",
            stacklevel=2,
        )

    device = torch.device(device) if device is not None else next(guide.parameters()).device
    model.to(device)
    guide.to(device)
    x, y = x.to(device), y.to(device)
    optimizer = make_adam([*guide.parameters(), *model.parameters()], lr)
    shuffle = torch.Generator()
    shuffle.manual_seed(int(torch.randint(2**62, ()).item()) if seed is None else seed)
    if seed is not None:
        torch.manual_seed(seed)

    history, start_epoch, train_seconds = History(), 0, 0.0
    if resume and Path(checkpoint).is_file():
        saved = checkpoints.load(checkpoint, map_location=device)
        model.load_state_dict(saved["model"])
        guide.load_state_dict(saved["guide"])
        optimizer.load_state_dict(saved["optimizer"])
        shuffle.set_state(saved["shuffle_rng"])
        torch.set_rng_state(saved["torch_rng"])
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        history, start_epoch = History(saved["history"]), saved["epoch"]
        train_seconds = history[-1]["seconds"] if history else 0.0

    n, steps_per_epoch = len(x), math.ceil(len(x) / batch_size)
    step_hooks = _hooks([guide, *callbacks], "on_step_end")
    epoch_hooks = _hooks([guide, *callbacks], "on_epoch_end")
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(range(start_epoch, epochs), initial=start_epoch, total=epochs, disable=not show, desc="fit")
    model.train()
    guide.train()
    for epoch in bar:
        state = TrainingState(model, guide, optimizer, epoch, 0, epoch * steps_per_epoch, steps_per_epoch, epochs,
                              history=history)
        totals = torch.zeros(3, device=device)
        started = time.perf_counter()
        order = torch.randperm(n, generator=shuffle).to(device)
        for step in range(steps_per_epoch):
            index = order[step * batch_size : (step + 1) * batch_size]
            progress_in_epochs = epoch + step / steps_per_epoch
            beta = kl_weight * (min(1.0, progress_in_epochs / warmup_epochs) if warmup_epochs else 1.0)
            terms = negative_elbo(model, guide, x[index], y[index], kl_weight=beta)
            optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
            optimizer.step()
            with torch.no_grad():
                totals += torch.stack([terms.loss.detach(), terms.nll, terms.kl]) * len(index)
            state.step, state.global_step = step, epoch * steps_per_epoch + step
            state.batch, state.terms = (x[index], y[index]), terms
            for hook in step_hooks:
                hook(state)
        train_seconds += time.perf_counter() - started
        loss, nll, kl = (totals / n).tolist()
        if not math.isfinite(loss):
            raise RuntimeError(f"training diverged: the loss is {loss} in epoch {epoch + 1}; lower the learning rate")
        state.batch = state.terms = None
        for hook in epoch_hooks:
            hook(state)
        history.append({"epoch": epoch + 1, "loss": loss, "nll": nll, "kl": kl, "kl_factor": beta,
                        "seconds": train_seconds, **state.record})
        bar.set_postfix(loss=f"{loss:.4f}", nll=f"{nll:.4f}", kl=f"{kl:.4g}")
        if checkpoint is not None:
            checkpoints.save(
                {"model": model.state_dict(), "guide": guide.state_dict(), "optimizer": optimizer.state_dict(),
                 "shuffle_rng": shuffle.get_state(), "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                 "history": list(history), "epoch": epoch + 1, "metadata": metadata or {}},
                checkpoint,
            )
    bar.close()
    return history
