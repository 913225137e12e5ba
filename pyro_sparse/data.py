"""Dataset loading into in-memory tensors.

Every loader returns a :class:`Dataset` whose ``train`` and ``test`` splits are
:class:`torch.utils.data.TensorDataset` objects holding ``(x, y)``:

================  ====================  =========  ===============  ==============
name              x per example         y          train / test     source
================  ====================  =========  ===============  ==============
digits            (1, 8, 8) in [0, 1]   int64      1347 / 450       scikit-learn
mnist             (1, 28, 28) normed    int64      60000 / 10000    IDX files
fashion-mnist     (1, 28, 28) normed    int64      60000 / 10000    IDX files
cifar10           (3, 32, 32) normed    int64      50000 / 10000    pickle batches
toy-regression    (1,)                  float32    160 / 200        generated
================  ====================  =========  ===============  ==============

``digits`` and ``toy-regression`` need no files. MNIST, Fashion-MNIST and CIFAR-10 are read
from a folder laid out as ``torchvision.datasets`` expects; the files are parsed here with
gzip/numpy/pickle, so nothing is written and no network is needed. ``download=True`` uses
torchvision to fetch files that are missing.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["DATASETS", "Dataset", "as_tensors", "check_data", "load"]

DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10", "toy-regression")

_ALIASES = {
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "toyregression": "toy-regression",
    "toy": "toy-regression",
}

# Folder name torchvision uses under the root, and the standard normalisation constants.
_IDX_DATASETS = {
    "mnist": ("MNIST", 0.1307, 0.3081),
    "fashion-mnist": ("FashionMNIST", 0.2860, 0.3530),
}
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)

TOY_NOISE_STD = 0.1
"""Standard deviation of the Gaussian noise added to the ``toy-regression`` targets."""


@dataclass(frozen=True)
class Dataset:
    """A train/test pair of in-memory tensor datasets plus metadata.

    Attributes:
        name: canonical dataset name (one of :data:`DATASETS`).
        train: ``TensorDataset(x, y)`` with ``x`` of shape ``(N, *input_shape)`` and ``y`` of shape ``(N,)``.
        test: same layout as ``train``.
        task: ``"classification"`` (``y`` int64 class indices) or ``"regression"`` (``y`` float32).
        num_classes: number of classes, ``None`` for regression.
        input_shape: shape of one example, e.g. ``(1, 8, 8)``.
    """

    name: str
    train: TensorDataset
    test: TensorDataset
    task: str
    num_classes: int | None
    input_shape: tuple[int, ...]

    def subsample(self, train: int | None = None, test: int | None = None, seed: int = 0) -> Dataset:
        """Return a copy keeping a random subset of each split (for quick smoke runs).

        Args:
            train: number of training examples to keep; ``None`` keeps the split as is, and
                values larger than the split keep all of it (in a shuffled order).
            test: same for the test split.
            seed: seed of the random choice; equal seeds give equal subsets.
        """
        gen = torch.Generator().manual_seed(seed)
        return dataclasses.replace(
            self,
            train=_subset(self.train, train, gen, "train"),
            test=_subset(self.test, test, gen, "test"),
        )

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, task={self.task!r}, train={len(self.train)}, "
            f"test={len(self.test)}, input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


def _subset(split: TensorDataset, n: int | None, gen: torch.Generator, label: str) -> TensorDataset:
    if n is None:
        return split
    if n <= 0:
        raise ValueError(f"subsample size for {label} must be positive; got {n}")
    idx = torch.randperm(len(split), generator=gen)[:n]
    return TensorDataset(*(t[idx] for t in split.tensors))


def as_tensors(data) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x, y)`` tensors from a ``TensorDataset``, an ``(x, y)`` tuple/list or a :class:`Dataset`.

    A :class:`Dataset` gives its train split. Arrays in a tuple/list are converted with
    ``torch.as_tensor`` (no copy where possible). Any other map-style ``torch.utils.data.Dataset``
    whose items are ``(x, y)`` pairs (a torchvision dataset with ``ToTensor()``, say) is read once
    and stacked into memory.
    """
    if isinstance(data, Dataset):
        data = data.train
    if isinstance(data, TensorDataset):
        if len(data.tensors) != 2:
            raise ValueError(f"expected a TensorDataset of (x, y); got {len(data.tensors)} tensors")
        x, y = data.tensors
        return x, y
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError(f"expected an (x, y) pair; got a {type(data).__name__} of length {len(data)}")
        return torch.as_tensor(data[0]), torch.as_tensor(data[1])
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        return _stack_items(data)
    raise TypeError(f"expected a Dataset, TensorDataset or (x, y) pair; got {type(data).__name__}")


def _stack_items(data: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    if len(data) == 0:
        raise ValueError("dataset is empty")
    xs, ys = [], []
    for index in range(len(data)):
        item = data[index]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"expected dataset items to be (x, y) pairs; item {index} is {type(item).__name__}")
        xs.append(torch.as_tensor(item[0]))
        ys.append(torch.as_tensor(item[1]))
    return torch.stack(xs), torch.stack(ys)


