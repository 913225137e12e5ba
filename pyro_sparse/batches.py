"""Where a training loop's minibatches come from: tensors in memory, or a ``DataLoader`` that streams them.

``batch_source(data, batch_size)`` gives one of two sources with the same face (``dataset_size``,
``steps_per_epoch``, ``example``, ``epoch(generator, device)``, ``shuffle_state``):

- ``TensorBatches``: (x, y) held in memory (a pair, a ``TensorDataset``, a ``ps.data.Dataset``'s train
  split, any sized map-style dataset, read once). An epoch is a random permutation drawn from the loop's
  own generator, sliced into batches of ``batch_size`` on the device: the fast path, no copies across
  the host boundary inside an epoch.
- ``LoaderBatches``: a ``torch.utils.data.DataLoader`` whose dataset has a length: batches come as the
  loader makes them — its sampler, its workers, its transforms (augmentation) — and are moved to the
  device (``non_blocking``). It shuffles with the loader's ``generator`` when it has one, else (the
  ``DataLoader`` default) with a seed drawn from torch's global RNG at the start of each epoch; a loop
  that saves and restores the global RNG state (``fit`` and ``em_sghmc`` do) and the loader's generator
  (``shuffle_state``) therefore sees the same batches after a resume. Data larger than memory stream
  through it; ``batch_size`` is the loader's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from .data import as_tensors
from .distributed import SINGLE_PROCESS, World

Batch = tuple[torch.Tensor, torch.Tensor]


class TensorBatches:
    """x (N, ...), y (N, ...) in memory, cut into shuffled batches of ``batch_size``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} examples and y {len(y)}: give one target per example")
        if len(x) == 0:
            raise ValueError("the training dataset is empty: give fit at least one (x, y) example")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.dataset_size = len(x)
        self.steps_per_epoch = math.ceil(len(x) / batch_size)
        self.world = SINGLE_PROCESS

    @property
    def example(self) -> Batch:
        """The first ``batch_size`` examples (to check the model or trace it)."""
        return self.x[: self.batch_size], self.y[: self.batch_size]

    def to(self, device: torch.device) -> TensorBatches:
        """Move the data to ``device`` once (in place); returns self."""
        self.x, self.y = self.x.to(device), self.y.to(device)
        return self

    def shard(self, world: World, seed: int) -> None:
        """Split every step among the processes of ``world``: a step takes ``batch_size`` × K examples of the
        shared permutation (every process draws the same one), and process r the r-th of K near-equal parts.
        A last step with fewer than K examples is dropped (no process may get an empty batch)."""
        self.world = world
        per_step = self.batch_size * world.size
        steps = math.ceil(self.dataset_size / per_step)
        if self.dataset_size - (steps - 1) * per_step < world.size:
            steps -= 1
        if steps == 0:
            raise ValueError(f"{self.dataset_size} examples are fewer than the {world.size} processes")
        self.steps_per_epoch = steps

    def epoch(self, generator: torch.Generator) -> Iterator[Batch]:
        """The batches of one epoch, in the order of a permutation drawn from ``generator`` now (not at the
        first batch: loops that open one epoch per chain draw the chains' orders in chain order), over several
        processes this process's part of each step (``shard``)."""
        order = torch.randperm(self.dataset_size, generator=generator).to(self.x.device)
        return self._batches(order)

    def _batches(self, order: torch.Tensor) -> Iterator[Batch]:
        per_step = self.batch_size * self.world.size
        for step in range(self.steps_per_epoch):
            index = order[step * per_step: (step + 1) * per_step]
            if self.world.active:
                index = index.tensor_split(self.world.size)[self.world.rank]
            yield self.x[index], self.y[index]

    def shuffle_state(self) -> dict[str, Any]:
        """Nothing of its own: the loop's generator draws the permutation."""
        return {}

    def load_shuffle_state(self, saved: dict[str, Any]) -> None:
        """Nothing to restore (``shuffle_state``)."""


