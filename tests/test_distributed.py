"""``ps.fit`` under ``torchrun``: real processes (gloo, 2 ranks, digits) train one run data-parallel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_sparse import checkpoint

SCRIPT = Path(__file__).with_name("distributed_fit.py")
BATCH, EPOCHS = 32, 4


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def run(command: list[str]) -> subprocess.CompletedProcess:
    """``command`` with 1 thread per process and no distributed settings inherited."""
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    return subprocess.run(command, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)


def launch(out: Path, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """The script under torchrun (2 processes) or alone."""
    return run([*(TORCHRUN if processes > 1 else [sys.executable]), str(SCRIPT), str(out), *args])


def saved(out: Path, method: str, rank: int) -> dict:
    return torch.load(out / f"{method}-rank{rank}.pt", weights_only=True)


def tensors_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[key], b[key]) for key in a if torch.is_tensor(a[key]))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """vi, snr and ssvi, each 4 epochs of per-process batch 32 on 2 processes."""
    out = tmp_path_factory.mktemp("two")
    done = launch(out, str(BATCH), str(EPOCHS))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_every_process_ends_with_the_same_parameters_and_masks(two_processes):
    for method in ("vi", "snr", "ssvi"):
        first, second = saved(two_processes, method, 0), saved(two_processes, method, 1)
        assert tensors_equal(first["guide"], second["guide"]), method  # bit-identical
        assert tensors_equal(first["model"], second["model"]), method
        assert tensors_equal(first["masks"], second["masks"]), method
        assert first["loss"] == second["loss"]
        assert first["accuracy"] > 0.85, (method, first["accuracy"])
    ssvi = saved(two_processes, "ssvi", 0)["masks"]
    assert all(0.25 < float(mask.float().mean()) < 0.35 for mask in ssvi.values())  # density 0.3 kept
    snr = saved(two_processes, "snr", 0)["masks"]
    assert sum(int(mask.sum()) for mask in snr.values()) == pytest.approx(
        0.5 * sum(mask.numel() for mask in snr.values()), abs=1)


def test_two_processes_with_half_batches_follow_one_process_with_the_whole_batch(two_processes, tmp_path):
    """Same data order and gradient (the mean over both halves of each batch of 64); only the Monte Carlo noise
    differs (each process draws its own): the epoch losses agree within 2 %, the accuracy within 3 points."""
    done = launch(tmp_path, str(2 * BATCH), str(EPOCHS), "--methods", "vi", processes=1)
    assert done.returncode == 0, done.stderr[-3000:]
    alone, parallel = saved(tmp_path, "vi", 0), saved(two_processes, "vi", 0)
    for one, two in zip(alone["loss"], parallel["loss"], strict=True):
        assert two == pytest.approx(one, rel=0.02)
    assert abs(alone["accuracy"] - parallel["accuracy"]) < 0.03


def test_a_killed_process_is_resumed_to_the_uninterrupted_result(two_processes, tmp_path):
    killed = launch(tmp_path, str(BATCH), str(EPOCHS), "--methods", "vi", "--die-after", "2")
    assert killed.returncode != 0  # torchrun ends the job when a process dies
    state = checkpoint.load(tmp_path / "vi.pt")
    assert state["epoch"] == 1 and state["world_size"] == 2  # the last good checkpoint, written by process 0
    other = tmp_path / "one-process"
    other.mkdir()
    shutil.copy(tmp_path / "vi.pt", other / "vi.pt")
    resumed = launch(tmp_path, str(BATCH), str(EPOCHS), "--methods", "vi", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted = saved(two_processes, "vi", 0)
    for rank in (0, 1):
        assert tensors_equal(saved(tmp_path, "vi", rank)["guide"], uninterrupted["guide"])
    assert saved(tmp_path, "vi", 1)["loss"] == uninterrupted["loss"]
    # --resume with another number of processes: the run goes on (its own noise from then on)
    alone = launch(other, str(BATCH), str(EPOCHS), "--methods", "vi", "--resume", processes=1)
    assert alone.returncode == 0, alone.stderr[-3000:]
    finished = saved(other, "vi", 0)
    assert len(finished["loss"]) == EPOCHS and finished["loss"][:1] == uninterrupted["loss"][:1]
    # the resumed epochs: one process with batch 32 takes twice the steps of two (global batch 64), so its loss
    # falls at least as fast
    assert all(later < earlier for earlier, later in zip(finished["loss"][:-1], finished["loss"][1:], strict=True))
    assert all(one < 1.02 * two for one, two in zip(finished["loss"][1:], uninterrupted["loss"][1:], strict=True))
    assert finished["accuracy"] > 0.85


def test_processes_that_disagree_on_the_settings_stop_with_a_clear_error(tmp_path):
    done = launch(tmp_path, str(BATCH), "1", "--methods", "vi", "--disagree")
    assert done.returncode != 0
    assert "the processes disagree on fit's settings" in done.stderr and "'lr': 0.02" in done.stderr


def em_result(out: Path, rank: int) -> dict:
    return torch.load(out / f"em-rank{rank}.pt", weights_only=True)


def test_em_sghmc_deals_its_chains_to_the_processes_and_matches_one_process(tmp_path):
    """4 chains on 2 processes (chains 0, 2 and 1, 3), the E/M-step pooled by an all-reduce of the statistics:
    both processes end with the whole result, and it is the one-process run's (chain c starts, shuffles and
    draws its noise as chain c of one process; measured bit-identical, asserted to 1e-5)."""
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    assert launch(two, "50", "6", "--methods", "em").returncode == 0
    assert launch(one, "50", "6", "--methods", "em", processes=1).returncode == 0
    first, second, alone = em_result(two, 0), em_result(two, 1), em_result(one, 0)
    for name, draws in first["samples"].items():
        assert torch.equal(draws, second["samples"][name]), name
        assert draws.shape[0] == 16 and torch.allclose(draws, alone["samples"][name], atol=1e-5), name
    assert tensors_equal(first["masks"], alone["masks"]) and tensors_equal(first["prior"], second["prior"])
    for name, value in first["prior"].items():
        assert float(value) == pytest.approx(float(alone["prior"][name]), rel=1e-5), name
    assert first["history"] == pytest.approx(alone["history"], rel=1e-5)
    assert sum(int(mask.sum()) for mask in first["masks"].values()) < 0.55 * sum(
        mask.numel() for mask in first["masks"].values())  # the ramp to 50 % sparsity ran on every chain
    # a process dies after epoch 3's checkpoint; --resume with 2 processes, and with 1, ends where the run would
    killed = tmp_path / "killed"
    killed.mkdir()
    assert launch(killed, "50", "6", "--methods", "em", "--die-after", "3").returncode != 0
    assert checkpoint.load(killed / "em.pt")["epoch"] == 3
    shutil.copytree(killed, tmp_path / "killed-one")
    assert launch(killed, "50", "6", "--methods", "em", "--resume").returncode == 0
    resumed_alone = launch(tmp_path / "killed-one", "50", "6", "--methods", "em", "--resume", processes=1)
    assert resumed_alone.returncode == 0, resumed_alone.stderr[-3000:]
    for resumed in (em_result(killed, 1), em_result(tmp_path / "killed-one", 0)):
        for name, draws in resumed["samples"].items():
            assert torch.allclose(draws, first["samples"][name], atol=1e-5), name


def test_the_cli_trains_under_torchrun_and_process_0_reports(tmp_path):
    out = tmp_path / "run"
    done = run([*TORCHRUN, "-m", "pyro_sparse.cli", "train", "--method", "ssvi", "--epochs", "8", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 2 * metrics["batch_size"] == 128
    assert metrics["accuracy"] > 0.5  # 8 epochs of 11 global steps: as 1 process with 4 epochs of batch 64 (0.66)
    assert done.stdout.count('"world_size"') == 1  # one report, from process 0