def check_data(
    x: torch.Tensor,
    y: torch.Tensor,
    task: str = "classification",
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
) -> None:
    """Validate inputs ``x`` of shape ``(N, *input_shape)`` and targets ``y`` of shape ``(N,)``.

    Raises:
        ValueError: with a message naming the problem: empty data, ``len(x) != len(y)``,
            NaN/inf in ``x`` (or in regression targets), non-integer labels or labels outside
            ``[0, num_classes)``, or a per-example shape that differs from ``input_shape``.
    """
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be 'classification' or 'regression'; got {task!r}")
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError("inputs and targets must have a leading batch dimension")
    if len(x) != len(y):
        raise ValueError(f"inputs and targets differ in length: len(x) = {len(x)}, len(y) = {len(y)}")
    if len(x) == 0:
        raise ValueError("dataset is empty")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"wrong input shape: expected {tuple(input_shape)} per example, got {tuple(x.shape[1:])}"
        )
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError("inputs contain NaN or inf")
    if task == "regression":
        if y.is_floating_point() and not torch.isfinite(y).all():
            raise ValueError("regression targets contain NaN or inf")
        return
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels must be integers (class indices); got dtype {y.dtype}")
    if y.ndim != 1:
        raise ValueError(f"labels must have shape (N,); got {tuple(y.shape)}")
    lo, hi = int(y.min()), int(y.max())
    if num_classes is not None and (lo < 0 or hi >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); found {hi if hi >= num_classes else lo}")
    if lo < 0:
        raise ValueError(f"labels must be non-negative; found {lo}")


def load(name: str, root: str | os.PathLike | None = None, download: bool = False) -> Dataset:
    """Load a dataset by name (case-insensitive; ``_`` and ``-`` are interchangeable).

    Args:
        name: one of :data:`DATASETS`.
        root: data folder for the file-based datasets; ``None`` means the environment variable
            ``PYRO_SPARSE_DATA``, else ``./data``. Ignored by ``digits`` and ``toy-regression``.
        download: fetch missing MNIST/Fashion-MNIST/CIFAR-10 files with torchvision.

    Raises:
        ValueError: unknown name.
        FileNotFoundError: files missing and ``download=False``.
        RuntimeError: ``download=True`` but the download failed.
    """
    key = _canonical(name)
    if key == "digits":
        ds = _load_digits()
    elif key == "toy-regression":
        ds = _load_toy_regression()
    elif key in _IDX_DATASETS:
        ds = _load_idx_dataset(key, _resolve_root(root), download)
    else:
        ds = _load_cifar10(_resolve_root(root), download)
    for split in (ds.train, ds.test):
        check_data(*split.tensors, task=ds.task, num_classes=ds.num_classes, input_shape=ds.input_shape)
    return ds


def _canonical(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, _ALIASES.get(key.replace("-", ""), key))
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return key


def _resolve_root(root: str | os.PathLike | None) -> Path:
    if root is None:
        root = os.environ.get("PYRO_SPARSE_DATA") or "./data"
    return Path(root).expanduser()