class LoaderBatches:
    """The batches of a ``DataLoader`` (see the module docstring), moved to ``device``."""

    def __init__(self, loader: DataLoader):
        try:
            # N: the examples an epoch draws from (a sampler may read a subset of the dataset)
            sampler = loader.sampler if loader.batch_size is not None else loader.batch_sampler.sampler
            self.dataset_size = len(sampler)
            self.steps_per_epoch = len(loader)
        except (TypeError, AttributeError) as error:
            raise TypeError(
                "a DataLoader of a dataset without a length (an IterableDataset) cannot say how many examples an "
                "epoch holds, which the ELBO's N / B scaling needs: give the dataset a __len__"
            ) from error
        if self.dataset_size == 0 or self.steps_per_epoch == 0:
            raise ValueError("the DataLoader yields no batches")
        self.loader = loader
        self.device = torch.device("cpu")
        self._example: Batch | None = None
        self._sampler: DistributedSampler | None = None
        self._epoch = 0

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size or len(self.example[0])

    @property
    def example(self) -> Batch:
        """One batch of the loader (drawn once, without touching torch's global RNG)."""
        if self._example is None:
            with torch.random.fork_rng(devices=[]):
                self._example = _pair(next(iter(self.loader)))
        return tuple(tensor.to(self.device) for tensor in self._example)

    def to(self, device: torch.device) -> LoaderBatches:
        """Batches will be moved to ``device`` as they come; returns self."""
        self.device = torch.device(device)
        return self

    def shard(self, world: World, seed: int) -> None:
        """Read only this process's share of the data: the loader is rebuilt around a ``DistributedSampler``
        (same dataset, batch size, workers and collation; shuffled, seeded by ``seed`` and the epoch, when
        the loader shuffled)."""
        loader = self.loader
        if loader.batch_size is None or type(loader.sampler) not in (RandomSampler, SequentialSampler):
            raise ValueError(
                "under several processes fit shards the data with a DistributedSampler and cannot keep this "
                f"loader's own {'batch_sampler' if loader.batch_size is None else type(loader.sampler).__name__}: "
                "give a DataLoader with batch_size and shuffle=True (or False), over the examples to train on"
            )
        if isinstance(loader.sampler, RandomSampler) and len(loader.sampler) != len(loader.dataset):
            raise ValueError("under several processes fit cannot shard a RandomSampler with num_samples: give a "
                             "DataLoader over exactly the examples to train on")
        shuffled = isinstance(loader.sampler, RandomSampler)
        self._sampler = DistributedSampler(loader.dataset, num_replicas=world.size, rank=world.rank,
                                           shuffle=shuffled, seed=seed % 2**31, drop_last=False)
        workers_rng = torch.Generator()  # each process's workers their own augmentation
        workers_rng.manual_seed((seed + 7919 * (world.rank + 1)) % 2**63)
        self.loader = DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=self._sampler,
                                 num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                 pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                                 worker_init_fn=loader.worker_init_fn, generator=workers_rng)
        self.steps_per_epoch = len(self.loader)

    def epoch(self, generator: torch.Generator | None = None) -> Iterator[Batch]:
        """The batches of one pass over the loader (``generator`` is unused: the loader shuffles)."""
        non_blocking = self.device.type == "cuda"
        if self._sampler is not None:
            self._sampler.set_epoch(self._epoch)
        self._epoch += 1
        for batch in self.loader:
            x, y = _pair(batch)
            yield x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking)

    def shuffle_state(self) -> dict[str, Any]:
        """The state of the loader's own generators (its ``generator`` and its sampler's), if it has any, and
        the number of epochs read (a ``DistributedSampler`` shuffles by epoch)."""
        state: dict[str, Any] = {name: generator.get_state() for name, generator in self._generators().items()}
        return {**state, "epochs_read": self._epoch}

    def load_shuffle_state(self, saved: dict[str, Any]) -> None:
        for name, generator in self._generators().items():
            if name in saved:
                generator.set_state(saved[name])
        self._epoch = int(saved.get("epochs_read", self._epoch))

    def _generators(self) -> dict[str, torch.Generator]:
        found = {"loader": getattr(self.loader, "generator", None),
                 "sampler": getattr(getattr(self.loader, "sampler", None), "generator", None)}
        return {name: generator for name, generator in found.items() if isinstance(generator, torch.Generator)}


def _pair(batch: Any) -> Batch:
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return torch.as_tensor(batch[0]), torch.as_tensor(batch[1])
    raise TypeError(f"the DataLoader must yield (x, y) pairs, it yielded a {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, list | tuple) else ""))


def batch_source(data: Any, batch_size: int) -> TensorBatches | LoaderBatches:
    """A ``LoaderBatches`` for a ``DataLoader``, else a ``TensorBatches`` of ``data.as_tensors(data)``."""
    if isinstance(data, DataLoader):
        return LoaderBatches(data)
    x, y = as_tensors(data)
    return TensorBatches(x, y, batch_size)
