"""Export a trained (pruned) Bayesian network as a plain, small, fast ``torch.nn.Module``.

``export(model, guide)`` gives the network with its posterior-mean weights (exact zeros where
pruned); ``export(model, guide, mode="samples", num_samples=S)`` an ensemble of S sampled sparse
networks for Monte Carlo prediction. Pruned weights are stored sparsely:

- ``SparseLinear``: a Linear layer in compressed-row (CSR) form: the non-zero values, their column
  indices (int16 where the layer has < 32768 inputs) and row offsets. Its ``"gather"`` kernel
  computes y = x Wᵀ as one ``embedding_bag`` (a weighted sum of rows of xᵀ per output unit), which
  does nnz · B multiply-adds instead of out · in · B; its ``"dense"`` kernel rebuilds W and calls
  ``F.linear`` (faster for small batches). ``layout="auto"`` times both on each layer.
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
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import atomic_write_bytes
from .guides.meanfield import MeanField
from .layers import LocalReparameterization
from .model import BayesianNetwork
from .posterior import Posterior

MODES = ("mean", "samples")
LAYOUTS = ("auto", "dense", "sparse")
KERNELS = ("gather", "dense")


def _index_dtype(size: int) -> torch.dtype:
    return torch.int16 if size <= torch.iinfo(torch.int16).max else torch.int32


class SparseLinear(nn.Module):
    """y = x Wᵀ + b, W (out, in) stored in CSR form; x (..., in) -> y (..., out).

    Buffers: ``values`` (nnz,), ``columns`` (nnz,) int16/int32, ``row_offsets`` (out + 1,) int32,
    ``bias`` (out,) or None. ``kernel``: "gather" (embedding_bag over xᵀ) or "dense" (rebuild W).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str = "gather"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
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
        self.kernel = kernel

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "dense":
            return F.linear(x, self.dense_weight(), self.bias)
        flat = x.reshape(-1, self.in_features)
        table = flat.t().contiguous()  # (in, B): row j holds input feature j of every example
        out = F.embedding_bag(
            self.columns.long(), table, self.row_offsets[:-1].long(), mode="sum", per_sample_weights=self.values
        ).t()  # (B, out)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        density = self.nnz / (self.out_features * self.in_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz} "
                f"(density {density:.3f}), kernel={self.kernel}")


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
def _posterior_weights(model: BayesianNetwork, posterior: MeanField | Posterior, mode: str,
                       num_samples: int) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The weight sets to export (one for "mean", S for "samples") and each site's support mask."""
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
        if mode == "mean":
            return [{name: torch.stack([d[name] for d in draws]).mean(0) for name in model.sites}], masks
        return draws[:num_samples], masks


def _plain_network(model: BayesianNetwork, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of the model's network with ``weights`` as ordinary (frozen) parameters, in eval mode."""
    net = copy.deepcopy(model.net)
    for module in net.modules():
        if isinstance(module, LocalReparameterization):
            module.__class__ = module._base_class
    for name, value in weights.items():
        site = model.sites[name]
        module = net.get_submodule(site.module_path)
        del module._buffers[site.attribute]
        module.register_parameter(site.attribute, nn.Parameter(value.detach().clone(), requires_grad=False))
    for param in net.parameters():
        param.requires_grad_(False)
    return net.eval()


def _median_seconds(module: nn.Module, x: torch.Tensor, repeats: int = 7) -> float:
    with torch.no_grad():
        module(x)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def _sparsify(net: nn.Module, model: BayesianNetwork, masks: Mapping[str, torch.Tensor], layout: str,
              batch_size: int) -> nn.Module:
    """Replace the pruned Linear / Conv layers of ``net`` (in place) by their sparse forms."""
    for name, site in model.sites.items():
        if site.attribute != "weight" or bool(masks[name].all()):
            continue
        layer = net.get_submodule(site.module_path)
        if isinstance(layer, nn.Linear):
            sparse: nn.Module = SparseLinear(layer.weight, layer.bias, kernel="gather")
            if layout == "auto":
                x = torch.randn(batch_size, layer.in_features, device=layer.weight.device)
                timed = {kernel: _median_seconds(_with_kernel(sparse, kernel), x) for kernel in KERNELS}
                timed["plain"] = _median_seconds(layer, x)
                fastest = min(timed, key=timed.get)
                if fastest == "plain":
                    continue
                sparse.kernel = fastest
        elif isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            sparse = SparseConv(layer, layer.weight)
        else:
            continue
        parent_path, _, child = site.module_path.rpartition(".")
        setattr(net.get_submodule(parent_path) if parent_path else net, child, sparse.eval())
    return net


def _with_kernel(layer: SparseLinear, kernel: str) -> SparseLinear:
    layer.kernel = kernel
    return layer


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
        layout: "dense": ordinary torch layers; "sparse": pruned Linear layers in CSR form with the
            gather kernel and pruned convolutions stored sparsely; "auto": sparse storage, and for
            each Linear layer the fastest of gather, dense-rebuild and the plain layer, timed on a
            batch of ``batch_size``.
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
    pruned = sum(int((~mask).sum()) for mask in masks.values())
    if layout == "sparse" and pruned == 0:
        raise ValueError("export(layout='sparse') needs a pruned posterior, but no weight is pruned; prune the "
                         "guide first (e.g. SNRPruned.prune) or export with layout='dense'")
    networks = []
    for weights in weight_sets:
        net = _plain_network(model, weights)
        if layout != "dense" and pruned:
            net = _sparsify(net, model, masks, layout, batch_size)
        networks.append(net)
    return networks[0] if mode == "mean" else Ensemble(networks).eval()


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
    with torch.no_grad():
        program = torch.export.export(module.eval(), (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return os.path.getsize(path)
