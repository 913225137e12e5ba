"""Export a trained (pruned) Bayesian network as a plain, small, fast ``torch.nn.Module``.

``export(model, guide)`` gives the network with its posterior-mean weights (exact zeros where
pruned); ``export(model, guide, mode="samples", num_samples=S)`` an ensemble of S sampled sparse
networks for Monte Carlo prediction. Pruned weights are stored sparsely:

- ``SparseLinear``: a Linear layer in compressed-row (CSR) form: the non-zero values, their column
  indices (int16 where the layer has < 32768 inputs) and row offsets. Its gather kernel computes
  y = x Wᵀ with ``embedding_bag`` (a weighted sum of rows of xᵀ per output unit): nnz · B
  multiply-adds instead of out · in · B. Small batches are faster through a dense copy of W, rebuilt
  once and cached in memory; ``layout="auto"`` times both on each layer to find the batch size from
  which the gather kernel wins (torch's own CSR kernels were slower than dense here).
- ``SparseConv``: a convolution whose weight is stored as (values, flat indices) and rebuilt for
  each call (a convolution's cost is in its sliding products, not in its few weights).

``save(module, path, example)`` writes it with ``torch.export``; ``torch.export.load(path).module()`` runs it
with torch alone
(no Pyro, no pyro_sparse). ``storage_bytes`` counts what a module's state takes on disk.
"""

from __future__ import annotations

import copy
import io
import os
import statistics
import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import atomic_write_bytes
from .errors import UnitAnalysisError
from .guides.meanfield import MeanField
from .layers import LocalReparameterization
from .model import BayesianNetwork
from .posterior import Posterior
from .units import count_units, slice_network, weight_index
from .validation import check_count

MODES = ("mean", "samples")
LAYOUTS = ("auto", "dense", "sparse")


def _index_dtype(size: int) -> torch.dtype:
    return torch.int16 if size <= torch.iinfo(torch.int16).max else torch.int32


class SparseLinear(nn.Module):
    """y = x Wᵀ + b, W (out, in) stored in CSR form; x (..., in) -> y (..., out).

    Buffers: ``values`` (nnz,), ``columns`` (nnz,) int16/int32, ``row_offsets`` (out + 1,) int32,
    ``bias`` (out,) or None. Batches of at least ``gather_min_batch`` rows use the gather kernel:
    ``embedding_bag`` over blocks of 128 columns of xᵀ (a block stays in cache while every output
    unit sums its nnz/out rows of it), nnz · B multiply-adds in all. Smaller batches, or all when
    ``gather_min_batch`` is None, use ``F.linear`` with W rebuilt once and cached in memory (never
    saved: the state on disk is the CSR form).
    """

    BLOCK = 128

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, gather_min_batch: int | None = 1):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach()
        support = weight != 0
        rows_and_columns = support.nonzero()  # (nnz, 2), sorted by row, then column
        row_offsets = torch.zeros(self.out_features + 1, dtype=torch.int32, device=weight.device)
        row_offsets[1:] = support.sum(1).cumsum(0)
        self.register_buffer("values", weight[support].clone())
        self.register_buffer("columns", rows_and_columns[:, 1].to(_index_dtype(self.in_features)))
        self.register_buffer("row_offsets", row_offsets)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.gather_min_batch = gather_min_batch
        self._cache: tuple[tuple[int, int], torch.Tensor] | None = None

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def dense_weight(self) -> torch.Tensor:
        """W (out, in) with zeros off the support."""
        rows = torch.repeat_interleave(
            torch.arange(self.out_features, device=self.values.device), self.row_offsets.diff().long()
        )
        weight = self.values.new_zeros(self.out_features, self.in_features)
        weight[rows, self.columns.long()] = self.values
        return weight

    def _cached_dense_weight(self) -> torch.Tensor:
        key = (self.values.data_ptr(), self.values._version)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.dense_weight())
        return self._cache[1]

    def _gather(self, flat: torch.Tensor) -> torch.Tensor:
        """x Wᵀ + b for x (B, in), one ``embedding_bag`` per block of BLOCK examples: (B, out).

        The result is computed as (out, B) and returned transposed: the bias is added while it is
        contiguous, and the next SparseLinear reads its blocks of xᵀ without a transposing copy.
        In ``torch.export`` (a symbolic batch size) the whole batch is one block.
        """
        columns, offsets = self.columns.long(), self.row_offsets[:-1].long()
        blocks = [flat] if torch.compiler.is_exporting() else flat.split(self.BLOCK)
        out = torch.cat([
            F.embedding_bag(columns, block.t().contiguous(), offsets, mode="sum", per_sample_weights=self.values)
            for block in blocks
        ], 1)
        if self.bias is not None:
            out = out + self.bias.unsqueeze(1)
        return out.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        exporting = torch.compiler.is_exporting()
        if self.gather_min_batch is None or (not exporting and flat.shape[0] < self.gather_min_batch):
            weight = self.dense_weight() if exporting else self._cached_dense_weight()
            return F.linear(x.contiguous(), weight, self.bias)  # a transposed x (from _gather) is slow in BLAS
        return self._gather(flat).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        density = self.nnz / (self.out_features * self.in_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz} "
                f"(density {density:.3f}), gather_min_batch={self.gather_min_batch}")


