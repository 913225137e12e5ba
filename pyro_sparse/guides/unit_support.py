"""The support of unit-level sparse-subspace VI (``SparseSubspace(structure="unit")``): active units
per unit group, and how a move of units changes the stored weights, the model's deterministic
parameters and Adam's state.

The weights of a site touched by unit groups are active on the block (kept rows) × (kept columns):
the rows of its layer's active units, the input columns of the active units it reads. A
``CompactSite`` stores them row-major (its index is the sorted flat positions of the block), so its
μ, ρ (k,) viewed as (rows, columns, ...) *are* the weights of the smaller network (``infer.compact``
trains on them without a gather). A move of units keeps that order: the values, ρ and Adam's moments
of the weights that stay active are permuted to their new slots, and the new slots restart
(``fresh_adam_start``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..model import BayesianNetwork
from ..units import UnitGroup
from .meanfield import CompactSite


def initial_keep(groups: Mapping[str, UnitGroup], density: float) -> dict[str, torch.Tensor]:
    """A random set of k = max(1, round(density × size)) active units per group: name -> bool (size,)."""
    keep = {}
    for name, group in groups.items():
        k = max(1, round(density * group.size))
        mask = torch.zeros(group.size, dtype=torch.bool)
        mask[torch.randperm(group.size)[:k]] = True
        keep[name] = mask
    return keep


def fan_in_factor(mask: torch.Tensor) -> float:
    """√(fan-in / active fan-in) of a weight whose support ``mask`` (bool, the weight's shape) is a block
    of rows × columns: the factor that keeps the pre-activations' variance of a dense initialisation."""
    rows = int(mask.flatten(1).any(1).sum()) if mask.dim() > 1 else mask.numel()
    active = int(mask.sum())
    if active == 0 or rows == 0:
        return 1.0
    return math.sqrt((mask[0].numel() if mask.dim() > 1 else 1) / (active / rows))


@torch.no_grad()
def move_site(site: CompactSite, mask: torch.Tensor, fresh_loc: torch.Tensor, optimizers: Any) -> torch.Tensor:
    """Move ``site``'s support to ``mask`` (bool, the weight's shape; the same number of active weights),
    in place, keeping the stored order row-major. Weights active before and after keep μ, ρ and
    their Adam moments (permuted with them); new ones start at μ = ``fresh_loc`` (the weight's shape)
    at their positions, ρ = the mean ρ of the kept ones, Adam restarted there. ``optimizers``: a
    function param -> torch optimizer or None. Returns the new slots (long)."""
    from .subspace import fresh_adam_start

    new_index = mask.reshape(-1).nonzero().squeeze(1).to(site.index.device)
    if new_index.numel() != site.index.numel():
        raise ValueError(f"a unit move changed a site's number of active weights ({site.index.numel()} -> "
                         f"{new_index.numel()})")
    slot_of = torch.full((site.shape.numel(),), -1, dtype=torch.long, device=site.index.device)
    slot_of[site.index] = torch.arange(site.index.numel(), device=site.index.device)
    old_slot = slot_of[new_index]
    kept = old_slot >= 0
    source = old_slot.clamp(min=0)
    fresh = (~kept).nonzero().squeeze(1)
    rho_fill = site.rho[old_slot[kept]].mean() if bool(kept.any()) else site.rho.mean()
    site.loc.copy_(torch.where(kept, site.loc[source], fresh_loc.reshape(-1)[new_index].to(site.loc)))
    site.rho.copy_(torch.where(kept, site.rho[source], rho_fill))
    site.index.copy_(new_index)
    for param in (site.loc, site.rho):
        optimizer = optimizers(param)
        state = optimizer.state.get(param) if optimizer is not None else None
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if state and key in state:
                state[key].copy_(state[key][source])
        fresh_adam_start(optimizer, param, fresh, None)
    return fresh


@torch.no_grad()
def reset_units(model: BayesianNetwork, group: UnitGroup, added: torch.Tensor, optimizers: Any) -> None:
    """The model's deterministic parameters of the ``added`` units (long) of ``group``, as a fresh unit's:
    producers' biases 0; BatchNorm γ = 1, β = 0, running mean 0, variance 1; Adam restarted there."""
    from .subspace import fresh_adam_start

    values = []
    for path in group.producers:
        values.append((model.net.get_submodule(path), "bias", 0.0))
    for path in group.norms:
        norm = model.net.get_submodule(path)
        values += [(norm, "weight", 1.0), (norm, "bias", 0.0), (norm, "running_mean", 0.0), (norm, "running_var", 1.0)]
    for module, attribute, value in values:
        tensor = getattr(module, attribute, None)
        bayesian = attribute in module._buffers and not attribute.startswith("running_")  # the guide's
        if tensor is None or bayesian:
            continue
        tensor[added.to(tensor.device)] = value
        if isinstance(tensor, nn.Parameter):
            fresh_adam_start(optimizers(tensor), tensor, added.to(tensor.device), None)
