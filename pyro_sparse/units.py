"""Units of a network and what removing one takes with it: structured (unit / channel) sparsity.

A *unit* is one output of a ``Linear`` layer (a neuron: a row of its weight) or one output channel
of a convolution (a slice of its weight along dim 0). Removing unit k of a layer removes

- its incoming weights (row k of the weight) and its bias,
- the matching channel of every ``BatchNorm`` that normalises the layer's output (its γ, β and
  running statistics),
- the matching inputs of every layer that reads the unit (column k of the next Linear, input
  channel k of the next convolution; after a ``Flatten`` of a (C, H, W) map, the H·W columns of
  channel k),

and leaves a smaller *dense* network that computes exactly the same function: the unit's output is
exactly zero (weights and bias zero, BatchNorm γ = β = 0), every operation between it and its
readers maps zero to zero (ReLU, GELU, tanh, pooling, dropout, flatten), and its readers' weights
on it are zero too, so nothing reads it and its weights can go. (During training, a Linear layer
with local reparameterization adds noise of standard deviation √(x²σ² + 1e-16) ≈ 1e-8 to a removed
unit's zero pre-activation, for finite gradients; its readers' weights on it are zero, so nothing
downstream sees it.)

``unit_groups(net)`` finds the units of a network by tracing it with ``torch.fx``: a *group* is a
set of channels that must be removed together, the output channels of one layer, or of several
layers tied by a residual addition (``out + shortcut(x)``: channel k of both summands is channel k
of the sum, so all of them go or none). Channels the analysis cannot follow are left alone: those
that reach the network's output (the logits), those that meet an operation that does not map zero
to zero or mixes channels (a sigmoid, a concatenation, a reshape other than a flatten, adding a
constant, grouped convolutions, BatchNorm without affine parameters), and every layer of a network
that ``torch.fx`` cannot trace (data-dependent control flow) — ``unit_groups`` then returns no
groups and says why in ``UnitAnalysisError``.

``slice_network(net, groups, keep)`` builds the smaller network (a deep copy with fewer rows,
columns and channels); ``weight_index`` says which rows and columns of each weight it keeps, so
weights from anywhere (a guide's μ and σ², a sampler's draws) can be gathered to its shapes.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .errors import UnitAnalysisError

_LINEAR, _CONV = "linear", "conv"

# Modules that map 0 to 0 channel by channel and keep the channel dimension where it is
_ZERO_PRESERVING_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Hardswish,
    nn.Softsign, nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_ZERO_PRESERVING_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, torch.tanh, F.tanh,
    F.hardswish, F.dropout, F.dropout1d, F.dropout2d, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d,
    F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d,
}
_ZERO_PRESERVING_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone"}
_ADDITIONS = {operator.add, operator.iadd, torch.add}
_FLATTENS = {torch.flatten}
_RESHAPES = {"flatten", "view", "reshape"}
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class Reader:
    """A layer that reads a group's channels: its module path and how its inputs index them.

    ``flattened``: the layer is a Linear reading a flattened (C, ...) map, so channel k is the block
    of columns k·r ... k·r + r − 1, r = in_features / C (``repeat``); otherwise channel k is its
    input column (Linear) or input channel (convolution) k.
    """

    module_path: str
    flattened: bool = False


@dataclass(frozen=True)
class UnitGroup:
    """Channels removed together: ``size`` units, written by ``producers`` (module paths of Linear /
    Conv layers whose output dim 0 of the weight are these units), normalised by ``norms``
    (BatchNorm module paths) and read by ``readers``. ``name`` is the first producer's path."""

    name: str
    size: int
    producers: tuple[str, ...]
    norms: tuple[str, ...] = ()
    readers: tuple[Reader, ...] = ()


@dataclass
class _Group:
    size: int
    producers: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    readers: list[Reader] = field(default_factory=list)
    refused: str | None = None


@dataclass(frozen=True)
class _Channels:
    """What a traced value carries: a group's channels in layout "last" (a Linear's (B, C) output),
    "dim1" (a convolution's (B, C, ...) map) or "flat" (such a map flattened to (B, C·r))."""

    group: int
    layout: str


