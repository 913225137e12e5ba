"""Data parallelism over ``torch.distributed`` processes, as ``torchrun`` launches them.

``torchrun --nproc-per-node K train.py`` starts K processes with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``
and ``MASTER_PORT`` set; ``fit`` then joins their process group (``current_world``: gloo on CPU, NCCL on
GPU, unless the script joined one itself) and trains data-parallel:

- every process starts from process 0's parameters (``broadcast_``);
- each step, each process takes its own slice of one shared permutation of the data (``batch_size`` per
  process: K processes see the batch of a single process with K × ``batch_size``), and the gradients of
  all trainable parameters are averaged in one all-reduce of one flat buffer (``average_gradients_``).
  A ``SparseSubspace`` guide stores only its active weights, so what crosses the network scales with the
  density;
- decisions that change masks (SNR pruning, the SSVI support update) are computed from identical
  parameters and all-reduced statistics, so every process holds the same masks;
- a process that finds a non-finite loss tells the others (``any_``) so all stop together; checkpoints and
  outputs are written by process 0 only; a process that dies ends the others' collectives within
  ``TIMEOUT_SECONDS`` with an error, never a hang.

Nothing here does its own communication: these are thin helpers over ``torch.distributed``'s collectives.
Outside ``torchrun`` (``WORLD_SIZE`` unset or 1) every helper is a no-op and ``current_world()`` is
``World(rank=0, size=1)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT_SECONDS = 120
"""How long a collective waits for a process that does not come (e.g. it died) before failing."""


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes: ``rank`` in [0, ``size``)."""

    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        """True when there is more than one process."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """True for process 0, which writes checkpoints and outputs."""
        return self.rank == 0


SINGLE_PROCESS = World()
"""The world of a run that is not distributed."""


def current_world(device: torch.device | None = None) -> World:
    """The world of this process: join the process group ``torchrun`` described in the environment (once;
    gloo, or NCCL for a CUDA ``device``), or ``World()`` when there is a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE_PROCESS
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:  # NCCL's collectives (and all_gather_object's tensors) go to the current device: this process's
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=TIMEOUT_SECONDS))
    return World(dist.get_rank(), dist.get_world_size())


def broadcast_(tensors: Iterable[torch.Tensor], world: World) -> None:
    """Overwrite ``tensors`` (in place) with process 0's values, in one collective per tensor."""
    if not world.active:
        return
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def average_gradients_(params: Iterable[torch.Tensor], world: World) -> int:
    """Replace each parameter's ``.grad`` by its mean over the processes: one all-reduce of one flat buffer.
    A parameter without a gradient on a process counts as zero there; one that no process gave a gradient
    keeps ``.grad = None`` (so the optimizer skips it, as it would in one process). Returns the bytes this
    process sent into the all-reduce."""
    if not world.active:
        return 0
    params = [param for param in params if param.requires_grad]
    if not params:
        return 0
    missing = [index for index, param in enumerate(params) if param.grad is None]
    grads = [param.grad if param.grad is not None else torch.zeros_like(param) for param in params]
    has_grad = torch.tensor([param.grad is not None for param in params], dtype=grads[0].dtype,
                            device=grads[0].device)
    flat = torch.cat([*(grad.reshape(-1) for grad in grads), has_grad])
    dist.all_reduce(flat)
    flat[: -len(params)].div_(world.size)
    offset = 0
    for param, grad in zip(params, grads, strict=True):
        param.grad = flat[offset: offset + grad.numel()].view_as(param)
        offset += grad.numel()
    if missing:  # only then look (a host sync): did any process give these a gradient?
        given = flat[-len(params):][missing].tolist()
        for index, count in zip(missing, given, strict=True):
            if count == 0:
                params[index].grad = None
    return flat.numel() * flat.element_size()


def sum_(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """``tensor`` summed over the processes, in place; returns it."""
    if world.active:
        dist.all_reduce(tensor)
    return tensor


def mean_(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """``tensor`` averaged over the processes, in place; returns it."""
    if world.active:
        dist.all_reduce(tensor)
        tensor.div_(world.size)
    return tensor


def any_(flag: bool, world: World, device: torch.device | None = None) -> bool:
    """True when ``flag`` is True on any process (every process gets the same answer)."""
    if not world.active:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def gather_objects(value: Any, world: World) -> list[Any]:
    """Every process's ``value`` (plain data or CPU tensors), in rank order, on every process."""
    if not world.active:
        return [value]
    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, value)
    return gathered


def check_same(what: str, value: Any, world: World) -> None:
    """A ValueError on every process when ``value`` (plain data: a configuration, a parameter layout)
    differs between processes, naming the first process that disagrees with process 0."""
    values = gather_objects(value, world)
    for rank, other in enumerate(values):
        if other != values[0]:
            raise ValueError(f"the processes disagree on {what}: process 0 has {values[0]!r}, process {rank} has "
                             f"{other!r}; launch every process with the same arguments")


def barrier(world: World) -> None:
    """Wait until every process gets here."""
    if world.active:
        dist.barrier()


def finish(world: World) -> None:
    """End a program's part in the process group: wait for every process (process 0 may still be writing),
    then leave the group, so no process exits while the others' connections are open."""
    if world.active:
        dist.barrier()
        dist.destroy_process_group()


__all__ = ["SINGLE_PROCESS", "TIMEOUT_SECONDS", "World", "any_", "average_gradients_", "barrier", "broadcast_",
           "check_same", "current_world", "finish", "gather_objects", "mean_", "sum_"]
