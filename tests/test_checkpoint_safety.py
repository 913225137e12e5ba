"""Checkpoints are safe to load: a crafted file never runs code, a damaged one is one clear error.

Every refusal here is real: a class whose ``__reduce__`` touches a marker file is pickled into the
files ``pyro-sparse evaluate`` and ``pyro-sparse train --resume`` read, as a plain torch.save/pickle
file and inside a correctly-headered checkpoint with a valid checksum (an attacker can compute it).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyro_sparse as ps
from pyro_sparse import checkpoint, cli
from pyro_sparse.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]


class TouchOnUnpickle:
    """Unpickling this object creates ``marker``: the stand-in for an attacker's code."""

    def __init__(self, marker: Path):
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def malicious_state(marker: Path) -> dict:
    """What a checkpoint looks like, with the payload hidden inside its metadata."""
    return {"model": {"w": torch.zeros(2)}, "epoch": 1, "metadata": {"method": "vi", "hook": TouchOnUnpickle(marker)}}


def torch_save_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def headered(payload: bytes, package: str | None = None, format_version: int | None = None) -> bytes:
    """A checkpoint file around ``payload`` with a valid checksum, written as the module docstring specifies."""
    header = {
        "format": checkpoint.FORMAT if format_version is None else format_version,
        "package_version": checkpoint.package_version() if package is None else package,
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    return checkpoint.MAGIC + json.dumps(header).encode() + b"\n" + payload


def malicious_file(kind: str, marker: Path) -> bytes:
    """The bytes of a crafted file: a raw torch.save, a raw pickle, or a headered checkpoint."""
    if kind == "raw-torch":
        return torch_save_bytes(malicious_state(marker))
    if kind == "raw-pickle":
        return pickle.dumps(malicious_state(marker))
    return headered(torch_save_bytes(malicious_state(marker)))


KINDS = ("raw-torch", "raw-pickle", "headered")


def plant(folder: Path, name: str, kind: str, marker: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(malicious_file(kind, marker))
    return path


def assert_one_line_naming(err: str, path: Path) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert str(path) in lines[0] and "Traceback" not in err


# --------------------------------------------------------------------------- the payload


def test_the_payload_really_runs_when_unpickled_unsafely(tmp_path):
    """Without the defence the marker appears: the tests below would notice a leak."""
    for kind in KINDS[:2]:
        marker = tmp_path / f"control-{kind}"
        data = malicious_file(kind, marker)
        if kind == "raw-torch":
            torch.load(io.BytesIO(data), weights_only=False)
        else:
            pickle.loads(data)
        assert marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_load_refuses_a_payload_and_never_runs_it(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = plant(tmp_path, "checkpoint.pt", kind, marker)
    with pytest.raises(CheckpointError) as refused:
        checkpoint.load(path)
    assert not marker.exists()
    assert refused.value.path == path and str(path) in str(refused.value)
    expected = "tensors and plain data" if kind == "headered" else "not a pyro-sparse checkpoint"
    assert expected in refused.value.reason
    assert "weights_only" not in str(refused.value)  # never advises the unsafe retry torch's own message suggests
    assert "\n" not in str(refused.value)


# --------------------------------------------------------------------------- through the CLI


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["checkpoint.pt", "dense.pt"])
def test_cli_evaluate_refuses_a_crafted_file(tmp_path, capsys, kind, name):
    marker = tmp_path / "pwned"
    path = plant(tmp_path / "run", name, kind, marker)
    assert cli.main(["evaluate", str(path.parent)]) == 2
    assert_one_line_naming(capsys.readouterr().err, path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("method", "name"), [("vi", "checkpoint.pt"), ("snr", "dense.pt"), ("snr", "checkpoint.pt")])
def test_cli_train_resume_refuses_a_crafted_file(tmp_path, capsys, kind, method, name):
    marker = tmp_path / "pwned"
    path = plant(tmp_path / "run", name, kind, marker)
    argv = ["train", "--method", method, "--epochs", "1", "--samples", "2", "--resume", "--out", str(path.parent)]
    assert cli.main(argv) == 2
    assert_one_line_naming(capsys.readouterr().err, path)
    assert not marker.exists()
    assert not (path.parent / "metrics.json").exists()


@pytest.mark.parametrize("kind", ["raw-torch", "headered"])
def test_the_installed_command_refuses_a_crafted_file(tmp_path, kind):
    """A real process, as a user would run it: ``python -m pyro_sparse.cli evaluate DIR``."""
    marker = tmp_path / "pwned"
    path = plant(tmp_path / "run", "checkpoint.pt", kind, marker)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "pyro_sparse.cli", "evaluate", str(path.parent)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert_one_line_naming(done.stderr, path)
    assert not marker.exists()


# --------------------------------------------------------------------------- damaged and foreign files


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint written by ``fit`` (fused Adam state, RNG states, history, metadata)."""
    digits = ps.data.load("digits").subsample(train=200, test=50)
    model = ps.BayesianNetwork(ps.nets.mlp(64, (16,), 10), dataset_size=len(digits.train))
    path = tmp_path_factory.mktemp("real") / "checkpoint.pt"
    ps.fit(model, ps.MeanField(model), digits.train, epochs=1, batch_size=64, seed=0, checkpoint=path,
           metadata={"method": "vi", "hidden": [16], "data_root": None})
    return path


def cut_in_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def flip_a_payload_bit(data: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[-100] ^= 0x10
    return bytes(damaged)


def rewrite_header(data: bytes, **changes) -> bytes:
    """The same payload under a header with ``changes`` (and a checksum that still matches)."""
    start = len(checkpoint.MAGIC)
    end = data.index(b"\n", start)
    header = {**json.loads(data[start:end]), **changes}
    return checkpoint.MAGIC + json.dumps(header).encode() + b"\n" + data[end + 1:]


DAMAGE = [
    ("empty", lambda data: b"", "the file is empty"),
    ("truncated", cut_in_half, "truncated: the header announces"),
    ("truncated header", lambda data: data[:10], "truncated inside its header"),
    ("bit flip", flip_a_payload_bit, "SHA-256 checksum does not match"),
    ("random bytes", lambda data: os.urandom(4096), "not a pyro-sparse checkpoint"),
    ("trailing bytes", lambda data: data + b"extra", "bytes follow the announced payload"),
    ("header not JSON", lambda data: checkpoint.MAGIC + b"{not json\n" + data, "header is not valid JSON"),
    ("other package", lambda data: rewrite_header(data, package_version="0.0.1"),
     r"written by pyro-sparse 0\.0\.1, but this is pyro-sparse " + checkpoint.package_version().replace(".", r"\.")),
    ("other format", lambda data: rewrite_header(data, format=99), r"checkpoint format 99, .* reads format 1"),
    ("checksum missing", lambda data: rewrite_header(data, payload_sha256=None), "lacks a valid 'payload_sha256'"),
]


@pytest.mark.parametrize(("damage", "reason"), [(fn, reason) for _, fn, reason in DAMAGE],
                         ids=[name for name, _, _ in DAMAGE])
def test_a_damaged_or_foreign_checkpoint_is_one_clear_error(tmp_path, real_checkpoint, damage, reason):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(damage(real_checkpoint.read_bytes()))
    with pytest.raises(CheckpointError, match=reason) as refused:
        checkpoint.load(path)
    message = str(refused.value)
    assert message.startswith(f"checkpoint {path} refused: ") and "\n" not in message
    assert any(fix in message for fix in ("restore it", "train again", "install pyro-sparse", "use a checkpoint",
                                          "load it with"))


def test_a_missing_checkpoint_is_a_checkpoint_error_and_a_file_not_found_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at this path") as refused:
        checkpoint.load(tmp_path / "missing.pt")
    assert isinstance(refused.value, FileNotFoundError) and isinstance(refused.value, ValueError)


def test_the_header_is_readable_without_the_payload(tmp_path, real_checkpoint):
    header = checkpoint.read_header(real_checkpoint)
    assert header["format"] == checkpoint.FORMAT and header["package_version"] == ps.__version__
    payload = real_checkpoint.read_bytes()[-header["payload_bytes"]:]
    assert header["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    foreign = tmp_path / "old.pt"
    foreign.write_bytes(rewrite_header(real_checkpoint.read_bytes(), package_version="0.0.1"))
    assert checkpoint.read_header(foreign)["package_version"] == "0.0.1"  # shown, while load refuses it
    with pytest.raises(CheckpointError, match="not a pyro-sparse checkpoint"):
        checkpoint.read_header(plant(tmp_path, "raw.pt", "raw-torch", tmp_path / "pwned"))


# --------------------------------------------------------------------------- what the package writes


def test_a_fit_checkpoint_loads_with_weights_only(real_checkpoint):
    saved = checkpoint.load(real_checkpoint)
    assert {"model", "guide", "optimizer", "shuffle_rng", "torch_rng", "history", "epoch", "metadata"} <= set(saved)
    assert saved["metadata"]["hidden"] == [16] and saved["epoch"] == 1
    assert saved["torch_rng"].dtype == torch.uint8 and isinstance(saved["history"][0]["loss"], float)


def test_a_round_trip_is_bit_exact(tmp_path):
    generator = torch.Generator().manual_seed(3)
    state = {
        "weights": {"w32": torch.randn(4, 5), "w64": torch.randn(3, dtype=torch.float64),
                    "half": torch.randn(6, dtype=torch.bfloat16), "index": torch.arange(7),
                    "mask": torch.rand(5) > 0.5},
        "torch_rng": torch.get_rng_state(), "generator": generator.get_state(),
        "layout": (("0.weight", torch.Size([16, 64])), ("0.bias", torch.Size([16]))),
        "history": [{"epoch": 1, "loss": 0.1 + 0.2, "phase": "dense"}], "nothing": None, "flag": True,
        "tiny": 5e-324, "text": "é ü", "dtype": torch.float16,
    }
    path = checkpoint.save(state, tmp_path / "state.pt")
    loaded = checkpoint.load(path)
    for name, tensor in state["weights"].items():
        assert loaded["weights"][name].dtype == tensor.dtype and torch.equal(loaded["weights"][name], tensor)
    assert torch.equal(loaded["torch_rng"], state["torch_rng"])
    assert torch.equal(loaded["generator"], generator.get_state())
    assert loaded["layout"] == state["layout"] and isinstance(loaded["layout"][0][1], torch.Size)
    assert {key: loaded[key] for key in ("history", "nothing", "flag", "tiny", "text", "dtype")} == {
        key: state[key] for key in ("history", "nothing", "flag", "tiny", "text", "dtype")}
    assert loaded["history"][0]["loss"] == 0.1 + 0.2  # the very same float
    assert checkpoint.save(loaded, tmp_path / "again.pt").read_bytes() == path.read_bytes()


def test_save_refuses_what_weights_only_could_not_load_and_keeps_the_last_good_file(tmp_path):
    path = checkpoint.save({"value": torch.arange(3)}, tmp_path / "state.pt")
    with pytest.raises(TypeError, match=r"state\['generator'\] is a torch\._C\.Generator.*convert it"):
        checkpoint.save({"value": torch.arange(4), "generator": torch.Generator()}, path)
    with pytest.raises(TypeError, match="must be a dict"):
        checkpoint.save([torch.arange(3)], path)
    assert torch.equal(checkpoint.load(path)["value"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a device that is missing; where CUDA "
                    "exists the load succeeds instead (CI has no GPU, so it runs there)")
def test_a_missing_device_is_named_rather_than_blamed_on_the_file(tmp_path):
    path = checkpoint.save({"value": torch.arange(3)}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="tensors cannot be placed on cuda .*: load it with map_location='cpu'"):
        checkpoint.load(path, map_location="cuda")


def test_atomic_writes_get_the_permissions_open_would_give(tmp_path):
    """mkstemp makes its file private (0600); a run folder's files must be readable as any other file."""
    mask = os.umask(0o022)
    os.umask(mask)
    path = checkpoint.save({"value": torch.arange(3)}, tmp_path / "checkpoint.pt")
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