class _LayerTracer(torch.fx.Tracer):
    """``torch.fx``'s tracer with every Linear, convolution and BatchNorm a leaf, whatever its class
    (a Bayesian network's Linear layers are subclasses made at run time)."""

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        if isinstance(module, nn.Linear | nn.modules.conv._ConvNd | nn.modules.batchnorm._BatchNorm):
            return True
        return super().is_leaf_module(module, qualname)


class _Analysis:
    """One pass over the traced graph, propagating which group's channels each value carries."""

    def __init__(self, net: nn.Module):
        self.modules = dict(net.named_modules())
        self.groups: list[_Group] = []
        self.parent: list[int] = []
        self.producer_group: dict[str, int] = {}
        self.values: dict[torch.fx.Node, _Channels | None] = {}

    # -- union-find over groups (tied by additions or by a layer called twice) --
    def find(self, group: int) -> int:
        while self.parent[group] != group:
            self.parent[group] = self.parent[self.parent[group]]
            group = self.parent[group]
        return group

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        first, second = self.groups[a], self.groups[b]
        if first.size != second.size:
            first.refused = first.refused or "summands of different widths"
        first.producers += [p for p in second.producers if p not in first.producers]
        first.norms += [n for n in second.norms if n not in first.norms]
        first.readers += [r for r in second.readers if r not in first.readers]
        first.refused = first.refused or second.refused
        self.parent[b] = a
        return a

    def refuse(self, value: _Channels | None, why: str) -> None:
        if value is not None:
            group = self.groups[self.find(value.group)]
            group.refused = group.refused or why

    def new_group(self, path: str, size: int) -> int:
        if path in self.producer_group:  # a layer called twice writes the same units
            return self.find(self.producer_group[path])
        self.groups.append(_Group(size, [path]))
        self.parent.append(len(self.groups) - 1)
        self.producer_group[path] = len(self.groups) - 1
        return len(self.groups) - 1

    # -- the pass --
    def run(self, graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            inputs = [self.values.get(arg) for arg in node.all_input_nodes]
            if node.op == "placeholder":
                self.values[node] = None
            elif node.op == "output":
                for value in inputs:
                    self.refuse(value, "reaches the network's output")
            elif node.op == "call_module":
                self.values[node] = self.module_call(node, inputs)
            elif node.op == "call_function":
                self.values[node] = self.function_call(node, inputs)
            elif node.op == "call_method":
                self.values[node] = self.method_call(node, inputs)
            else:  # get_attr: a tensor of the network itself
                self.values[node] = None

    def _refuse_all(self, inputs: list[_Channels | None], why: str) -> None:
        for value in inputs:
            self.refuse(value, why)

    def read(self, value: _Channels | None, path: str, kind: str) -> None:
        """Record ``path`` (a Linear / conv) as a reader of ``value``'s group."""
        if value is None:
            return
        group = self.groups[self.find(value.group)]
        if kind == _LINEAR and value.layout in ("last", "flat"):
            reader = Reader(path, flattened=value.layout == "flat")
        elif kind == _CONV and value.layout == "dim1":
            reader = Reader(path)
        else:
            self.refuse(value, f"read by {path} in a layout it cannot slice")
            return
        if reader not in group.readers:
            group.readers.append(reader)

    def module_call(self, node: torch.fx.Node, inputs: list[_Channels | None]) -> _Channels | None:
        path = str(node.target)
        module = self.modules[path]
        first = inputs[0] if inputs else None
        if len(node.all_input_nodes) != 1:
            self._refuse_all(inputs, f"{path} takes several inputs")
            return None
        if isinstance(module, nn.Linear):
            self.read(first, path, _LINEAR)
            return _Channels(self.new_group(path, module.out_features), "last")
        if isinstance(module, nn.modules.conv._ConvNd):
            if module.groups != 1 or isinstance(module, nn.modules.conv._ConvTransposeNd):
                self.refuse(first, f"{path} is a grouped or transposed convolution")
                return None
            self.read(first, path, _CONV)
            return _Channels(self.new_group(path, module.out_channels), "dim1")
        if isinstance(module, _NORMS):
            if first is None:
                return None
            if not module.affine:
                self.refuse(first, f"{path} has no affine parameters (a removed channel would not stay zero)")
                return None
            group = self.groups[self.find(first.group)]
            if path not in group.norms:
                group.norms.append(path)
            return first
        if isinstance(module, _ZERO_PRESERVING_MODULES) or (
                isinstance(module, nn.Hardtanh) and module.min_val <= 0 <= module.max_val):  # ReLU6 is one
            return first
        if isinstance(module, nn.Flatten):
            return self.flatten(first, module.start_dim, module.end_dim, path)
        self.refuse(first, f"{path} ({type(module).__name__}) is not known to map zero to zero per channel")
        return None

    def flatten(self, value: _Channels | None, start: int, end: int, where: str) -> _Channels | None:
        if value is None:
            return None
        if start != 1 or end != -1:
            self.refuse(value, f"{where} flattens other dimensions than (C, ...)")
            return None
        return _Channels(value.group, "flat" if value.layout == "dim1" else value.layout)

    def function_call(self, node: torch.fx.Node, inputs: list[_Channels | None]) -> _Channels | None:
        target = node.target
        tracked = [value for value in inputs if value is not None]
        if not tracked:
            return None
        if target in _ADDITIONS:
            tensors = [arg for arg in node.args if isinstance(arg, torch.fx.Node)]
            if len(tensors) != 2 or len(tracked) != 2 or node.kwargs:
                self._refuse_all(inputs, "added to something that is not a traced channel map")
                return None
            first, second = tracked
            if first.layout != second.layout:
                self._refuse_all(inputs, "added in different layouts")
                return None
            return _Channels(self.union(first.group, second.group), first.layout)
        if target in _ZERO_PRESERVING_FUNCTIONS and node.args and node.args[0] is node.all_input_nodes[0] \
                and len(tracked) == 1 and len(node.all_input_nodes) == 1:
            return tracked[0]
        if target in _FLATTENS and len(node.all_input_nodes) == 1:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(tracked[0], start, end, f"torch.flatten ({node.name})")
        self._refuse_all(inputs, f"{getattr(target, '__name__', target)} ({node.name}) is not followed")
        return None

    def method_call(self, node: torch.fx.Node, inputs: list[_Channels | None]) -> _Channels | None:
        value = inputs[0] if inputs else None
        if value is None or node.args[0] is not node.all_input_nodes[0]:
            self._refuse_all(inputs, f"method {node.target} is not followed")
            return None
        others = [self.values.get(arg) for arg in node.all_input_nodes[1:]]
        if node.target == "size" or node.target == "dim":
            return None  # a shape query: no channels flow on
        if any(other is not None for other in others):
            self._refuse_all(inputs, f"method {node.target} mixes channel maps")
            return None
        if node.target in _ZERO_PRESERVING_METHODS:
            return value
        if node.target == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(value, start, end, f"flatten ({node.name})")
        if node.target in _RESHAPES and len(node.args) == 3 and node.args[2] == -1:
            return self.flatten(value, 1, -1, f"{node.target} ({node.name})")  # x.view(x.size(0), -1)
        self.refuse(value, f"method {node.target} ({node.name}) is not followed")
        return None

    def result(self) -> dict[str, UnitGroup]:
        """The groups that can be removed, in network order, each member list in network order."""
        order = {path: position for position, path in enumerate(self.modules)}
        groups = []
        for index, group in enumerate(self.groups):
            if self.find(index) != index or group.refused:
                continue
            if any(not self._readable(group, reader) for reader in group.readers):
                continue
            producers = sorted(group.producers, key=order.__getitem__)
            groups.append(UnitGroup(producers[0], group.size, tuple(producers),
                                    tuple(sorted(group.norms, key=order.__getitem__)),
                                    tuple(sorted(group.readers, key=lambda r: order[r.module_path]))))
        return {group.name: group for group in sorted(groups, key=lambda g: order[g.name])}

    def _readable(self, group: _Group, reader: Reader) -> bool:
        module = self.modules[reader.module_path]
        width = module.in_features if isinstance(module, nn.Linear) else module.in_channels
        return width % group.size == 0 if reader.flattened else width == group.size


def unit_groups(net: nn.Module) -> dict[str, UnitGroup]:
    """The removable unit groups of ``net``, by name (the first producer's module path).

    Raises ``UnitAnalysisError`` when ``torch.fx`` cannot trace the network.
    """
    try:
        graph = _LayerTracer().trace(net)
    except Exception as error:  # torch.fx raises many kinds (TraceError, TypeError, ...)
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UnitAnalysisError(
            f"cannot find the units of {type(net).__name__}: torch.fx could not trace it ({first_line}); "
            "structured sparsity needs a network without data-dependent control flow: use weight-level "
            "sparsity (structure='weight') for this network"
        ) from None
    analysis = _Analysis(net)
    analysis.run(graph)
    return analysis.result()


# ----------------------------------------------------------------------------------------------
# Index bookkeeping
# ----------------------------------------------------------------------------------------------
def kept_indices(keep: torch.Tensor) -> torch.Tensor:
    """Bool keep mask (C,) -> the sorted long indices of the kept units (k,)."""
    return keep.to(torch.bool).nonzero().squeeze(1)


def reader_columns(reader: Reader, width: int, size: int, kept: torch.Tensor) -> torch.Tensor:
    """The input columns / channels (long, sorted) of a reader of ``width`` inputs that read the
    ``kept`` units of a group of ``size``."""
    if not reader.flattened:
        return kept
    repeat = width // size
    return (kept.unsqueeze(1) * repeat + torch.arange(repeat, device=kept.device)).reshape(-1)


def weight_index(net: nn.Module, groups: Mapping[str, UnitGroup], keep: Mapping[str, torch.Tensor]
                 ) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Module path -> (kept output rows (long) or None, kept input columns / channels (long) or None)
    of every Linear / conv layer that ``keep`` (group name -> bool (size,)) changes."""
    index: dict[str, list[torch.Tensor | None]] = {}
    for name, mask in keep.items():
        group = groups[name]
        kept = kept_indices(mask)
        for path in group.producers:
            index.setdefault(path, [None, None])[0] = kept
        for reader in group.readers:
            module = net.get_submodule(reader.module_path)
            width = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            index.setdefault(reader.module_path, [None, None])[1] = reader_columns(reader, width, group.size, kept)
    return {path: (rows, columns) for path, (rows, columns) in index.items()}


def weight_masks(net: nn.Module, groups: Mapping[str, UnitGroup], keep: Mapping[str, torch.Tensor],
                 paths: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Bool masks (the weight's shape, True = may stay) of the weights ``keep`` removes, for the
    weight parameters named in ``paths`` (a site name -> its module path)."""
    masks = {}
    for name, path in paths.items():
        module = net.get_submodule(path)
        weight = module.weight
        rows = columns = None
        for group_name, mask in keep.items():
            group = groups[group_name]
            if path in group.producers:
                rows = mask.to(torch.bool) if rows is None else rows & mask.to(torch.bool)
            for reader in group.readers:
                if reader.module_path == path:
                    repeat = (weight.shape[1] // group.size) if reader.flattened else 1
                    columns = mask.to(torch.bool).repeat_interleave(repeat)
        if rows is None and columns is None:
            continue
        full = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
        view = (-1,) + (1,) * (weight.dim() - 1)
        if rows is not None:
            full &= rows.to(weight.device).view(view)
        if columns is not None:
            full &= columns.to(weight.device).view((1, -1) + (1,) * (weight.dim() - 2))
        masks[name] = full
    return masks


def parameter_masks(net: nn.Module, groups: Mapping[str, UnitGroup], keep: Mapping[str, torch.Tensor],
                    sites: Mapping[str, tuple[str, str]]) -> dict[str, torch.Tensor]:
    """``weight_masks`` for any parameters: ``sites`` maps a name to (module path, attribute). A
    producer's or reader's weight is masked by rows / columns; a producer's bias and a BatchNorm's
    parameters (any attribute of a ``norms`` module) by the keep mask along dim 0."""
    masks = weight_masks(net, groups, keep, {name: path for name, (path, attribute) in sites.items()
                                             if attribute == "weight"})
    for name, (path, attribute) in sites.items():
        for group_name, mask in keep.items():
            group = groups[group_name]
            if not ((path in group.producers and attribute != "weight") or path in group.norms):
                continue
            tensor = getattr(net.get_submodule(path), attribute)
            shaped = mask.to(torch.bool).to(tensor.device).view((-1,) + (1,) * (tensor.dim() - 1)).expand(tensor.shape)
            masks[name] = shaped.clone() if name not in masks else masks[name] & shaped
    return masks


def zeroed_parameters(net: nn.Module, groups: Mapping[str, UnitGroup], keep: Mapping[str, torch.Tensor],
                      skip: set[str] | frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Parameter path -> the parameter times the keep mask, for every bias, BatchNorm γ / β and
    (unless in ``skip``) producer weight of the removed units, and (unless in ``skip``) the readers'
    weight columns / input channels of them: substituted in a forward pass, they make every removed
    unit's output exactly zero and nothing read from it (with zero gradient to the removed entries).
    ``skip``: the Bayesian parameters, which the guide masks."""
    paths = {}
    for name in keep:
        group = groups[name]
        for path in (*group.producers, *group.norms):
            for attribute in ("weight", "bias"):
                paths[f"{path}.{attribute}" if path else attribute] = (path, attribute)
        for reader in group.readers:
            paths[f"{reader.module_path}.weight" if reader.module_path else "weight"] = (reader.module_path, "weight")
    paths = {key: slot for key, slot in paths.items() if key not in skip
             and getattr(net.get_submodule(slot[0]), slot[1], None) is not None}
    masks = parameter_masks(net, groups, keep, paths)
    return {key: getattr(net.get_submodule(paths[key][0]), paths[key][1]) * mask.to(
        getattr(net.get_submodule(paths[key][0]), paths[key][1]).dtype) for key, mask in masks.items()}


# ----------------------------------------------------------------------------------------------
# The smaller network
# ----------------------------------------------------------------------------------------------
def _take(module: nn.Module, attribute: str, dim: int, index: torch.Tensor) -> None:
    """Replace ``module.<attribute>`` (a parameter or a buffer) by its slice along ``dim``."""
    tensor = getattr(module, attribute, None)
    if tensor is None:
        return
    sliced = tensor.detach().index_select(dim, index.to(tensor.device)).clone()
    if attribute in module._parameters:
        module._parameters[attribute] = nn.Parameter(sliced, requires_grad=tensor.requires_grad)
    else:
        module._buffers[attribute] = sliced


def slice_network(net: nn.Module, groups: Mapping[str, UnitGroup], keep: Mapping[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``net`` without the removed units (``keep``: group name -> bool (size,), False =
    removed): fewer output rows / channels in producers and BatchNorms, fewer input columns /
    channels in readers. Computes what ``net`` computes with the removed units' outputs zero."""
    small = copy.deepcopy(net)
    for path, (rows, columns) in weight_index(net, groups, keep).items():
        module = small.get_submodule(path)
        if rows is not None:
            _take(module, "weight", 0, rows)
            _take(module, "bias", 0, rows)
            if isinstance(module, nn.Linear):
                module.out_features = rows.numel()
            else:
                module.out_channels = rows.numel()
        if columns is not None:
            _take(module, "weight", 1, columns)
            if isinstance(module, nn.Linear):
                module.in_features = columns.numel()
            else:
                module.in_channels = columns.numel()
    for name, mask in keep.items():
        kept = kept_indices(mask)
        for path in groups[name].norms:
            norm = small.get_submodule(path)
            for attribute in ("weight", "bias", "running_mean", "running_var"):
                _take(norm, attribute, 0, kept)
            norm.num_features = kept.numel()
    return small


def count_units(groups: Mapping[str, UnitGroup], keep: Mapping[str, torch.Tensor] | None = None) -> tuple[int, int]:
    """(units in all removable groups, units still active under ``keep``)."""
    total = sum(group.size for group in groups.values())
    removed = sum(int((~mask.to(torch.bool)).sum()) for mask in (keep or {}).values())
    return total, total - removed
