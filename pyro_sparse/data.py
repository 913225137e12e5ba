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
gzip/numpy and a restricted unpickler, so nothing is written and no network is needed.
``download=True`` uses torchvision to fetch files that are missing.

Dataset files may come from anyone: a file that cannot be read (corrupt, truncated, not a dataset
file) is one ``ValueError`` naming the file, the problem and the fix, and a CIFAR-10 batch is
unpickled with an unpickler that only rebuilds numpy arrays and plain containers, so a crafted
batch cannot run code.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import math
import numbers
import os
import pickle
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["DATASETS", "Dataset", "as_tensors", "canonical_name", "check_data", "load", "resolve_root"]

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
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
        raise ValueError(f"subsample size for {label} must be a positive integer (or None for all); got {n!r}")
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
    if y.ndim != 1:
        raise ValueError(_target_shape_error(task, tuple(y.shape)))
    if task == "regression":
        if y.is_floating_point() and not torch.isfinite(y).all():
            raise ValueError("regression targets contain NaN or inf")
        return
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels must be integers (class indices); got dtype {y.dtype}: convert them with y.long()")
    lo, hi = int(y.min()), int(y.max())
    if num_classes is not None and (lo < 0 or hi >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); found {hi if hi >= num_classes else lo}")
    if lo < 0:
        raise ValueError(f"labels must be non-negative; found {lo}")


def _target_shape_error(task: str, shape: tuple[int, ...]) -> str:
    """The message for targets that are not of shape (N,), with the usual fix."""
    column = len(shape) == 2 and shape[1] == 1
    shown = "(N, 1)" if column else str(shape)
    if task == "classification":
        fix = "use y.squeeze(1)" if column else "pass one class index per example (for one-hot targets y.argmax(1))"
        return f"classification targets must have shape (N,) of class indices, got {shown}: {fix}"
    fix = "use y.squeeze(1)" if column else "pass one target value per example"
    return f"regression targets must have shape (N,), got {shown}: {fix}"


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
        TypeError: ``name``, ``root`` or ``download`` of the wrong type.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}: choose one of: {', '.join(DATASETS)}")
    if root is not None:
        resolve_root(root)  # refuse a root of the wrong type even for the datasets that read no files
    if not isinstance(download, bool):
        raise TypeError(f"download must be True or False, got {download!r}")
    key = canonical_name(name)
    if key == "digits":
        ds = _load_digits()
    elif key == "toy-regression":
        ds = _load_toy_regression()
    elif key in _IDX_DATASETS:
        ds = _load_idx_dataset(key, resolve_root(root), download)
    else:
        ds = _load_cifar10(resolve_root(root), download)
    for split in (ds.train, ds.test):
        check_data(*split.tensors, task=ds.task, num_classes=ds.num_classes, input_shape=ds.input_shape)
    return ds


def canonical_name(name: str) -> str:
    """The dataset name that ``name`` (case, "_" or an alias such as "fmnist") stands for."""
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, _ALIASES.get(key.replace("-", ""), key))
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return key


def resolve_root(root: str | os.PathLike | None) -> Path:
    """The data folder: ``root`` (absolute or relative to the working directory), else the default."""
    if root is None:
        root = os.environ.get("PYRO_SPARSE_DATA") or "./data"
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a folder path (str or os.PathLike), got {type(root).__name__}: "
                        "pass e.g. root='data'")
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


_MAX_IDX_BYTES = 2**31  # 2 GiB: MNIST's training images are 47 MB
_REFETCH = "delete it and download it again (download=True), or restore the original file"