# --------------------------------------------------------------------------- digits


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)

    def split(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        xt = torch.as_tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
        return TensorDataset(xt, torch.as_tensor(y, dtype=torch.int64))

    return Dataset("digits", split(x_tr, y_tr), split(x_te, y_te), "classification", 10, (1, 8, 8))


# --------------------------------------------------------------------------- toy regression


def toy_function(x: torch.Tensor) -> torch.Tensor:
    """Noise-free target of ``toy-regression``: ``f(x) = sin(x) + 0.1 x^2`` (elementwise)."""
    return torch.sin(x) + 0.1 * x**2


def _load_toy_regression() -> Dataset:
    """1-D regression with a gap: train x uniform on [-4, -1.5] ∪ [1.5, 4] (80 points each side),
    test x evenly spaced on [-6, 6] (200 points); y = f(x) + 0.1 ε with f = :func:`toy_function`."""
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(160, generator=gen)
    x_tr = torch.cat([-4.0 + 2.5 * u[:80], 1.5 + 2.5 * u[80:]]).unsqueeze(1)
    x_te = torch.linspace(-6.0, 6.0, 200).unsqueeze(1)

    def targets(x: torch.Tensor) -> torch.Tensor:
        return toy_function(x[:, 0]) + TOY_NOISE_STD * torch.randn(len(x), generator=gen)

    train, test = TensorDataset(x_tr, targets(x_tr)), TensorDataset(x_te, targets(x_te))
    return Dataset("toy-regression", train, test, "regression", None, (1,))


# --------------------------------------------------------------------------- MNIST / Fashion-MNIST


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally gzipped) with ``ndim`` dimensions."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"could not read {path}: {err}") from None
    header = 4 * (ndim + 1)
    if len(raw) < header:
        raise ValueError(f"{path} is not an IDX file: too short")
    magic, *dims = np.frombuffer(raw, dtype=">u4", count=ndim + 1).tolist()
    if magic != 0x0800 + ndim:  # 0x08 = unsigned byte data; the low byte is the number of dimensions
        raise ValueError(f"{path} is not a uint8 IDX file with {ndim} dimensions (magic number {magic:#x})")
    if len(raw) - header != int(np.prod(dims)):
        size = len(raw) - header
        raise ValueError(f"{path} is truncated or corrupt: header says {dims}, found {size} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx_files(root: Path, folder: str) -> list[Path] | None:
    """Paths of the four IDX files (unpacked preferred over .gz), or ``None`` if a file is missing."""
    for directory in (root / folder / "raw", root / folder, root / "raw", root):
        found = []
        for stem in _IDX_FILES:
            candidates = [directory / stem, directory / f"{stem}.gz"]
            found.append(next((p for p in candidates if p.is_file()), None))
        if all(found):
            return found
    return None


def _load_idx_dataset(key: str, root: Path, download: bool) -> Dataset:
    folder, mean, std = _IDX_DATASETS[key]
    paths = _find_idx_files(root, folder)
    if paths is None and download:
        _torchvision_download(folder, root, key)
        paths = _find_idx_files(root, folder)
    if paths is None:
        files = ", ".join(f"{stem}.gz" for stem in _IDX_FILES)
        raise FileNotFoundError(
            f"{key} files not found in {root / folder / 'raw'} (also looked in {root / folder}, "
            f"{root / 'raw'} and {root}); expected {files} (gzipped or unpacked). "
            f"Pass root= (CLI --data-root) pointing at the folder that contains {folder}/raw, "
            "or download=True to fetch them."
        )

    def split(images: Path, labels: Path) -> TensorDataset:
        x = torch.from_numpy(_read_idx(images, 3).astype(np.float32))
        x = x.div_(255.0).sub_(mean).div_(std).unsqueeze(1)
        y = torch.from_numpy(_read_idx(labels, 1).astype(np.int64))
        return TensorDataset(x, y)

    train, test = split(paths[0], paths[1]), split(paths[2], paths[3])
    return Dataset(key, train, test, "classification", 10, (1, 28, 28))


# --------------------------------------------------------------------------- CIFAR-10


def _load_cifar_batches(paths: Sequence[Path]) -> TensorDataset:
    """Read CIFAR-10 python-pickle batches (trusted files: pickle can run code) into normalised tensors."""
    xs, ys = [], []
    for path in paths:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = batch.get(b"data", batch.get("data"))
        labels = batch.get(b"labels", batch.get("labels"))
        if data is None or labels is None:
            raise ValueError(f"{path} is not a CIFAR-10 batch: it lacks 'data' or 'labels'")
        data = np.asarray(data, dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{path}: expected data of shape (N, 3072), got {data.shape}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(labels, dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs).astype(np.float32)).div_(255.0)
    mean = torch.tensor(_CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_CIFAR_STD).view(1, 3, 1, 1)
    return TensorDataset(x.sub_(mean).div_(std), torch.from_numpy(np.concatenate(ys)))


def _find_cifar_dir(root: Path) -> Path | None:
    for directory in (root / _CIFAR_FOLDER, root):
        if all((directory / name).is_file() for name in _CIFAR_TRAIN + _CIFAR_TEST):
            return directory
    return None


def _load_cifar10(root: Path, download: bool) -> Dataset:
    directory = _find_cifar_dir(root)
    if directory is None and download:
        _torchvision_download("CIFAR10", root, "cifar10")
        directory = _find_cifar_dir(root)
    if directory is None:
        raise FileNotFoundError(
            f"cifar10 files not found in {root / _CIFAR_FOLDER} (also looked in {root}); expected "
            f"{', '.join(_CIFAR_TRAIN + _CIFAR_TEST)}. Pass root= (CLI --data-root) pointing at the "
            f"folder that contains {_CIFAR_FOLDER}, or download=True to fetch them."
        )
    train = _load_cifar_batches([directory / n for n in _CIFAR_TRAIN])
    test = _load_cifar_batches([directory / n for n in _CIFAR_TEST])
    return Dataset("cifar10", train, test, "classification", 10, (3, 32, 32))


# --------------------------------------------------------------------------- download


def _torchvision_download(class_name: str, root: Path, key: str) -> None:
    """Fetch a dataset into ``root`` with ``torchvision.datasets.<class_name>(root, download=True)``."""
    try:
        from torchvision import datasets

        getattr(datasets, class_name)(str(root), train=True, download=True)
    except Exception as err:  # offline, no torchvision, disk full, ...: all mean the same to the user
        reason = " ".join(str(err).split())  # torchvision's message spans several lines
        raise RuntimeError(
            f"could not download {key} into {root} ({type(err).__name__}: {reason}); "
            "check the network connection or pass root= pointing at existing files."
        ) from None
