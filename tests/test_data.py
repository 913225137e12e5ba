"""Tests for pyro_sparse.data: loaders, Dataset helpers and check_data."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from pyro_sparse import data
from pyro_sparse.data import DATASETS, Dataset, as_tensors, check_data, load

_REPO = Path(__file__).resolve().parents[1]
# the offline MNIST copies (see shared/data/README.md): beside the checkout, or inside it
SHARED = next(
    (p for p in (_REPO.parent / "shared" / "data", _REPO / "shared" / "data") if p.is_dir()),
    _REPO.parent / "shared" / "data",
)
IDX_NAMES = data._IDX_FILES


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load("digits")


# --------------------------------------------------------------------------- fake-file helpers


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    array = np.asarray(array, dtype=np.uint8)
    header = np.array([0x0800 + array.ndim, *array.shape], dtype=">u4").tobytes()
    payload = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_fake_mnist(directory: Path, gz: bool, n_train: int = 12, n_test: int = 5) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz)


def write_fake_cifar(directory: Path, per_batch: int = 20) -> None:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            b"batch_label": name.encode(),
        }
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f)


# --------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_split(digits: Dataset) -> None:
    x, y = digits.train.tensors
    xt, yt = digits.test.tensors
    assert (digits.name, digits.task, digits.num_classes, digits.input_shape) == (
        "digits",
        "classification",
        10,
        (1, 8, 8),
    )
    assert x.shape == (1347, 1, 8, 8) and xt.shape == (450, 1, 8, 8)
    assert y.shape == (1347,) and yt.shape == (450,)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == 0.0 and x.max() == 1.0 and xt.min() >= 0.0 and xt.max() <= 1.0
    assert set(y.tolist()) == set(range(10)) and set(yt.tolist()) == set(range(10))
    per_class = torch.bincount(torch.cat([y, yt]), minlength=10)
    assert (torch.bincount(yt, minlength=10) - 0.25 * per_class).abs().max() <= 1  # stratified split


def test_digits_deterministic_and_name_case_insensitive(digits: Dataset) -> None:
    again = load("  DIGITS ")
    before, after = digits.train.tensors + digits.test.tensors, again.train.tensors + again.test.tensors
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- MNIST / Fashion-MNIST


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"offline MNIST copies not present at {SHARED}")
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_mnist_files(name: str) -> None:
    ds = load(name, root=SHARED)
    x, y = ds.train.tensors
    xt, yt = ds.test.tensors
    assert ds.name == name and ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.shape == (60000,) and yt.shape == (10000,)
    assert set(y.unique().tolist()) == set(range(10)) == set(yt.unique().tolist())
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1.0) < 0.02
    assert abs(xt.mean().item()) < 0.05


@pytest.mark.parametrize("alias", ["fashion_mnist", "FashionMNIST", "Fashion-MNIST"])
def test_fashion_aliases(alias: str) -> None:
    assert data.canonical_name(alias) == "fashion-mnist"


@pytest.mark.parametrize(
    ("subdir", "gz"), [("MNIST/raw", True), ("MNIST/raw", False), ("raw", True), (".", False)]
)
def test_fake_mnist_layouts(tmp_path: Path, subdir: str, gz: bool) -> None:
    write_fake_mnist(tmp_path / subdir, gz=gz)
    ds = load("mnist", root=tmp_path)
    x, y = ds.train.tensors
    assert x.shape == (12, 1, 28, 28) and ds.test.tensors[0].shape == (5, 1, 28, 28)
    assert y.tolist() == [i % 10 for i in range(12)]
    assert torch.allclose(x.min(), torch.tensor(-0.1307 / 0.3081), atol=1e-3)


def test_mnist_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_mnist(tmp_path / "FashionMNIST" / "raw", gz=True)
    monkeypatch.setenv("PYRO_SPARSE_DATA", str(tmp_path))
    assert len(load("fashion-mnist").train) == 12


def test_missing_mnist_files_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load("mnist", root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in msg
    assert all(name in msg for name in IDX_NAMES)
    assert "root=" in msg and "--data-root" in msg and "download=True" in msg


def test_bad_idx_magic_number(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "MNIST" / "raw", gz=False)
    (tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x03" + bytes(12))
    with pytest.raises(ValueError, match="magic number"):
        load("mnist", root=tmp_path)


def test_download_failure_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("torchvision.datasets")

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(datasets, "MNIST", offline)
    with pytest.raises(RuntimeError, match="could not download mnist.*network is unreachable") as err:
        load("mnist", root=tmp_path, download=True)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_download_skipped_when_files_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("torchvision.datasets")

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("download attempted although the files exist")

    monkeypatch.setattr(datasets, "FashionMNIST", must_not_be_called)
    write_fake_mnist(tmp_path / "FashionMNIST" / "raw", gz=True)
    assert len(load("fashion-mnist", root=tmp_path, download=True).test) == 5


# --------------------------------------------------------------------------- CIFAR-10


def test_fake_cifar10(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path / "cifar-10-batches-py")
    ds = load("CIFAR10", root=tmp_path)
    x, y = ds.train.tensors
    xt, yt = ds.test.tensors
    assert (ds.name, ds.num_classes, ds.input_shape) == ("cifar10", 10, (3, 32, 32))
    assert x.shape == (100, 3, 32, 32) and xt.shape == (20, 3, 32, 32)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.shape == (100,)
    assert y.min() >= 0 and y.max() < 10
    # first pixel of channel 0 of the first image, normalised by hand
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        first = pickle.load(f)[b"data"][0]
    assert x[0, 0, 0, 0].item() == pytest.approx((first[0] / 255 - 0.4914) / 0.2470, abs=1e-5)
    assert x[0, 2, 0, 0].item() == pytest.approx((first[2048] / 255 - 0.4465) / 0.2616, abs=1e-5)


def test_missing_cifar_files_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py") as err:
        load("cifar10", root=tmp_path)
    assert all(f"data_batch_{i}" in str(err.value) for i in range(1, 6)) and "test_batch" in str(err.value)


# --------------------------------------------------------------------------- toy regression


def test_toy_regression_gap() -> None:
    ds = load("toy_regression")
    x, y = ds.train.tensors
    xt, yt = ds.test.tensors
    assert (ds.task, ds.num_classes, ds.input_shape) == ("regression", None, (1,))
    assert x.shape == (160, 1) and y.shape == (160,) and xt.shape == (200, 1) and yt.shape == (200,)
    assert x.dtype == y.dtype == xt.dtype == yt.dtype == torch.float32
    assert not ((x > -1.5) & (x < 1.5)).any()
    assert (x < 0).sum() == 80 and x.min() >= -4 and x.max() <= 4
    assert ((xt > -1.5) & (xt < 1.5)).sum() > 10 and xt.min() == -6 and xt.max() == 6
    residual = y - data.toy_function(x[:, 0])
    assert residual.abs().max() < 5 * data.TOY_NOISE_STD
    assert torch.equal(y, load("toy-regression").train.tensors[1])  # deterministic


# --------------------------------------------------------------------------- Dataset / as_tensors


def test_subsample(digits: Dataset) -> None:
    small = digits.subsample(train=100, test=30, seed=1)
    assert len(small.train) == 100 and len(small.test) == 30
    assert (small.name, small.num_classes, small.input_shape) == ("digits", 10, (1, 8, 8))
    x, y = small.train.tensors
    full_x, full_y = digits.train.tensors
    # every kept row is a row of the original split, with its own label
    matches = (x.flatten(1)[:, None, :] == full_x.flatten(1)[None]).all(-1)
    rows = matches.float().argmax(1)
    assert matches.any(1).all() and torch.equal(full_y[rows], y)
    again = digits.subsample(train=100, test=30, seed=1)
    assert torch.equal(again.train.tensors[0], x)
    assert not torch.equal(digits.subsample(train=100, seed=2).train.tensors[0], x)
    assert digits.subsample(test=10).train is digits.train
    assert len(digits.subsample(train=10**6).train) == len(digits.train)
    with pytest.raises(ValueError, match="positive"):
        digits.subsample(train=0)


def test_as_tensors_forms(digits: Dataset) -> None:
    x, y = torch.zeros(4, 3), torch.arange(4)
    for form in (TensorDataset(x, y), (x, y), [x, y]):
        got_x, got_y = as_tensors(form)
        assert got_x is x and got_y is y
    got_x, got_y = as_tensors((np.zeros((4, 3), dtype=np.float32), np.arange(4)))
    assert isinstance(got_x, torch.Tensor) and got_x.shape == (4, 3) and got_y.tolist() == [0, 1, 2, 3]
    got_x, got_y = as_tensors(digits)
    assert got_x is digits.train.tensors[0] and got_y is digits.train.tensors[1]
    with pytest.raises(TypeError, match="expected a Dataset"):
        as_tensors("digits")
    with pytest.raises(ValueError, match="pair"):
        as_tensors((x, y, y))


# --------------------------------------------------------------------------- check_data


def test_check_data_accepts_valid() -> None:
    check_data(torch.zeros(5, 1, 8, 8), torch.tensor([0, 1, 2, 9, 3]), num_classes=10, input_shape=(1, 8, 8))
    check_data(torch.zeros(3, 1), torch.tensor([0.5, -1.0, 2.0]), task="regression", input_shape=(1,))


@pytest.mark.parametrize(
    ("x", "y", "kwargs", "match"),
    [
        (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), {}, "dataset is empty"),
        (torch.zeros(5, 4), torch.zeros(4, dtype=torch.long), {}, r"len\(x\) = 5, len\(y\) = 4"),
        (torch.tensor([[0.0, float("nan")]]), torch.tensor([0]), {}, "inputs contain NaN or inf"),
        (torch.tensor([[float("inf")]]), torch.tensor([1.0]), {"task": "regression"}, "inputs contain NaN"),
        (torch.zeros(2, 1), torch.tensor([1.0, float("nan")]), {"task": "regression"}, "targets contain NaN"),
        (torch.zeros(2, 1), torch.tensor([0.0, 1.0]), {}, "labels must be integers"),
        (torch.zeros(3, 1), torch.tensor([0, 12, 3]), {"num_classes": 10}, r"in \[0, 10\); found 12"),
        (torch.zeros(2, 1), torch.tensor([-1, 3]), {"num_classes": 10}, r"\[0, 10\); found -1"),
        (torch.zeros(2, 1), torch.tensor([-1, 3]), {}, "non-negative; found -1"),
        (
            torch.zeros(2, 64),
            torch.tensor([0, 1]),
            {"input_shape": (1, 8, 8)},
            r"wrong input shape: expected \(1, 8, 8\) per example, got \(64,\)",
        ),
        (torch.zeros(2, 1), torch.tensor([0, 1]), {"task": "ranking"}, "task must be"),
    ],
)
def test_check_data_errors(x, y, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        check_data(x, y, **kwargs)


def test_unknown_dataset_name() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'; choose one of: digits, mnist") as err:
        load("imagenet")
    assert all(name in str(err.value) for name in DATASETS)


def test_as_tensors_reads_any_map_style_dataset_of_pairs() -> None:
    class Pairs(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 5

        def __getitem__(self, index: int):
            return torch.full((1, 2, 2), float(index)), index % 3

    x, y = as_tensors(Pairs())
    assert x.shape == (5, 1, 2, 2) and torch.equal(y, torch.tensor([0, 1, 2, 0, 1]))
    assert torch.equal(x[3], torch.full((1, 2, 2), 3.0))

    class Singles(Pairs):
        def __getitem__(self, index: int):
            return torch.zeros(3)

    with pytest.raises(ValueError, match="expected dataset items to be \\(x, y\\) pairs"):
        as_tensors(Singles())


# --------------------------------------------------------------------------- damaged and crafted dataset files


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (_flip_middle_byte, "cannot be read .*damaged or truncated"),
        (lambda path: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2]), "damaged or truncated"),
        (lambda path: path.write_bytes(b"not gzip at all"), "cannot be read"),
        (lambda path: path.write_bytes(b""), "cannot be read|too short"),
    ],
    ids=["bit-flip", "truncated", "not-gzip", "empty"],
)
def test_a_damaged_gz_file_is_one_value_error_naming_it(tmp_path: Path, damage, problem) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_fake_mnist(raw, gz=True, n_train=200)
    damaged = raw / "train-images-idx3-ubyte.gz"
    damage(damaged)
    with pytest.raises(ValueError, match=problem) as err:
        load("mnist", root=tmp_path)
    message = str(err.value)
    assert str(damaged) in message and "download it again" in message and "\n" not in message
    assert err.value.__cause__ is None


@pytest.mark.parametrize("n_labels", [11, 13])
def test_train_labels_of_the_wrong_count(tmp_path: Path, n_labels: int) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_fake_mnist(raw, gz=False)
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(n_labels) % 10)
    with pytest.raises(ValueError, match=f"holds {n_labels} labels but .*train-images-idx3-ubyte holds 12 images"):
        load("mnist", root=tmp_path)


def test_images_of_the_wrong_size(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_fake_mnist(raw, gz=False)
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((5, 20, 20)))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte holds images of 20x20 pixels, not 28x28"):
        load("mnist", root=tmp_path)


def test_a_relative_root_is_read_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_mnist(tmp_path / "datasets" / "MNIST" / "raw", gz=True)
    monkeypatch.chdir(tmp_path)
    assert len(load("mnist", root="datasets").train) == 12
    assert len(load("mnist", root=Path("datasets")).test) == 5


class _TouchOnUnpickle:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("where", ["data", "labels", "top"])
def test_a_cifar_batch_with_code_in_it_is_refused_and_never_run(tmp_path: Path, where: str) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_fake_cifar(folder)
    marker = tmp_path / "pwned"
    batch = {b"data": np.zeros((20, 3072), dtype=np.uint8), b"labels": [0] * 20}
    crafted = _TouchOnUnpickle(marker)
    if where == "top":
        batch = crafted
    else:
        batch[where.encode()] = crafted
    (folder / "data_batch_3").write_bytes(pickle.dumps(batch))
    pickle.loads(pickle.dumps(_TouchOnUnpickle(tmp_path / "control")))  # the payload is real
    assert (tmp_path / "control").exists()
    with pytest.raises(ValueError, match="data_batch_3 was refused: it asks to load pathlib.*Path.touch") as err:
        load("cifar10", root=tmp_path)
    assert not marker.exists()
    assert "download" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_of_every_pickle_protocol_load(tmp_path: Path, protocol: int) -> None:
    """The allowlist covers how numpy arrays, numpy scalars and bytes pickle at protocol 2 (as the
    original Python 2 files), 4 and 5."""
    folder = tmp_path / "cifar-10-batches-py"
    write_fake_cifar(folder)
    batch = {b"data": np.full((20, 3072), 255, dtype=np.uint8), b"labels": [np.int64(i % 10) for i in range(20)],
             b"batch_label": b"test batch", b"filenames": [b"a.png"] * 20}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
    x, y = load("cifar10", root=tmp_path).test.tensors
    assert y.tolist() == [i % 10 for i in range(20)]
    assert x[0, 0, 0, 0].item() == pytest.approx((1 - 0.4914) / 0.2470, abs=1e-5)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (lambda good: good[: len(good) // 2], "cannot be read as a CIFAR-10 batch"),
        (lambda good: b"", "cannot be read as a CIFAR-10 batch"),
        (lambda good: pickle.dumps([1, 2, 3]), "not a CIFAR-10 batch: it holds a list"),
        (lambda good: pickle.dumps({b"data": np.zeros((20, 3072), dtype=np.uint8)}), "lacks 'data' or 'labels'"),
        (lambda good: pickle.dumps({b"data": np.zeros((20, 3072), dtype=np.uint8), b"labels": [1] * 19}),
         "holds 20 images but labels of shape \\(19,\\)"),
    ],
    ids=["truncated", "empty", "a-list", "no-labels", "label-count"],
)
def test_a_damaged_cifar_batch_is_one_value_error_naming_it(tmp_path: Path, content, problem) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_fake_cifar(folder)
    path = folder / "data_batch_2"
    path.write_bytes(content(path.read_bytes()))
    with pytest.raises(ValueError, match=problem) as err:
        load("cifar10", root=tmp_path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_an_idx_file_announcing_more_than_it_holds_is_read_no_further(tmp_path):
    """A gzip whose header claims 60000 images but holds 10 is refused after reading what it holds."""
    import gzip

    import numpy as np

    path = tmp_path / "train-images-idx3-ubyte.gz"
    header = np.array([0x0803, 60000, 28, 28], dtype=">u4").tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(header + bytes(10 * 28 * 28))
    with pytest.raises(ValueError, match="truncated or corrupt: header says"):
        data._read_idx(path, 3)
    with gzip.open(path, "wb") as handle:  # and one announcing more than any dataset: refused from the header
        handle.write(np.array([0x0803, 2**31, 2**16, 2**16], dtype=">u4").tobytes())
    with pytest.raises(ValueError, match="more than any IDX dataset"):
        data._read_idx(path, 3)
