"""The command line: train / evaluate / demo, the metrics.json contract, and bad input."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pyro_sparse import cli

REQUIRED_KEYS = {
    "method", "net", "data", "epochs", "seed", "accuracy", "nll", "ece", "brier", "sparsity", "active_weights",
    "total_weights", "train_flops", "inference_flops", "train_seconds",
}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pyro_sparse.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.parametrize("prior", ["gaussian", "spike-slab"])
def test_train_vi_on_digits_meets_the_acceptance_figures(tmp_path, prior):
    out = tmp_path / prior
    result = run_cli("train", "--method", "vi", "--net", "mlp", "--data", "digits", "--epochs", "30",
                     "--prior", prior, "--out", str(out))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= REQUIRED_KEYS
    assert metrics["accuracy"] >= 0.95, metrics
    assert metrics["ece"] <= 0.05, metrics
    assert metrics["prior"] == prior and metrics["kl_weight"] == 1.0 and metrics["warmup_epochs"] == 0
    assert metrics["sparsity"] == 0.0 and metrics["active_weights"] == metrics["total_weights"] == 7400
    assert metrics["inference_flops"] == 7400
    assert metrics["train_flops"] == 3 * 7400 * 2 * 1347 * 30  # fwd+bwd (3x), LRT variance product (2x)
    assert json.loads(result.stdout) == metrics
    with open(out / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 30 and {"epoch", "loss", "nll", "kl"} <= set(rows[0])
    for name in ("checkpoint.pt", "training_curve.png", "reliability.png"):
        assert (out / name).stat().st_size > 0

    evaluated = run_cli("evaluate", str(out))
    assert evaluated.returncode == 0, evaluated.stderr
    again = json.loads(evaluated.stdout)
    assert again["accuracy"] == pytest.approx(metrics["accuracy"], abs=0.02)


def test_resume_continues_a_run(tmp_path, capsys):
    common = ["train", "--epochs", "2", "--out", str(tmp_path), "--samples", "4"]
    assert cli.main(common) == 0
    assert cli.main(common) == 2  # refuses to overwrite
    assert "already holds a run" in capsys.readouterr().err
    assert cli.main(["train", "--epochs", "4", "--out", str(tmp_path), "--samples", "4", "--resume"]) == 0
    with open(tmp_path / "history.csv") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2", "3", "4"]
    capsys.readouterr()
    assert cli.main(["train", "--epochs", "5", "--out", str(tmp_path), "--prior", "spike-slab", "--resume"]) == 2
    assert "trained with --prior gaussian, this command gives spike-slab" in capsys.readouterr().err


def test_regression_run_writes_regression_metrics(tmp_path, capsys):
    assert cli.main(["train", "--data", "toy-regression", "--epochs", "5", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"rmse", "coverage_95", "nll"} <= set(metrics)
    assert not (tmp_path / "reliability.png").exists()


def test_bad_input_in_a_real_process_prints_no_traceback(tmp_path):
    for args in (["train", "--net", "nope", "--out", str(tmp_path)], ["evaluate", str(tmp_path / "missing")], []):
        result = run_cli(*args)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr


def test_evaluate_needs_a_run_folder(tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path)]) == 2
    assert "no checkpoint.pt in" in capsys.readouterr().err


def test_demo_prints_the_four_methods_and_a_unit_level_run(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path), "--epochs", "4"]) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("method"):].splitlines()
    assert table[0].split() == ["method", "structure", "accuracy", "ece", "nll", "sparsity", "units", "export_kB",
                                "dense_export_kB", "speedup_b1", "speedup_b1024", "train_seconds"]
    rows = {(line.split()[0], line.split()[1]): line.split() for line in table[2:7]}
    assert sorted(rows) == [("em-sghmc", "weight"), ("snr", "unit"), ("snr", "weight"), ("ssvi", "weight"),
                            ("vi", "weight")]
    assert float(rows["vi", "weight"][5]) == 0.0
    assert all(float(rows[m, "weight"][5]) == 0.9 for m in ("snr", "ssvi", "em-sghmc"))
    assert all(float(rows[m, "weight"][7]) < 0.5 * float(rows[m, "weight"][8]) for m in ("snr", "ssvi"))  # CSR
    unit = rows["snr", "unit"]
    assert unit[6] == "25/100" and float(unit[7]) < 0.3 * float(unit[8])  # 25 of 100 hidden units: a 64-25-10 net
    assert float(unit[9]) > 0 and float(unit[10]) > 0  # measured speed-ups (their size depends on the machine)
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["em-sghmc", "snr", "snr-unit", "ssvi", "vi"]


def _write_idx(path: Path, array) -> None:
    import numpy as np

    array = np.asarray(array, dtype=np.uint8)
    header = np.array([0x0800 + array.ndim, *array.shape], dtype=">u4").tobytes()
    path.write_bytes(header + array.tobytes())


@pytest.mark.parametrize(
    "labels, images, message",
    [
        ([0, 1, 12, 3], 4, r"labels must lie in \[0, 10\); found 12"),
        ([], 0, "dataset is empty"),
    ],
    ids=["label-outside-range", "empty-dataset"],
)
def test_bad_data_files_exit_2_with_one_line(tmp_path, capsys, labels, images, message):
    import numpy as np

    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", np.zeros((images, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.array(labels))
    args = ["train", "--data", "mnist", "--data-root", str(tmp_path / "data"), "--net", "lenet5",
            "--out", str(tmp_path / "run"), "--epochs", "1"]
    assert cli.main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), lines
