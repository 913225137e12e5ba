"""Checkpoints that are safe to load: atomic writes, a verified header, tensors and plain data only.

A crash mid-write leaves the previous good file in place (``atomic_write``). ``load`` never unpickles
anything but tensors and plain data (``torch.load(weights_only=True)``), and only after the file has
proved to be an intact pyro-sparse checkpoint of this format and package version, so a file someone
hands you cannot run code.

On-disk format (format version 1)::

    PYRO-SPARSE-CHECKPOINT\\n                      line 1: the magic line
    {"format": 1, "package_version": "0.1.0",     line 2: one JSON object (UTF-8, at most 4 KiB)
     "payload_bytes": 12345, "payload_sha256": "9f86d0..."}\\n
    <payload_bytes bytes>                          the payload: ``torch.save`` of the state

Header fields: ``format`` (int, this module's ``FORMAT``), ``package_version`` (the pyro-sparse
version that wrote the file), ``payload_bytes`` (the payload's length) and ``payload_sha256`` (hex
SHA-256 of the payload). The header holds nothing secret; ``read_header`` returns it without reading
the payload. The state must be a dict whose leaves are tensors, ``torch.Size``, ``torch.dtype``,
``torch.device``, str, bytes, int, float, bool or None, in dicts, lists and tuples: ``save`` refuses
anything else (convert it to plain data first, e.g. a ``Generator`` to ``generator.get_state()``).

``load`` refuses with one-line ``CheckpointError`` s: a missing, empty or truncated file, a file
without the magic line (a plain ``torch.save`` or pickle file), a corrupt header, a checksum
mismatch, another format or package version, and a payload that is not tensors and plain data.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .errors import CheckpointError

MAGIC = b"PYRO-SPARSE-CHECKPOINT\n"
"""The first line of every checkpoint file."""

FORMAT = 1
"""The checkpoint format this module writes and reads."""

MAX_HEADER_BYTES = 4096
"""Longest header line ``load`` accepts (a longer one is not ours)."""

_HEADER_FIELDS = {"format": int, "package_version": str, "payload_bytes": int, "payload_sha256": str}
_PLAIN_LEAVES = (torch.Size, torch.dtype, torch.device, str, bytes, int, float, bool, type(None))
_CONTAINERS = (dict, OrderedDict, list, tuple)


class _MissingCheckpoint(CheckpointError, FileNotFoundError):
    """A checkpoint path with no file: a ``CheckpointError`` that ``except FileNotFoundError`` also catches."""


@functools.lru_cache(maxsize=1)
def package_version() -> str:
    """The installed pyro-sparse version (its distribution metadata, else ``pyro_sparse.__version__``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pyro-sparse")
    except PackageNotFoundError:
        from . import __version__  # imported here: this module is imported while the package initialises

        return __version__


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would create it (mkstemp makes it private)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(data))


def plain(value: Any) -> Any:
    """``value`` with every numpy scalar (``np.float64(0.01)``, ``np.int64(3)``) replaced by the Python
    scalar it holds; ``value`` itself when it has none (state dicts keep their type and metadata)."""
    if isinstance(value, np.generic):
        return value.item()
    if type(value) in _CONTAINERS:
        items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
        converted = [(key, plain(item)) for key, item in items]
        if all(new is old for (_, new), (_, old) in zip(converted, items, strict=True)):
            return value
        if isinstance(value, dict):
            return type(value)(converted)
        return type(value)(item for _, item in converted)
    return value


def check_plain_data(value: Any, where: str = "state") -> None:
    """Raise TypeError unless ``value`` is tensors and plain data that ``torch.load(weights_only=True)`` reads.

    Leaves are compared by exact type (``np.float64`` is a ``float`` subclass that the loader refuses).
    """
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN_LEAVES:
        return
    if type(value) not in _CONTAINERS:
        raise TypeError(
            f"checkpoint {where} is a {type(value).__module__}.{type(value).__qualname__}: checkpoints hold only "
            "tensors and plain data (dict, list, tuple, str, int, float, bool, None); convert it before saving"
        )
    if isinstance(value, dict):
        for key, item in value.items():
            check_plain_data(key, f"{where} key {key!r}")
            check_plain_data(item, f"{where}[{key!r}]")
    else:
        for index, item in enumerate(value):
            check_plain_data(item, f"{where}[{index}]")


