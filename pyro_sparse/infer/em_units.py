"""Where a network's units lie in EM-SGHMC's flat parameter vector (``em_sghmc(structure="unit")``).

The sampler holds every parameter of a ``BayesianNetwork`` in one flat vector (``SGHMCState.layout``:
the Bayesian sites first, W coordinates, then the deterministic parameters by model path, "net.0.bias").
For the group spike-and-slab, EM needs, for each removable unit k (``units.unit_groups``: an output
neuron of a Linear or channel of a convolution, or channels tied by a residual addition):

- its *incoming weights*: the rows k of the group's Bayesian producer weights (site coordinates), which
  share the unit's inclusion variable z_k;
- everything its removal zeroes: those rows, the rows of deterministic producer weights, the producers'
  biases, the BatchNorm γ and β of channel k, and the readers' columns k (input columns of the next
  Linear, input channels of the next convolution, the H·W columns of channel k after a flatten);
- its *outgoing weights*: the readers' columns that are Bayesian sites (the pruning score uses them).

``UnitLayout`` holds these as index tensors into the flat vector, so the E-step, the statistics and the
removal are a few ``index_add`` / gathers whatever the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnitAnalysisError
from ..model import BayesianNetwork
from ..units import UnitGroup


@dataclass
class UnitLayout:
    """The units EM can remove and their coordinates in the flat vector (P,) of a chain.

    names, sizes: the unit groups (``units.UnitGroup.name``) and their widths, in network order; unit
        indices run over the groups in that order, U = Σ sizes.
    incoming, incoming_unit: (M,) long: site coordinates of the units' incoming weights and their unit.
    free: (W,) bool: site coordinates in no unit's incoming weights (their own inclusion variable).
    removed, removed_unit: (R,) long: the coordinates (of all P) a unit's removal zeroes, and its unit
        (a coordinate may appear for two units: a row of one group's producer and a column of another's).
    outgoing, outgoing_unit: (O,) long: site coordinates of the readers' columns, and their unit.
    """

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    incoming: torch.Tensor
    incoming_unit: torch.Tensor
    free: torch.Tensor
    removed: torch.Tensor
    removed_unit: torch.Tensor
    outgoing: torch.Tensor
    outgoing_unit: torch.Tensor

    @property
    def num_units(self) -> int:
        return sum(self.sizes)

    @property
    def group_index(self) -> torch.Tensor:
        """(U,) long: the group of each unit."""
        sizes = torch.tensor(self.sizes, device=self.incoming.device)
        return torch.repeat_interleave(torch.arange(len(self.sizes), device=sizes.device), sizes)

    def unit_sum(self, values: torch.Tensor, coordinates: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """Σ of ``values`` (W,) over each unit's ``coordinates`` (with ``units`` their unit): (U,)."""
        zeros = torch.zeros(self.num_units, dtype=values.dtype, device=values.device)
        return zeros.index_add_(0, units, values[coordinates])

    def keep_positions(self, keep: torch.Tensor, size: int) -> torch.Tensor:
        """(size,) bool over the whole flat vector: False at every coordinate a removed unit (``keep`` (U,)
        bool False) takes with it."""
        removed = torch.zeros(size, dtype=torch.float32, device=keep.device)
        removed.index_add_(0, self.removed, (~keep)[self.removed_unit].to(torch.float32))
        return removed == 0


def _parameter_places(model: BayesianNetwork, layout) -> dict[tuple[str, str], tuple[int, torch.Size, bool]]:
    """(module path, attribute) -> (offset in the flat vector, shape, is a Bayesian site) of every
    network parameter in ``layout`` ((name, shape) per parameter, in order)."""
    places, offset = {}, 0
    for name, shape in layout:
        if name in model.sites:
            site = model.sites[name]
            places[(site.module_path, site.attribute)] = (offset, shape, True)
        elif name.startswith("net."):
            module_path, _, attribute = name.removeprefix("net.").rpartition(".")
            places[(module_path, attribute)] = (offset, shape, False)
        offset += shape.numel()
    return places


def _rows(offset: int, shape: torch.Size, first_unit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates of every row k (dim 0) of a tensor at ``offset`` and the unit first_unit + k of each."""
    coordinates = offset + torch.arange(shape.numel()).view(shape[0], -1)
    units = (first_unit + torch.arange(shape[0])).unsqueeze(1).expand_as(coordinates)
    return coordinates.reshape(-1), units.reshape(-1)


def _columns(offset: int, shape: torch.Size, first_unit: int, size: int, flattened: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates of a reader weight's input columns / channels (dim 1) and the unit each reads."""
    coordinates = (offset + torch.arange(shape.numel()).view(shape)).transpose(0, 1).reshape(shape[1], -1)
    repeat = shape[1] // size if flattened else 1
    units = (first_unit + torch.arange(size).repeat_interleave(repeat)).unsqueeze(1).expand_as(coordinates)
    return coordinates.reshape(-1), units.reshape(-1)


def _has_bayesian_producer(group: UnitGroup, places) -> bool:
    return any(places.get((path, "weight"), (0, None, False))[2] for path in group.producers)


def unit_layout(model: BayesianNetwork, layout, device: torch.device | str = "cpu") -> UnitLayout:
    """The ``UnitLayout`` of ``model``'s removable unit groups with a Bayesian producer weight, for a
    chain whose flat vector has ``layout`` ((name, shape) per parameter, sites first).

    Raises ``errors.UnitAnalysisError`` when the network has no such group (or cannot be traced).
    """
    places = _parameter_places(model, layout)
    groups = [group for group in model.unit_groups().values() if _has_bayesian_producer(group, places)]
    if not groups:
        raise UnitAnalysisError(
            f"{type(model.net).__name__} has no removable units with Bayesian incoming weights (a unit is an output "
            "of a Linear or convolution whose outputs feed another layer, not the network's output): use "
            "structure='weight'"
        )
    num_sites = sum(shape.numel() for name, shape in layout if name in model.sites)
    pieces: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"incoming": [], "removed": [], "outgoing": []}
    first = 0
    for group in groups:
        for path in (*group.producers, *group.norms):
            for attribute in ("weight", "bias"):
                place = places.get((path, attribute))
                if place is None:
                    continue
                offset, shape, is_site = place
                rows = _rows(offset, shape, first)
                pieces["removed"].append(rows)
                if is_site and attribute == "weight" and path in group.producers:
                    pieces["incoming"].append(rows)
        for reader in group.readers:
            place = places.get((reader.module_path, "weight"))
            if place is None:
                continue
            offset, shape, is_site = place
            columns = _columns(offset, shape, first, group.size, reader.flattened)
            pieces["removed"].append(columns)
            if is_site:
                pieces["outgoing"].append(columns)
        first += group.size

    def joined(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not pieces[key]:
            return torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.long, device=device)
        return tuple(torch.cat([piece[i] for piece in pieces[key]]).to(device) for i in (0, 1))

    incoming, incoming_unit = joined("incoming")
    free = torch.ones(num_sites, dtype=torch.bool, device=device)
    free[incoming] = False
    return UnitLayout(tuple(group.name for group in groups), tuple(group.size for group in groups), incoming,
                      incoming_unit, free, *joined("removed"), *joined("outgoing"))
