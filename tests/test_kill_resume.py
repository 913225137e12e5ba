"""``kill -9`` at random moments, also in the middle of a checkpoint write, then ``--resume``: the run
ends bit-identical to an uninterrupted one, with no debris (lock, temporary files) left behind.
Ctrl-C ends with status 130, one line, and an intact checkpoint. All with real processes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pyro_sparse import checkpoint as checkpoints
from pyro_sparse.run_folder import LOCK_NAME

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYRO_SPARSE_SMOKE": "1"}

# The CLI, where the rename of a finished temporary file onto checkpoint.pt waits 30 s after a
# marker file appears (when MARKER is set): the test kills the process in that window.
SLOW_WRITES = textwrap.dedent("""
    import os, sys, time, pathlib
    rename = os.replace
    def slow(src, dst, *args, **kwargs):
        if pathlib.Path(dst).name == "checkpoint.pt" and os.environ.get("MARKER"):
            pathlib.Path(os.environ["MARKER"]).touch()
            time.sleep(30)
        return rename(src, dst, *args, **kwargs)
    os.replace = slow
    from pyro_sparse.cli import main
    sys.exit(main(sys.argv[1:]))
""")

METHODS = {  # the fewest epochs that leave room for two kills before the end
    "vi": ["--method", "vi", "--epochs", "4"],
    "snr": ["--method", "snr", "--epochs", "3", "--finetune-epochs", "2", "--sparsity", "0.8"],
    "ssvi": ["--method", "ssvi", "--epochs", "4", "--density", "0.3", "--update-every", "7"],
    "em-sghmc": ["--method", "em-sghmc", "--epochs", "4", "--chains", "2", "--samples", "4"],
}


def _command(args: list[str], out: Path, resume: bool) -> list[str]:
    samples = [] if "--samples" in args else ["--samples", "4"]
    return [sys.executable, "-c", SLOW_WRITES, "train", *args, *samples, "--out", str(out),
            *(["--resume"] if resume else [])]


def _run_to_end(args: list[str], out: Path, resume: bool) -> None:
    result = subprocess.run(_command(args, out, resume), env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def _start(args: list[str], out: Path, resume: bool, marker: Path | None = None) -> subprocess.Popen:
    env = {**ENV, "MARKER": str(marker)} if marker else ENV
    return subprocess.Popen(_command(args, out, resume), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before the kill: {process.stderr.read()}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.005)


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stderr.close()


WALL_CLOCK = ("seconds", "train_seconds", "export_speedup_batch_1", "export_speedup_batch_1024")


def _same(a, b, where: str = "") -> None:
    """Bit-identical nested state (tensors compared with torch.equal; wall-clock measurements ignored)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        keys = {k for k in a if k not in WALL_CLOCK}
        assert keys == {k for k in b if k not in WALL_CLOCK}, where
        for key in keys:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _compare_runs(reference: Path, resumed: Path) -> None:
    for name in ("checkpoint.pt", "dense.pt"):
        if (reference / name).exists():
            ref, got = checkpoints.load(reference / name), checkpoints.load(resumed / name)
            for part in ("metadata",):  # --out differs; resume_changes stays empty with the same options
                ref.pop(part), got.pop(part)
            _same(ref, got, name)
    ref_metrics = json.loads((reference / "metrics.json").read_text())
    got_metrics = json.loads((resumed / "metrics.json").read_text())
    _same(ref_metrics, got_metrics, "metrics.json")
    assert "resume_changes" not in got_metrics


def _no_debris(out: Path) -> None:
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted runs, side by side (one thread each: the same arithmetic as the killed runs)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    runs = {method: subprocess.Popen(_command(args, root / method, resume=False), env=ENV, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True) for method, args in METHODS.items()}
    for method, process in runs.items():
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, f"{method}: {err}"
    return {method: root / method for method in METHODS}


@pytest.mark.parametrize("method", list(METHODS))
def test_kill_9_at_random_moments_then_resume_is_bit_identical(references, tmp_path, method):
    """Two kills: one at a random moment after the first checkpoint (for snr: of the dense phase),
    one in the middle of writing checkpoint.pt (for snr: the fine-tuning phase), its temporary file
    complete and not yet renamed; then --resume to the end."""
    args, out = METHODS[method], tmp_path / method
    first = out / ("dense.pt" if method == "snr" else "checkpoint.pt")

    process = _start(args, out, resume=False)
    _wait_for(first.is_file, process)
    time.sleep(random.Random(f"kill-{method}").uniform(0.0, 0.1))
    _kill(process)
    assert (out / LOCK_NAME).exists()  # a kill leaves its lock behind: the next run must see it is stale

    marker = tmp_path / "writing"
    process = _start(args, out, resume=True, marker=marker)
    _wait_for(marker.exists, process)
    assert list(out.glob(".checkpoint.pt.*.tmp"))
    _kill(process)
    for name in ("dense.pt", "checkpoint.pt"):  # whatever was written last is whole and loads
        if (out / name).exists():
            assert checkpoints.load(out / name)["epoch"] >= 0

    _run_to_end(args, out, resume=True)
    _compare_runs(references[method], out)
    _no_debris(out)


def test_ctrl_c_exits_130_with_one_line_and_an_intact_checkpoint(tmp_path):
    out = tmp_path / "run"
    process = _start(["--method", "vi", "--epochs", "200"], out, resume=False)
    _wait_for((out / "checkpoint.pt").is_file, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and "--resume" in lines[0], err
    assert checkpoints.load(out / "checkpoint.pt")["epoch"] >= 1
    _no_debris(out)


def test_a_second_run_into_a_busy_folder_exits_2(tmp_path):
    out = tmp_path / "run"
    process = _start(["--method", "vi", "--epochs", "200"], out, resume=False)
    try:
        _wait_for((out / "checkpoint.pt").is_file, process)
        second = subprocess.run([sys.executable, "-m", "pyro_sparse.cli", "train", "--out", str(out), "--resume"],
                                env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "in use by another pyro-sparse run" in lines[0], second.stderr
    finally:
        _kill(process)