class SparseConv(nn.Module):
    """A Conv1d/2d/3d whose weight is stored as its non-zero values and their flat indices.

    Forward is the original convolution with the rebuilt weight: x (B, C_in, ...) -> (B, C_out, ...).
    """

    def __init__(self, conv: nn.Module, weight: torch.Tensor):
        super().__init__()
        self.conv = copy.deepcopy(conv)
        del self.conv.weight
        self.conv.register_buffer("weight", None)
        self.weight_shape = tuple(weight.shape)
        flat = weight.detach().reshape(-1)
        index = flat.nonzero().squeeze(1)
        self.register_buffer("values", flat[index].clone())
        self.register_buffer("indices", index.to(_index_dtype(flat.numel()) if flat.numel() < 2**31 else torch.long))

    def dense_weight(self) -> torch.Tensor:
        numel = 1
        for size in self.weight_shape:
            numel *= size
        weight = self.values.new_zeros(numel)
        weight[self.indices.long()] = self.values
        return weight.reshape(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv._conv_forward(x, self.dense_weight(), self.conv.bias)

    def extra_repr(self) -> str:
        total = 1
        for size in self.weight_shape:
            total *= size
        return f"weight {self.weight_shape}, nnz={self.values.numel()} (density {self.values.numel() / total:.3f})"


class Ensemble(nn.Module):
    """S networks sharing one input: x (B, ...) -> stacked outputs (S, B, ...).

    Average ``out.softmax(-1)`` over the first dimension for the posterior predictive.
    """

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members])


# ----------------------------------------------------------------------------------------------
# Weights of the posterior
# ----------------------------------------------------------------------------------------------
def unit_keep_masks(posterior: MeanField | Posterior) -> dict[str, torch.Tensor]:
    """Unit group name -> bool keep mask (size,) of the groups whose units a posterior removed
    (a guide's ``unit_masks()``, a Posterior's ``unit_masks``; empty when none)."""
    if isinstance(posterior, Posterior) and posterior.guide is not None:
        posterior = posterior.guide
    if isinstance(posterior, MeanField):
        return posterior.unit_masks()
    return dict(getattr(posterior, "unit_masks", {}) or {})


def _posterior_weights(model: BayesianNetwork, posterior: MeanField | Posterior, mode: str,
                       num_samples: int) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The weight sets to export (one for "mean", S for "samples") and each site's support mask."""
    if isinstance(posterior, Posterior) and posterior.guide is not None:
        posterior = posterior.guide  # Posterior.from_guide: export from the guide itself
    with torch.no_grad():
        if isinstance(posterior, MeanField):
            masks = {name: mask.clone() for name, mask in posterior.masks().items()}
            if mode == "mean":
                return [{k: v.detach().clone() for k, v in posterior.mean_weights().items()}], masks
            return [{k: v.detach() for k, v in posterior.sample_weights().items()} for _ in range(num_samples)], masks
        if posterior.num_stored is None:
            raise ValueError("export needs a guide or a Posterior of stored samples (Posterior.from_samples)")
        draws = list(posterior.draws(posterior.num_stored))
        masks = {name: torch.stack([d[name] for d in draws]).ne(0).any(0) for name in model.sites}
        if mode == "mean":  # sites, and the deterministic parameters a sampler stored per draw ("net.0.bias")
            return [{name: torch.stack([d[name] for d in draws]).mean(0) for name in draws[0]}], masks
        return draws[:num_samples], masks


