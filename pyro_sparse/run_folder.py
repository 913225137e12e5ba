"""The output folder of ``pyro-sparse train``: one run per folder, nothing of an earlier run lost.

- ``check_writable(out)`` runs before anything is created: ``--out`` must name a folder that exists
  and can be written, or one that can be created.
- ``RunFolder(out)`` is a context manager around a run: it creates the folder, takes an exclusive
  lock (``.pyro-sparse.lock``, holding the owner's pid and host; a lock whose process is gone is
  stale and taken over), removes the debris of killed runs (``.<name>.*.tmp`` files of interrupted
  atomic writes), and on exit releases the lock; a folder it created and that holds nothing when the
  run fails is removed again.
- ``existing_outputs(out)`` lists the files of an earlier run; ``remove_outputs`` deletes them
  (``--overwrite``).
"""

from __future__ import annotations

import contextlib
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


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunFolder(contextlib.AbstractContextManager):
    """Hold ``out`` exclusively for one run (see the module docstring)."""

    def __init__(self, out: str | os.PathLike):
        self.path = Path(out)
        self.lock = self.path / LOCK_NAME
        self._created = False
        self._locked = False

    def __enter__(self) -> RunFolder:
        if not self.path.is_dir():
            try:
                self.path.mkdir(parents=True)
            except OSError as error:
                raise FolderError(f"--out {self.path}: cannot create it ({error.strerror})") from None
            self._created = True
        try:
            self._acquire()
        except BaseException:
            self._remove_if_created_and_empty()
            raise
        self._remove_debris()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._release()
        if error is not None:
            self._remove_if_created_and_empty()

    # -- the lock ---------------------------------------------------------------------------------
    def _acquire(self) -> None:
        owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None:
                    raise FolderError(
                        f"--out {self.path} is in use by another pyro-sparse run (pid {holder['pid']} on "
                        f"{holder['host']}): wait for it to end, or choose another --out"
                    ) from None
                self.lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(owner)
            self._locked = True
            return
        raise FolderError(f"--out {self.path}: could not take the lock {self.lock}; try again")

    def _holder(self) -> dict | None:
        """The live process holding the lock, or None when the lock is stale."""
        try:
            holder = json.loads(self.lock.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable: written by a process killed while taking it
        if host == socket.gethostname() and not _process_alive(pid):
            return None
        return {"pid": pid, "host": host}

    def _release(self) -> None:
        if self._locked:
            self.lock.unlink(missing_ok=True)
            self._locked = False

    # -- debris -----------------------------------------------------------------------------------
    def _remove_debris(self) -> None:
        """Temporary files of atomic writes that a killed process never renamed."""
        for tmp in self.path.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def _remove_if_created_and_empty(self) -> None:
        if self._created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()


__all__ = ["LOCK_NAME", "OUTPUT_FILES", "FolderError", "RunFolder", "check_writable", "existing_outputs",
           "remove_outputs"]
