"""The one list of ``pyro-sparse train`` options, and what ``--resume`` may and may not change.

Every option is of one kind:

- ``DEFINES``: it defines the run (the network, the data, the prior, the seed, the method's
  settings ...). ``--resume`` with another value is refused: the checkpoint holds a different run.
- ``SCHEDULE``: how long or how fast to go on (``--epochs``, ``--lr`` ...). Where the method can apply a
  new value to the rest of the run (its recipe lists the option in ``CHANGEABLE_ON_RESUME``), ``--resume``
  applies it from the next epoch on and records the change; elsewhere it is refused like ``DEFINES``.
- ``OUTPUT``: where and how the run is read and reported (``--device``, ``--data-root``, ``--samples``
  for prediction, ``--out`` ...). Never compared.

A recipe may also name options that define its run although they are ``OUTPUT`` elsewhere
(``ALSO_DEFINES``: for em-sghmc, ``--samples`` is how many draws each chain keeps).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

DEFINES, SCHEDULE, OUTPUT = "defines", "schedule", "output"

RUN_OPTIONS: dict[str, str] = {
    "method": DEFINES,
    "net": DEFINES,
    "data": DEFINES,
    "hidden": DEFINES,
    "prior": DEFINES,
    "prior_scale": DEFINES,
    "spike_scale": DEFINES,
    "inclusion": DEFINES,
    "batch_size": DEFINES,
    "seed": DEFINES,
    "warmup_epochs": DEFINES,
    "sparsity": DEFINES,
    "structure": DEFINES,
    "density": DEFINES,
    "update_every": DEFINES,
    "chains": DEFINES,
    "augment": DEFINES,
    "precision": DEFINES,
    "finetune_epochs": SCHEDULE,
    "epochs": SCHEDULE,
    "lr": SCHEDULE,
    "kl_weight": SCHEDULE,
    "finetune_lr": SCHEDULE,
    "samples": OUTPUT,
    "device": OUTPUT,
    "workers": OUTPUT,
    "data_root": OUTPUT,
    "out": OUTPUT,
    "resume": OUTPUT,
    "overwrite": OUTPUT,
}

# Options that only some methods read: the CLI rejects them for the others (recipe.OPTIONS).
METHOD_OPTIONS = ("sparsity", "density", "chains", "finetune_epochs", "finetune_lr", "update_every", "kl_weight",
                  "warmup_epochs", "precision", "structure")


def flag(option: str) -> str:
    """The command-line spelling of a configuration key: ``"kl_weight"`` -> ``"--kl-weight"``."""
    return "--" + option.replace("_", "-")


def _shown(value: Any) -> str:
    if value is None:
        return "(not given)"
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def resume_changes(saved: Mapping[str, Any], config: Mapping[str, Any], recipe: ModuleType,
                   where: str) -> list[str]:
    """Compare the configuration of a checkpoint with the one ``--resume`` was called with.

    Args:
        saved: the configuration stored in the run's checkpoint.
        config: this command's configuration.
        recipe: the method's recipe module (``CHANGEABLE_ON_RESUME``, ``ALSO_DEFINES``).
        where: the output folder, for the message.

    Returns:
        one line per schedule option that changes legitimately, e.g. ``"lr 0.005 -> 0.01"``.

    Raises:
        ValueError: an option that defines the run differs (naming the option and both values).
    """
    changeable = getattr(recipe, "CHANGEABLE_ON_RESUME", frozenset())
    also_defines = getattr(recipe, "ALSO_DEFINES", frozenset())
    changes = []
    for option, kind in RUN_OPTIONS.items():
        if kind == OUTPUT and option not in also_defines:
            continue
        before, now = saved.get(option), config.get(option)
        if before == now:
            continue
        if kind == SCHEDULE and option in changeable and now is not None:
            changes.append(f"{option} {_shown(before)} -> {_shown(now)}")
            continue
        allowed = ", ".join(flag(o) for o in sorted(changeable)) or "none"
        raise ValueError(
            f"--resume: {where} was trained with {flag(option)} {_shown(before)}, this command gives "
            f"{_shown(now)}; --method {config.get('method')} cannot change it on resume (it can change: "
            f"{allowed}); repeat the original value, or train a new run in another --out"
        )
    return changes


__all__ = ["DEFINES", "METHOD_OPTIONS", "OUTPUT", "RUN_OPTIONS", "SCHEDULE", "flag", "resume_changes"]