def _plain_network(model: BayesianNetwork, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of the model's network with ``weights`` as ordinary (frozen) parameters, in eval mode."""
    net = copy.deepcopy(model.net)
    for module in net.modules():
        if isinstance(module, LocalReparameterization):
            module.__class__ = module._base_class
    for name, value in weights.items():
        if name in model.sites:
            site = model.sites[name]
            module = net.get_submodule(site.module_path)
            del module._buffers[site.attribute]
            module.register_parameter(site.attribute, nn.Parameter(value.detach().clone(), requires_grad=False))
        elif name.startswith("net."):  # a deterministic parameter of the network, stored per draw
            net.get_parameter(name.removeprefix("net.")).data.copy_(value)
    for param in net.parameters():
        param.requires_grad_(False)
    return net.eval()


def _median_seconds(call: Callable[[], torch.Tensor], repeats: int = 9) -> float:
    with torch.no_grad():
        call()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def _without_removed_units(net: nn.Module, model: BayesianNetwork, masks: Mapping[str, torch.Tensor],
                           keep: Mapping[str, torch.Tensor]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The smaller dense network without the removed units (``units.slice_network``) and the sites'
    support masks cut to its shapes."""
    groups = model.unit_groups()
    small = slice_network(net, groups, keep)
    index = weight_index(net, groups, keep)
    sliced = dict(masks)
    for name, site in model.sites.items():
        rows, columns = index.get(site.module_path, (None, None)) if site.attribute == "weight" else (None, None)
        if rows is not None:
            sliced[name] = sliced[name].index_select(0, rows.to(sliced[name].device))
        if columns is not None:
            sliced[name] = sliced[name].index_select(1, columns.to(sliced[name].device))
    return small, sliced


def _sparsify(net: nn.Module, model: BayesianNetwork, masks: Mapping[str, torch.Tensor], layout: str,
              batch_size: int) -> nn.Module:
    """Replace the pruned Linear / Conv layers of ``net`` (in place) by their sparse forms."""
    for name, site in model.sites.items():
        if site.attribute != "weight" or bool(masks[name].all()):
            continue
        layer = net.get_submodule(site.module_path)
        if isinstance(layer, nn.Linear):
            sparse: nn.Module = SparseLinear(layer.weight, layer.bias, gather_min_batch=1)
            if layout == "auto":
                sparse.gather_min_batch = _gather_crossover(sparse, batch_size)
        elif isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            sparse = SparseConv(layer, layer.weight)
        else:
            continue
        parent_path, _, child = site.module_path.rpartition(".")
        setattr(net.get_submodule(parent_path) if parent_path else net, child, sparse.eval())
    return net


def _gather_crossover(layer: SparseLinear, largest: int) -> int | None:
    """The smallest batch size (of 1, 4, 16, ... up to ``largest``) from which the gather kernel beats
    the cached dense weight on this machine; None if it never does."""
    sizes = sorted({*(4**k for k in range(10) if 4**k < largest), largest})
    for size in sizes:
        x = torch.randn(size, layer.in_features, device=layer.values.device)
        gather = _median_seconds(lambda x=x: layer._gather(x))
        dense = _median_seconds(lambda x=x: F.linear(x, layer._cached_dense_weight(), layer.bias))
        if gather < dense:
            return size
    return None


def export(
    model: BayesianNetwork,
    posterior: MeanField | Posterior,
    mode: str = "mean",
    num_samples: int = 8,
    layout: str = "auto",
    batch_size: int = 1024,
) -> nn.Module:
    """A plain ``nn.Module`` computing the trained network (no Pyro needed to run it).

    Args:
        model: the BayesianNetwork (its deterministic parameters, e.g. biases, are used as they are).
        posterior: a trained guide (MeanField, SNRPruned, SparseSubspace, ...) or a Posterior of
            stored samples (e.g. from ``em_sghmc``).
        mode: "mean": one network with the posterior-mean weights (exact zeros where pruned), x (B, ...)
            -> (B, ...); "samples": an ``Ensemble`` of ``num_samples`` sampled networks, x -> (S, B, ...).
        layout: "dense": ordinary torch layers; "sparse": pruned Linear layers in CSR form, always
            with the gather kernel, and pruned convolutions stored sparsely; "auto": the same storage,
            each Linear layer using the gather kernel from the batch size on which it was timed faster
            than a cached dense weight (timed up to ``batch_size``), the dense weight below it.

    Removed units (structured sparsity: ``guide.unit_masks()``, a Posterior's ``unit_masks``) are cut
    out in every layout: the exported network has fewer neurons and channels (``units.slice_network``),
    and only the weights pruned inside the kept units are left for the sparse storage.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not isinstance(posterior, MeanField | Posterior):
        raise ValueError(f"posterior must be a MeanField guide or a Posterior, got {type(posterior).__name__}")
    weight_sets, masks = _posterior_weights(model, posterior, mode, num_samples)
    keep = unit_keep_masks(posterior)
    networks = []
    for weights in weight_sets:
        net = _plain_network(model, weights)
        site_masks = masks
        if keep:
            net, site_masks = _without_removed_units(net, model, masks, keep)
        pruned = sum(int((~mask).sum()) for mask in site_masks.values())
        if layout == "sparse" and pruned == 0 and not keep:
            raise ValueError("export(layout='sparse') needs a pruned posterior, but no weight is pruned; prune the "
                             "guide first (e.g. SNRPruned.prune) or export with layout='dense'")
        if layout != "dense" and pruned:
            net = _sparsify(net, model, site_masks, layout, batch_size)
        networks.append(net)
    return networks[0] if mode == "mean" else Ensemble(networks).eval()


def dense_network(model: BayesianNetwork, posterior: MeanField | Posterior) -> nn.Module:
    """The full-size network with the posterior-mean weights (pruned weights stored as zeros, no unit
    removed): what a dense export computes, at the dense network's cost. The baseline of ``speedups``."""
    weight_sets, _ = _posterior_weights(model, posterior, "mean", 1)
    return _plain_network(model, weight_sets[0])


def speedups(model: BayesianNetwork, posterior: MeanField | Posterior, example: torch.Tensor,
             batch_sizes: tuple[int, ...] = (1, 1024), rounds: int = 15, exported: nn.Module | None = None,
             seconds: float = 0.3) -> dict[int, float]:
    """How many times faster ``export(model, posterior)`` runs than the dense network, per batch size.

    Timed side by side on this machine, on the model's device (CUDA work synchronised around every
    pass): interleaved rounds, each one forward pass (no grad) of each network on the same batch, the
    ratio of the median times. ``rounds`` rounds, more for fast passes (until each network has run
    about ``seconds``, at most 1,000 rounds, so that the median of a microsecond-scale pass at batch 1
    is not one scheduler hiccup) and only 3 for passes slower than 50 ms (a large network at batch
    1024 on a CPU). Args: ``example`` (N, ...) inputs, repeated to fill a batch; ``exported``: the
    exported network (default ``export(model, posterior, batch_size=max(batch_sizes))``). Returns batch
    size -> dense time / exported time.
    """
    rounds = check_count("rounds", rounds)
    dense = dense_network(model, posterior)
    small = exported if exported is not None else export(model, posterior, batch_size=max(batch_sizes))
    device = next(iter(dense.parameters()), example).device
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(net: nn.Module, batch: torch.Tensor) -> float:
        synchronize()
        started = time.perf_counter()
        net(batch)
        synchronize()
        return time.perf_counter() - started

    ratios = {}
    with torch.no_grad():
        for size in batch_sizes:
            repeats = -(-size // len(example))
            batch = example.repeat(repeats, *([1] * (example.dim() - 1)))[:size].contiguous().to(device)
            once = (timed(dense, batch) + timed(small, batch)) / 2  # also the warm-up (caches, allocator)
            least = rounds if once < 0.05 else 3
            count = min(1000, max(least, int(seconds / max(once, 1e-6))))
            times: dict[str, list[float]] = {"dense": [], "exported": []}
            for _ in range(count):
                times["dense"].append(timed(dense, batch))
                times["exported"].append(timed(small, batch))
            ratios[size] = statistics.median(times["dense"]) / statistics.median(times["exported"])
    return ratios


def unit_counts(model: BayesianNetwork, posterior: MeanField | Posterior) -> tuple[int, int]:
    """(units of the network's removable groups, units the posterior keeps); (0, 0) for a network
    whose units cannot be found (``units.unit_groups``)."""
    try:
        groups = model.unit_groups()
    except UnitAnalysisError:
        return 0, 0
    return count_units(groups, unit_keep_masks(posterior))


# ----------------------------------------------------------------------------------------------
# Storage
# ----------------------------------------------------------------------------------------------
def storage_bytes(module: nn.Module) -> int:
    """Bytes of the tensors in ``module.state_dict()`` (shared storages counted once)."""
    seen, total = set(), 0
    for tensor in module.state_dict().values():
        if tensor is None:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def save(module: nn.Module, path: str | os.PathLike, example: torch.Tensor) -> int:
    """Write ``module`` with ``torch.export`` (batch size dynamic) atomically to ``path`` (a .pt2 file).

    ``torch.export.load(path).module()`` runs it with torch alone. ``example``: a batch of inputs
    (B ≥ 2). Returns the file's size in bytes.
    """
    batch = torch.export.Dim("batch", min=1)
    example = example[:2].clone()  # the program keeps its sample input: never a view of a whole dataset
    with torch.no_grad():
        program = torch.export.export(module.eval(), (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return os.path.getsize(path)