def header_bytes(payload: bytes, package: str | None = None, format_version: int = FORMAT) -> bytes:
    """The magic line and the JSON header line of ``payload`` (``package`` defaults to this version)."""
    header = {
        "format": format_version,
        "package_version": package_version() if package is None else package,
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n"


def encode(state: dict[str, Any]) -> bytes:
    """The bytes of a checkpoint file holding ``state`` (header and payload)."""
    if not isinstance(state, dict):
        raise TypeError(f"a checkpoint state must be a dict, got {type(state).__name__}: wrap it, e.g. {{'value': x}}")
    state = plain(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)  # first, so that its own errors reach the caller unchanged
    check_plain_data(state)
    payload = buffer.getvalue()
    return header_bytes(payload) + payload


def save(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` (tensors and plain data) atomically to ``path`` in the checkpoint format."""
    data = encode(state)
    return atomic_write_bytes(path, data)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def _read_file(path: Path) -> bytes:
    if not path.is_file():
        raise _MissingCheckpoint(path, "there is no checkpoint at this path: check the path, or train first")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(path, f"it cannot be read ({error.strerror or error}): check its permissions") from None
    if not data:
        raise CheckpointError(path, "the file is empty (an interrupted copy?): restore it or train again")
    return data


def _split_header(path: Path, data: bytes) -> tuple[dict[str, Any], bytes]:
    """The parsed header and the payload bytes of the file contents ``data``."""
    if not data.startswith(MAGIC):
        if MAGIC.startswith(data):
            raise CheckpointError(path, "the file is truncated inside its header: restore it or train again")
        raise CheckpointError(
            path,
            "not a pyro-sparse checkpoint (no PYRO-SPARSE-CHECKPOINT header; plain torch.save or pickle files are "
            "never loaded, as they can run code): use a checkpoint written by pyro-sparse",
        )
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER_BYTES + 1)
    if end < 0:
        if len(data) <= len(MAGIC) + MAX_HEADER_BYTES:
            raise CheckpointError(path, "the file is truncated inside its header: restore it or train again")
        raise CheckpointError(path, f"the header line is longer than {MAX_HEADER_BYTES} bytes: the file is corrupt")
    return _parse_header(path, data[len(MAGIC):end]), data[end + 1:]


def _parse_header(path: Path, line: bytes) -> dict[str, Any]:
    try:
        header = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(path, "its header is not valid JSON: the file is corrupt; restore it or train again")
    if not isinstance(header.get("format"), int):
        raise CheckpointError(path, "its header lacks the format version: the file is corrupt; restore it")
    return header


def _check_header(path: Path, header: dict[str, Any]) -> None:
    """Refuse another format or package version, or a header missing a field."""
    if header["format"] != FORMAT:
        raise CheckpointError(
            path,
            f"it is in checkpoint format {header['format']}, but pyro-sparse {package_version()} reads format "
            f"{FORMAT}: load it with the pyro-sparse version that wrote it ({header.get('package_version', '?')})",
        )
    for field, kind in _HEADER_FIELDS.items():
        if not isinstance(header.get(field), kind) or isinstance(header.get(field), bool):
            raise CheckpointError(path, f"its header lacks a valid {field!r}: the file is corrupt; restore it")
    if header["package_version"] != package_version():
        raise CheckpointError(
            path,
            f"it was written by pyro-sparse {header['package_version']}, but this is pyro-sparse "
            f"{package_version()}: install pyro-sparse {header['package_version']} to use it, or train again",
        )


def _check_payload(path: Path, header: dict[str, Any], payload: bytes) -> None:
    expected = header["payload_bytes"]
    if len(payload) < expected:
        raise CheckpointError(
            path, f"the file is truncated: the header announces {expected} payload bytes, found {len(payload)}; "
            "restore it or train again",
        )
    if len(payload) > expected:
        raise CheckpointError(
            path, f"the file is corrupt: {len(payload) - expected} bytes follow the announced payload; restore it",
        )
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise CheckpointError(
            path, "the file is corrupt: its SHA-256 checksum does not match the header; restore it or train again"
        )


def _unpickling_reason(error: BaseException) -> str:
    """One sentence of why ``torch.load(weights_only=True)`` refused a payload: what it met ("Unsupported
    global: GLOBAL posix.system ..."), without torch's advice to retry with the weights-only restriction
    off or to allowlist the global, which is exactly what must not be done with such a file."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    unsafe = ("weights_only", "Weights only load failed", "Please file an issue", "Check the documentation", "\x1b")
    detail = next((line for line in lines if not any(word in line for word in unsafe)), type(error).__name__)
    return detail.split(". ")[0].rstrip(".")[:160]


def _storage_location(map_location: str | torch.device | None) -> str | torch.device | None:
    """``map_location`` as ``torch.load`` understands it: it knows "cpu" but not "cpu:0"."""
    if map_location is None:
        return None
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError, ValueError):
        return map_location  # torch.load says what is wrong with it
    return "cpu" if device.type == "cpu" else device


def _unpickle(path: Path, payload: bytes, map_location: str | torch.device | None) -> dict[str, Any]:
    map_location = _storage_location(map_location)
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as error:  # any failure of unpickling the payload means the same: refuse the file
        if map_location is not None and _loads_on_cpu(payload):
            raise CheckpointError(
                path, f"its tensors cannot be placed on {map_location} ({_unpickling_reason(error)}): load it with "
                "map_location='cpu' or on a machine with that device",
            ) from None
        raise CheckpointError(
            path,
            f"its payload holds something other than tensors and plain data ({_unpickling_reason(error)}); it was "
            "not written by pyro-sparse's save: do not use it",
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(path, f"its payload is a {type(state).__name__}, not a dict: it was not written by save")
    return state


def _loads_on_cpu(payload: bytes) -> bool:
    """Whether the payload unpickles (weights only) onto the CPU: then only its target device was the problem."""
    try:
        torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception:  # the payload itself is refused
        return False
    return True


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The header of the checkpoint at ``path`` (format, package_version, payload_bytes, payload_sha256).

    Reads only the header line: the payload is neither checked nor unpickled, and a header of
    another package or format version is returned as it is (``load`` refuses those).
    """
    path = Path(path)
    if not path.is_file():
        raise _MissingCheckpoint(path, "there is no checkpoint at this path: check the path, or train first")
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(MAGIC) + MAX_HEADER_BYTES + 1)
    except OSError as error:
        raise CheckpointError(path, f"it cannot be read ({error.strerror or error}): check its permissions") from None
    if not head:
        raise CheckpointError(path, "the file is empty (an interrupted copy?): restore it or train again")
    return _split_header(path, head)[0]


def load(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save``: the state dict, tensors moved to ``map_location``.

    Raises:
        CheckpointError: (a ValueError; also a FileNotFoundError when the file is missing) the file is
            missing, empty, truncated, corrupt, not a pyro-sparse checkpoint, of another format or
            package version, or holds something other than tensors and plain data.
    """
    path = Path(path)
    data = _read_file(path)
    header, payload = _split_header(path, data)
    _check_header(path, header)
    _check_payload(path, header, payload)
    return _unpickle(path, payload, map_location)


__all__ = [
    "FORMAT",
    "MAGIC",
    "atomic_write",
    "atomic_write_bytes",
    "check_plain_data",
    "encode",
    "header_bytes",
    "load",
    "package_version",
    "plain",
    "read_header",
    "save",
]
