"""DataLoaders for training: image augmentation (random crop with padding, horizontal flip) and workers.

``fit``, ``em_sghmc`` and ``sample_sghmc`` take any ``DataLoader`` of (x, y) batches (``batches``); this
module builds the usual one, as the SSVI paper trains on CIFAR-10:

    loader = ps.loaders.training_loader(dataset.train, batch_size=128, augment=True, workers=2, seed=0)
    ps.fit(model, guide, loader, epochs=...)

``CropFlip`` wraps a dataset of (image (C, H, W), label) pairs: each time an image is read it is padded
by ``padding`` pixels of zeros on every side, cropped back to H × W at a random offset, and mirrored left
to right with probability 1/2. Its random numbers come from torch's RNG in the process that reads the
item (a worker's RNG is seeded by the DataLoader from its generator), so a seeded loader gives the same
augmented batches run after run, and after a resume.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .data import as_tensors
from .validation import check_count, check_seed


class CropFlip(Dataset):
    """(image, label) pairs of ``dataset`` (images (C, H, W)), randomly cropped after zero padding and
    flipped horizontally (see the module docstring)."""

    def __init__(self, dataset: Dataset, padding: int = 4, flip: bool = True):
        self.dataset, self.padding, self.flip = dataset, int(padding), bool(flip)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.dataset[index]
        height, width = image.shape[-2:]
        pad = self.padding
        padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
        top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
        image = padded[..., top: top + height, left: left + width]
        if self.flip and bool(torch.rand(()) < 0.5):
            image = image.flip(-1)
        return image, label


def check_augmentable(x: torch.Tensor) -> None:
    """A ValueError unless x (N, C, H, W) holds colour images (C = 3), the CIFAR-shaped data that random
    crops and horizontal flips suit (a flipped digit is another digit; a tabular row is no image)."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"augmentation (random crop + horizontal flip) is for colour images (N, 3, H, W), e.g. "
                         f"CIFAR-10; these inputs have shape {tuple(x.shape)}: train without --augment")


def training_loader(data, batch_size: int, augment: bool = False, workers: int = 0,
                    seed: int | None = None) -> DataLoader:
    """A shuffling ``DataLoader`` over ``data`` ((x, y), a TensorDataset or a ``ps.data.Dataset``'s train split).

    Args:
        batch_size: examples per batch (the last batch may be smaller).
        augment: wrap the images in ``CropFlip`` (colour images only: ``check_augmentable``).
        workers: worker processes that read and augment the batches (0: in this process).
        seed: seeds the loader's generator (its shuffling, and the workers' RNG); None draws one from
            torch's RNG.
    """
    check_count("batch_size", batch_size)
    if int(workers) != workers or workers < 0:
        raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
    seed = check_seed(seed)
    x, y = as_tensors(getattr(data, "train", data))
    dataset: Dataset = TensorDataset(x, y)
    if augment:
        check_augmentable(x)
        dataset = CropFlip(dataset)
    generator = torch.Generator()
    generator.manual_seed(int(torch.randint(2**62, ()).item()) if seed is None else seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=int(workers), generator=generator,
                      persistent_workers=False)


__all__ = ["CropFlip", "check_augmentable", "training_loader"]