# What reading a damaged file raises: gzip's CRC / header checks (OSError), a cut stream (EOFError), a
# damaged deflate stream (zlib.error).
_READ_ERRORS = (OSError, EOFError, zlib.error)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally gzipped) with ``ndim`` dimensions.

    It reads the header first and then no more than the header announces (plus one byte to detect
    excess), so a damaged or hostile ``.gz`` cannot make it decompress more than the images it claims.
    """
    header = 4 * (ndim + 1)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            head = f.read(header)
            if len(head) < header:
                raise ValueError(f"{path} is not an IDX file: it is too short ({len(head)} bytes); {_REFETCH}")
            magic, *dims = np.frombuffer(head, dtype=">u4").tolist()
            if magic != 0x0800 + ndim:  # 0x08 = unsigned byte data; the low byte is the number of dimensions
                raise ValueError(
                    f"{path} is not a uint8 IDX file with {ndim} dimensions (magic number {magic:#x}); {_REFETCH}"
                )
            expected = math.prod(dims)
            if expected > _MAX_IDX_BYTES:
                raise ValueError(f"{path} announces {dims} ({expected} bytes), more than any IDX dataset: {_REFETCH}")
            body = f.read(expected + 1)
    except _READ_ERRORS as err:
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise ValueError(f"{path} cannot be read ({reason}): the file is damaged or truncated; {_REFETCH}") from None
    if len(body) != expected:
        found = f"{len(body)} bytes" if len(body) <= expected else "more bytes"
        raise ValueError(f"{path} is truncated or corrupt: header says {dims}, found {found}; {_REFETCH}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


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

    train, test = _idx_split(paths[0], paths[1], mean, std), _idx_split(paths[2], paths[3], mean, std)
    return Dataset(key, train, test, "classification", 10, (1, 28, 28))


def _idx_split(images: Path, labels: Path, mean: float, std: float) -> TensorDataset:
    """One split from its image and label files: normalised (N, 1, 28, 28) images and (N,) labels."""
    pixels = _read_idx(images, 3)
    if pixels.shape[1:] != (28, 28):
        raise ValueError(f"{images} holds images of {pixels.shape[1]}x{pixels.shape[2]} pixels, not 28x28: "
                         f"it is not an MNIST file; {_REFETCH}")
    classes = _read_idx(labels, 1)
    if len(classes) != len(pixels):
        raise ValueError(
            f"{labels} holds {len(classes)} labels but {images} holds {len(pixels)} images: the files do not "
            "belong together; delete both and download them again (download=True), or restore the original files"
        )
    x = torch.from_numpy(pixels.astype(np.float32)).div_(255.0).sub_(mean).div_(std).unsqueeze(1)
    return TensorDataset(x, torch.from_numpy(classes.astype(np.int64)))


# --------------------------------------------------------------------------- CIFAR-10


def _numpy_global(module: str, name: str) -> Any:
    """``numpy._core.<module>.<name>`` (numpy 2), else ``numpy.core.<module>.<name>`` (numpy 1)."""
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{module}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {module}.{name}")


def _cifar_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR-10 batch needs: numpy's array, dtype and scalar reconstruction, and
    ``_codecs.encode`` (how Python 3 pickles bytes at protocol 2)."""
    import _codecs

    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _codecs.encode}
    for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")):
        value = _numpy_global(module, name)
        allowed[(f"numpy.core.{module}", name)] = value
        allowed[(f"numpy._core.{module}", name)] = value
    return allowed


class _ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a global that a CIFAR-10 batch never holds."""


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and plain containers and refuses every other global."""

    def __init__(self, handle, allowed: dict[tuple[str, str], Any]):
        super().__init__(handle, encoding="bytes")
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(f"{module}.{name}") from None


def _unpickle_cifar_batch(path: Path) -> Any:
    """The object in a CIFAR-10 batch file, read with ``_CifarUnpickler``; a refused or damaged file is a
    ValueError naming it."""
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, _cifar_globals()).load()
    except _ForbiddenGlobal as err:
        raise ValueError(
            f"{path} was refused: it asks to load {err}, which a CIFAR-10 batch never holds (a crafted pickle "
            f"can run code); it is not a CIFAR-10 batch: {_REFETCH}"
        ) from None
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, UnicodeDecodeError) as err:
        reason = " ".join(str(err).split())[:120] or type(err).__name__
        raise ValueError(
            f"{path} cannot be read as a CIFAR-10 batch ({reason}): the file is damaged or truncated; {_REFETCH}"
        ) from None


def _cifar_batch_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one CIFAR-10 batch file."""
    batch = _unpickle_cifar_batch(path)
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch: it holds a {type(batch).__name__}, not a dict; {_REFETCH}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path} is not a CIFAR-10 batch: it lacks 'data' or 'labels'; {_REFETCH}")
    try:
        data, labels = np.asarray(data, dtype=np.uint8), np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"{path} is not a CIFAR-10 batch: its data or labels are not numbers ({err}); {_REFETCH}") \
            from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected data of shape (N, 3072), got {data.shape}; {_REFETCH}")
    if labels.shape != (len(data),):
        raise ValueError(
            f"{path} holds {len(data)} images but labels of shape {labels.shape}: the file is damaged; {_REFETCH}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar_batches(paths: Sequence[Path]) -> TensorDataset:
    """Read CIFAR-10 python-pickle batches (with a restricted unpickler) into normalised tensors."""
    xs, ys = zip(*(_cifar_batch_arrays(path) for path in paths), strict=True)
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
