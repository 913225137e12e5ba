"""The output folder of ``pyro-sparse train``: one run per folder, nothing of an earlier run lost.

- ``check_writable(out)`` runs before anything is created: ``--out`` must name a folder that exists
  and can be written, or one that can be created.
- ``RunFolder(out)`` is a context manager around a run: it creates the folder, takes an exclusive
  lock (an ``flock`` on ``.pyro-sparse.lock``, which also records the holder's pid and host for the
  message; the kernel releases it when the process dies, so a killed run's lock is simply free),
  removes the debris of killed runs (``.<output>.*.tmp`` files of interrupted atomic writes), and on
  exit releases the lock; the folders it created (``--out`` and missing parents) are removed again
  when the run fails and they hold nothing.
- ``in_use(out)`` says whether a live run holds ``out`` (without taking the lock).
- ``existing_outputs(out)`` lists the files of an earlier run; ``remove_outputs`` deletes them
  (``--overwrite``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
from pathlib import Path
from types import TracebackType

LOCK_NAME = ".pyro-sparse.lock"

# Every file a `pyro-sparse train` run may write (whatever the method).
OUTPUT_FILES = (
    "checkpoint.pt", "dense.pt", "metrics.json", "history.csv", "training_curve.png", "reliability.png",
    "snr_histogram.png", "layer_sparsity.csv", "support_updates.csv", "posterior.nc", "trace.png",
)


class FolderError(ValueError):
    """An output folder that cannot be used (one line: the folder, the problem, the fix)."""


def check_writable(out: str | os.PathLike) -> Path:
    """``out`` as a Path, after checking that it is (or can become) a writable folder; creates nothing.

    Raises:
        FolderError: empty path, a file, a folder (or nearest existing parent) that cannot be written.
    """
    if str(out).strip() == "":
        raise FolderError("--out is empty: name the output folder, e.g. --out runs/vi")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise FolderError(f"--out {path} is a file, not a folder: choose a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise FolderError(f"--out {path}: {existing} is a file, not a folder: choose another --out")
    try:  # os.access says yes to root on a read-only file system: try it
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise FolderError(f"--out {path}: cannot write in {existing} ({reason}): choose another --out") from None
    return path


def existing_outputs(out: Path) -> list[str]:
    """The files of an earlier run in ``out`` (names from ``OUTPUT_FILES``)."""
    return [name for name in OUTPUT_FILES if (out / name).exists()]


def remove_outputs(out: Path) -> None:
    """Delete the files of an earlier run (``--overwrite``)."""
    for name in existing_outputs(out):
        (out / name).unlink()


def _describe_holder(lock: Path) -> str:
    """Who holds ``lock``, as its holder wrote it ("pid 123 on host"), for the message."""
    try:
        holder = json.loads(lock.read_text()[:200])
        return f"pid {int(holder['pid'])} on {str(holder['host'])[:64]}"
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        return "another process"


def _try_lock(lock: Path) -> int | None:
    """An open descriptor of ``lock`` holding an exclusive ``flock``, or None when another process holds it.

    The kernel drops the lock when its process ends, however it ends (kill -9 included), so a lock
    file left behind by a dead run is free, with no pid guessing. A lock file replaced or removed by
    its previous holder while we waited is not ours: we retry on the file now at the path.
    """
    for _ in range(10):
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same_file = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same_file = False
        if same_file:
            return fd
        os.close(fd)
    raise FolderError(f"could not take the lock {lock}: it keeps being replaced; try again")


def in_use(out: Path) -> str | None:
    """Who is running in ``out`` ("pid 123 on host"), or None when no live run holds its lock."""
    lock = out / LOCK_NAME
    if not lock.exists():
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe_holder(lock)
    finally:
        os.close(fd)  # closing drops the probe's lock, if it got it
    return None


class RunFolder(contextlib.AbstractContextManager):
    """Hold ``out`` exclusively for one run (see the module docstring)."""

    def __init__(self, out: str | os.PathLike):
        self.path = Path(out)
        self.lock = self.path / LOCK_NAME
        self._created: list[Path] = []  # folders this run created, the deepest first
        self._fd: int | None = None

    def __enter__(self) -> RunFolder:
        missing = [self.path, *self.path.parents]
        missing = missing[: next(i for i, p in enumerate(missing) if p.exists())]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise FolderError(f"--out {self.path}: cannot create it ({error.strerror})") from None
        self._created = missing
        try:
            self._acquire()
        except BaseException:
            self._remove_created_if_empty()
            raise
        self._remove_debris()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._release()
        if error is not None:
            self._remove_created_if_empty()

    # -- the lock ---------------------------------------------------------------------------------
    def _acquire(self) -> None:
        fd = _try_lock(self.lock)
        if fd is None:
            raise FolderError(f"--out {self.path} is in use by another pyro-sparse run ({_describe_holder(self.lock)})"
                              ": wait for it to end, or choose another --out")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self._fd = fd

    def _release(self) -> None:
        if self._fd is not None:
            self.lock.unlink(missing_ok=True)  # still ours: nobody else can hold it while we do
            os.close(self._fd)
            self._fd = None

    # -- debris -----------------------------------------------------------------------------------
    def _remove_debris(self) -> None:
        """Temporary files of atomic writes (``.<output>.*.tmp``) that a killed process never renamed."""
        for name in OUTPUT_FILES:
            for tmp in self.path.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)

    def _remove_created_if_empty(self) -> None:
        for folder in self._created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


__all__ = ["LOCK_NAME", "OUTPUT_FILES", "FolderError", "RunFolder", "check_writable", "existing_outputs", "in_use",
           "remove_outputs"]
