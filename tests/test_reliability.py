"""Trust: bad input, earlier runs and damaged files never cost a run (issue: reliability).

Every failing case of the table must end with exit status 2 and exactly one line on stderr
("pyro-sparse: error: ..."), no traceback, no partial output (an --out that did not exist before is
not created) and the earlier run in the folder untouched (same files, same bytes). The positive
cases check what a legitimate resume, overwrite or evaluate does.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch

import pyro_sparse as ps
from pyro_sparse import checkpoint as checkpoints
from pyro_sparse import cli
from pyro_sparse.recipes import em_sghmc as em_recipe
from pyro_sparse.recipes import snr as snr_recipe
from pyro_sparse.run_folder import LOCK_NAME
from pyro_sparse.run_options import RUN_OPTIONS

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = ["--epochs", "2", "--samples", "4"]


def _snapshot(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file below ``folder`` (empty when it does not exist)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _fails_cleanly(capsys, args: list[str], message: str, untouched: Path | None = None) -> str:
    """Run the CLI in-process; assert exit 2, one line matching ``message``, nothing written."""
    before = _snapshot(untouched) if untouched is not None else {}
    existed = untouched is not None and untouched.exists()
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("pyro-sparse: error: "), lines[0]
    assert "Traceback" not in captured.err
    assert re.search(message, lines[0]), lines[0]
    if untouched is not None:
        assert untouched.exists() == existed
        assert _snapshot(untouched) == before, "the earlier run was modified"
    return lines[0]


# ----------------------------------------------------------------------------------------------
# Earlier runs, made once per session and copied for each test
# ----------------------------------------------------------------------------------------------
RUN_ARGS = {
    "vi": ["--method", "vi", *TINY],
    "snr": ["--method", "snr", "--sparsity", "0.5", "--finetune-epochs", "1", *TINY],
    "ssvi": ["--method", "ssvi", "--density", "0.5", "--update-every", "5", *TINY],
    "em-sghmc": ["--method", "em-sghmc", "--epochs", "2", "--samples", "2", "--chains", "1"],
}


@pytest.fixture(scope="session")
def finished_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for method, args in RUN_ARGS.items():
        out = root / method
        assert cli.main(["train", *args, "--out", str(out)]) == 0
        runs[method] = out
    return runs


@pytest.fixture
def run_copy(finished_runs, tmp_path):
    def copy(method: str) -> Path:
        target = tmp_path / f"earlier-{method}"
        shutil.copytree(finished_runs[method], target)
        return target

    return copy


# ----------------------------------------------------------------------------------------------
# Bad options: every check runs before the output folder exists
# ----------------------------------------------------------------------------------------------
BAD_OPTIONS = [
    (["--net", "transformer"], "unknown net 'transformer'"),
    (["--data", "imagenet"], "unknown dataset 'imagenet'"),
    (["--method", "mcmc"], "method 'mcmc' is not available"),
    (["--prior", "laplace"], "argument --prior: invalid choice"),
    (["--method", "em-sghmc", "--prior", "gaussian"], "--method em-sghmc needs --prior spike-slab"),
    (["--prior-scale", "0"], "argument --prior-scale: must be a number > 0"),
    (["--prior-scale", "-2"], "argument --prior-scale: must be a number > 0"),
    (["--spike-scale", "0"], "argument --spike-scale: must be a number > 0"),
    (["--prior", "spike-slab", "--spike-scale", "2"], "spike_scale must be smaller than slab_scale"),
    (["--inclusion", "1.2"], r"argument --inclusion: must lie in \(0, 1\)"),
    (["--inclusion", "0"], r"argument --inclusion: must lie in \(0, 1\)"),
    (["--epochs", "0"], "argument --epochs: must be a positive integer"),
    (["--batch-size", "x"], "argument --batch-size: invalid"),
    (["--lr", "nan"], "argument --lr: must be a number > 0"),
    (["--method", "snr", "--sparsity", "1.0"], r"argument --sparsity: must lie in \[0, 1\)"),
    (["--sparsity", "0.5"], "--sparsity does not apply to --method vi"),
    (["--method", "em-sghmc", "--kl-weight", "0.5"], "--kl-weight does not apply to --method em-sghmc"),
    (["--method", "em-sghmc", "--warmup-epochs", "2"], "--warmup-epochs does not apply to --method em-sghmc"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--hidden", "1000000", "1000000"], "out of memory"),
    (["--out", ""], "--out is empty"),
    (["--device", "meta"], "--device meta is not supported"),
    (["--device", "mps"], "--device mps is not supported"),
    (["--device", "cuda:7"], "cuda"),
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--seed", str(2**70)], r"--seed must be an integer in \[0, 2\^32\)"),
    (["--seed", "-1"], r"--seed must be an integer in \[0, 2\^32\)"),
    (["--seed", "1.5"], "argument --seed: invalid int value"),
    (["--epochs", "-1"], "argument --epochs: must be a positive integer"),
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer"),
    (["--samples", "0"], "argument --samples: must be a positive integer"),
    (["--lr", "inf"], "argument --lr: must be a number > 0"),
    (["--lr", "-0.001"], "argument --lr: must be a number > 0"),
    (["--kl-weight", "-1"], "--kl-weight must be a number >= 0"),
    (["--kl-weight", "inf"], "--kl-weight must be a number >= 0"),
    (["--warmup-epochs", "-1"], "argument --warmup-epochs: must be an integer >= 0"),
    (["--prior-scale", "inf"], "argument --prior-scale: must be a number > 0"),
    (["--inclusion", "nan"], r"argument --inclusion: must lie in \(0, 1\)"),
    (["--hidden", "0"], "argument --hidden: must be a positive integer"),
    (["--method", "ssvi", "--density", "0"], r"argument --density: must lie in \(0, 1\]"),
    (["--method", "ssvi", "--density", "1.5"], r"argument --density: must lie in \(0, 1\]"),
    (["--method", "ssvi", "--update-every", "0"], "argument --update-every: must be a positive integer"),
    (["--method", "snr", "--sparsity", "-0.1"], r"argument --sparsity: must lie in \[0, 1\)"),
    (["--method", "snr", "--finetune-epochs", "-1"], "argument --finetune-epochs: must be an integer >= 0"),
    (["--method", "snr", "--finetune-lr", "0"], "argument --finetune-lr: must be a number > 0"),
    (["--method", "em-sghmc", "--chains", "0"], "argument --chains: must be a positive integer"),
    (["--density", "0.1"], "--density does not apply to --method vi"),
    (["--chains", "2"], "--chains does not apply to --method vi"),
    (["--method", "snr", "--update-every", "5"], "--update-every does not apply to --method snr"),
    (["--method", "ssvi", "--finetune-lr", "0.1"], "--finetune-lr does not apply to --method ssvi"),
    (["--resume", "--overwrite"], "give one of them"),
    (["--data", "mnist", "--data-root", "/nonexistent"], "mnist files not found"),
    (["--data", "fashion-mnist", "--data-root", "/nonexistent"], "files not found"),
    (["--net", "lenet5"], "too small for lenet5"),
    (["--net", "vgg99"], "unknown net 'vgg99'"),
]


@pytest.mark.parametrize("args, message", BAD_OPTIONS, ids=[" ".join(a) or "empty" for a, _ in BAD_OPTIONS])
def test_bad_options_exit_2_with_one_line_and_create_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    full = ["train", "--out", str(out), "--epochs", "1", *args]
    if args[:2] == ["--out", ""]:
        full = ["train", "--epochs", "1", *args]
    _fails_cleanly(capsys, full, message)
    assert not out.exists()


def test_out_that_is_a_file_or_cannot_be_written(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    _fails_cleanly(capsys, ["train", "--out", str(a_file)], "is a file, not a folder", untouched=tmp_path)
    _fails_cleanly(capsys, ["train", "--out", str(a_file / "run")], "is a file, not a folder", untouched=tmp_path)
    # /sys is read-only even for root (a chmod'ed folder is not, so it would prove nothing here)
    _fails_cleanly(capsys, ["train", "--out", "/sys/pyro-sparse-run"], "cannot write in /sys")
    _fails_cleanly(capsys, ["train", "--out", "/sys"], "cannot write in /sys")


def test_a_diverging_run_is_one_line_and_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "run"
    line = _fails_cleanly(capsys, ["train", "--out", str(out), "--lr", "1e38", "--epochs", "2"], "diverged")
    assert "--lr" in line and "epoch 1" in line
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Data that cannot be read
# ----------------------------------------------------------------------------------------------
def _mnist_copy(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(DATA / "MNIST", root / "MNIST")
    return root


def test_a_bit_flipped_mnist_file_is_one_line(tmp_path, capsys):
    root = _mnist_copy(tmp_path)
    labels = root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    data = bytearray(labels.read_bytes())
    data[len(data) // 2] ^= 0xFF
    labels.write_bytes(bytes(data))
    _fails_cleanly(capsys, ["train", "--data", "mnist", "--data-root", str(root), "--net", "lenet5",
                            "--out", str(tmp_path / "run")], "train-labels-idx1-ubyte")
    assert not (tmp_path / "run").exists()


def test_labels_of_the_wrong_count_are_one_line(tmp_path, capsys):
    root = _mnist_copy(tmp_path)
    raw = root / "MNIST" / "raw"
    with gzip.open(raw / "train-labels-idx1-ubyte.gz") as handle:
        content = handle.read()
    header, labels = bytearray(content[:8]), content[8:-10]
    header[4:8] = len(labels).to_bytes(4, "big")
    with gzip.open(raw / "train-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(bytes(header) + labels)
    _fails_cleanly(capsys, ["train", "--data", "mnist", "--data-root", str(root), "--net", "lenet5",
                            "--out", str(tmp_path / "run")], "59990")


# ----------------------------------------------------------------------------------------------
# One run per folder; nothing of an earlier run is lost
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(RUN_ARGS))
def test_a_new_run_never_overwrites_an_earlier_one(run_copy, capsys, method):
    out = run_copy(method)
    _fails_cleanly(capsys, ["train", *RUN_ARGS[method], "--out", str(out)], "already holds a run", untouched=out)


def test_a_new_snr_run_does_not_retrain_over_an_interrupted_dense_phase(run_copy, capsys):
    out = run_copy("snr")
    for name in ("checkpoint.pt", "metrics.json", "history.csv", "layer_sparsity.csv", "snr_histogram.png",
                 "reliability.png", "training_curve.png"):
        (out / name).unlink()
    _fails_cleanly(capsys, ["train", *RUN_ARGS["snr"], "--out", str(out)], r"already holds a run \(dense.pt\)",
                   untouched=out)


def test_a_busy_folder_is_refused_and_a_left_over_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK_NAME
    holder = os.open(lock, os.O_CREAT | os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process's live run (another open file)
    os.write(holder, json.dumps({"pid": 4242, "host": socket.gethostname()}).encode())
    try:
        line = _fails_cleanly(capsys, ["train", "--out", str(out), *TINY], "in use by another pyro-sparse run",
                              untouched=out)
        assert "pid 4242" in line
    finally:
        os.close(holder)  # the kernel drops the lock, as when a killed run's process ends
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (out / ".my-notes.tmp").write_text("a user's own file")
    assert cli.main(["train", "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    assert not lock.exists() and not list(out.glob(".checkpoint.pt.*.tmp"))
    assert (out / ".my-notes.tmp").read_text() == "a user's own file"


@pytest.mark.parametrize("content", ['{"pid": 1180591620717411303424, "host": "h"}', '{"pid": 1e400}', "",
                                     "garbage", '{"pid": -1, "host": "x"}'])
def test_a_crafted_lock_file_without_a_live_holder_is_taken_over(tmp_path, capsys, content):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(content)
    assert cli.main(["train", "--out", str(out), "--epochs", "1", "--samples", "2"]) == 0
    capsys.readouterr()
    assert not (out / LOCK_NAME).exists()


def test_a_failed_run_removes_the_folders_it_created(tmp_path, capsys):
    out = tmp_path / "new" / "parents" / "run"
    _fails_cleanly(capsys, ["train", "--out", str(out), "--lr", "1e38"], "diverged")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_an_earlier_run(run_copy, capsys):
    out = run_copy("vi")
    assert cli.main(["train", "--method", "vi", "--epochs", "1", "--samples", "4", "--overwrite",
                     "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and checkpoints.load(out / "checkpoint.pt")["epoch"] == 1


def test_failed_runs_leave_no_folder_but_keep_an_existing_one(tmp_path, capsys):
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    _fails_cleanly(capsys, ["train", "--out", str(existing), "--lr", "1e38"], "diverged", untouched=existing)


# ----------------------------------------------------------------------------------------------
# --resume tells the truth
# ----------------------------------------------------------------------------------------------
RESUME_REFUSED = [
    ("vi", ["--seed", "1"], "--seed 0, this command gives 1"),
    ("vi", ["--hidden", "8"], "--hidden (not given), this command gives 8"),
    ("vi", ["--net", "lenet5"], "--net mlp, this command gives lenet5"),
    ("vi", ["--prior", "spike-slab"], "--prior gaussian, this command gives spike-slab"),
    ("vi", ["--batch-size", "32"], "--batch-size 64, this command gives 32"),
    ("vi", ["--warmup-epochs", "1"], "--warmup-epochs 0, this command gives 1"),
    ("snr", ["--lr", "0.01"], f"--lr {snr_recipe.DEFAULT_LR}, this command gives 0.01; --method snr cannot change it"),
    ("snr", ["--epochs", "3"], "--epochs 2, this command gives 3"),
    ("snr", ["--sparsity", "0.9"], "--sparsity 0.5, this command gives 0.9"),
    ("ssvi", ["--density", "0.25"], "--density 0.5, this command gives 0.25"),
    ("ssvi", ["--update-every", "7"], "--update-every 5, this command gives 7"),
    ("em-sghmc", ["--epochs", "3"], "--epochs 2, this command gives 3; --method em-sghmc cannot change it"),
    ("em-sghmc", ["--lr", "0.0123"], f"--lr {em_recipe.DEFAULT_LR}, this command gives 0.0123"),
    ("em-sghmc", ["--samples", "3"], "--samples 2, this command gives 3"),
    ("em-sghmc", ["--chains", "2"], "--chains 1, this command gives 2"),
]


def _with(args: list[str], changes: list[str]) -> list[str]:
    """``args`` with the options in ``changes`` replaced (or added)."""
    result, i = [], 0
    changed = dict(zip(changes[::2], changes[1::2], strict=True))
    while i < len(args):
        if args[i] in changed:
            i += 2
            continue
        result.append(args[i])
        i += 1
    return result + changes


@pytest.mark.parametrize("method, changes, message", RESUME_REFUSED,
                         ids=[f"{m} {' '.join(c)}" for m, c, _ in RESUME_REFUSED])
def test_resume_refuses_options_that_define_the_run(run_copy, capsys, method, changes, message):
    out = run_copy(method)
    _fails_cleanly(capsys, ["train", *_with(RUN_ARGS[method], changes), "--resume", "--out", str(out)],
                   re.escape(message), untouched=out)


def test_every_command_line_option_has_a_resume_rule():
    train_options = {action.dest for action in cli.make_parser()._subparsers._group_actions[0].choices["train"]
                     ._actions if action.dest != "help"}
    assert train_options == set(RUN_OPTIONS)


def test_resume_applies_a_new_lr_and_more_epochs_and_records_them(run_copy, capsys):
    out = run_copy("vi")
    args = _with(RUN_ARGS["vi"], ["--epochs", "3", "--lr", "0.01"])
    assert cli.main(["train", *args, "--resume", "--out", str(out)]) == 0
    capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lr"] == 0.01 and metrics["epochs"] == 3
    assert metrics["resume_changes"] == ["epochs 2 -> 3 from epoch 3", "lr 0.005 -> 0.01 from epoch 3"]
    rows = (out / "history.csv").read_text().splitlines()
    header = rows[0].split(",")
    lrs = [float(row.split(",")[header.index("lr")]) for row in rows[1:]]
    assert lrs == [0.005, 0.005, 0.01]
    saved = checkpoints.load(out / "checkpoint.pt")
    assert saved["optimizer"]["param_groups"][0]["lr"] == 0.01  # the means' group: the lr given
    assert saved["metadata"]["lr"] == 0.01 and saved["epoch"] == 3


def test_resume_of_a_finished_snr_run_may_extend_the_finetuning(run_copy, capsys):
    out = run_copy("snr")
    args = _with(RUN_ARGS["snr"], ["--finetune-epochs", "2"])
    assert cli.main(["train", *args, "--resume", "--out", str(out)]) == 0
    capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finetune_epochs"] == 2
    assert metrics["resume_changes"] == ["finetune_epochs 1 -> 2 from fine-tuning epoch 2"]


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints
# ----------------------------------------------------------------------------------------------
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "bit-flipped":
        flipped = bytearray(data)
        flipped[-100] ^= 0x01
        path.write_bytes(bytes(flipped))
    elif how == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator()
                                       .manual_seed(1)).numpy().tobytes())
    elif how == "plain-torch-save":
        torch.save({"model": {}, "metadata": {}}, path)


DAMAGES = ["empty", "truncated", "bit-flipped", "random", "plain-torch-save"]


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("command", ["evaluate", "resume"])
def test_a_damaged_checkpoint_is_refused_in_one_line(run_copy, capsys, how, command):
    out = run_copy("vi")
    _damage(out / "checkpoint.pt", how)
    args = ["evaluate", str(out)] if command == "evaluate" else ["train", *RUN_ARGS["vi"], "--resume", "--out",
                                                                 str(out)]
    line = _fails_cleanly(capsys, args, "checkpoint.pt", untouched=out)
    assert "refused" in line


def test_a_damaged_dense_phase_checkpoint_is_refused_on_resume(run_copy, capsys):
    out = run_copy("snr")
    (out / "checkpoint.pt").unlink()
    _damage(out / "dense.pt", "truncated")
    _fails_cleanly(capsys, ["train", *RUN_ARGS["snr"], "--resume", "--out", str(out)], "dense.pt", untouched=out)


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------
def test_evaluate_bad_input(tmp_path, capsys, run_copy):
    a_file = tmp_path / "x.txt"
    a_file.write_text("x")
    _fails_cleanly(capsys, ["evaluate", str(a_file)], "is not a folder")
    _fails_cleanly(capsys, ["evaluate", str(tmp_path / "missing")], "is not a folder")
    _fails_cleanly(capsys, ["evaluate", str(tmp_path)], "no checkpoint.pt in")
    _fails_cleanly(capsys, ["evaluate", str(run_copy("vi")), "--samples", "0"], "must be a positive integer")


def test_evaluate_says_when_a_run_is_unfinished(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--method", "snr", "--sparsity", "0.5", *TINY, "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["finished"] is True
    (out / "checkpoint.pt").unlink()  # as if killed in the dense phase ... of which only dense.pt remains
    assert cli.main(["evaluate", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["finished"] is False and result["checkpoint"] == "dense.pt" and result["sparsity"] == 0.0


def test_evaluate_an_em_run_killed_before_its_first_draw(tmp_path, capsys, monkeypatch):
    """An em-sghmc run stopped after epoch 1 of 4 (draws are kept only after burn-in, epochs 3-4)."""
    import pyro_sparse.recipes.em_sghmc as recipe

    class Killed(Exception):
        pass

    def stop_after_the_first_epoch(row):
        raise Killed

    sample = recipe.em_sghmc
    monkeypatch.setattr(recipe, "em_sghmc", lambda *a, **k: sample(*a, **k, callback=stop_after_the_first_epoch))
    out = tmp_path / "run"
    with pytest.raises(Killed):
        cli.main(["train", "--method", "em-sghmc", "--epochs", "4", "--samples", "2", "--out", str(out)])
    capsys.readouterr()
    assert checkpoints.load(out / "checkpoint.pt")["epoch"] == 1
    _fails_cleanly(capsys, ["evaluate", str(out)], "no posterior draws yet", untouched=out)


def test_evaluate_finds_moved_data_with_data_root(tmp_path, capsys):
    root = _mnist_copy(tmp_path)
    out = tmp_path / "run"
    args = ["train", "--data", "mnist", "--data-root", str(root), "--net", "lenet5", "--epochs", "1",
            "--samples", "2", "--out", str(out)]
    assert cli.main(args) == 0
    capsys.readouterr()
    saved_root = checkpoints.load(out / "checkpoint.pt")["metadata"]["data_root"]
    assert Path(saved_root).is_absolute()
    moved = tmp_path / "moved"
    root.rename(moved)
    _fails_cleanly(capsys, ["evaluate", str(out)], "mnist files not found")
    assert cli.main(["evaluate", str(out), "--data-root", str(moved)]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] > 0.5


def test_a_relative_data_root_is_stored_absolute(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert cli.main(["train", "--data-root", "some/where", *TINY, "--out", str(out)]) == 0
    capsys.readouterr()
    stored = checkpoints.load(out / "checkpoint.pt")["metadata"]["data_root"]
    assert stored == str(tmp_path / "some" / "where")


# ----------------------------------------------------------------------------------------------
# metrics.json is strict JSON
# ----------------------------------------------------------------------------------------------
def test_metrics_json_is_strict_json_with_one_chain(finished_runs):
    text = (finished_runs["em-sghmc"] / "metrics.json").read_text()

    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    metrics = json.loads(text, parse_constant=refuse)
    assert metrics["num_chains"] == 1 and metrics["r_hat_max"] is None


# ----------------------------------------------------------------------------------------------
# Networks with BatchNorm and inputs of the wrong dtype
# ----------------------------------------------------------------------------------------------
def test_a_batchnorm_network_passes_the_input_check_on_digits(digits):
    config = cli.default_config(net="resnet18", data="digits")
    model = cli.build_model(config, digits)
    model.check_batch(*ps.data.as_tensors(digits.train))


# ----------------------------------------------------------------------------------------------
# --resume alone continues the run as it was
# ----------------------------------------------------------------------------------------------
def test_resume_takes_the_options_it_is_not_given_from_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    first = ["train", "--method", "snr", "--epochs", "2", "--lr", "0.01", "--sparsity", "0.5", "--data", "DIGITS",
             "--samples", "4", "--finetune-epochs", "1", "--out", str(out)]
    assert cli.main(first) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--out", str(out)]) == 0  # method, epochs, lr ... from the checkpoint
    capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["method"], metrics["epochs"], metrics["lr"], metrics["data"]) == ("snr", 2, 0.01, "digits")
    assert "resume_changes" not in metrics


def test_resume_refuses_to_shorten_a_run_and_another_method(run_copy, capsys):
    out = run_copy("vi")
    _fails_cleanly(capsys, ["train", "--resume", "--epochs", "1", "--out", str(out)],
                   "already holds 2 epochs; --epochs 1 would shorten", untouched=out)
    _fails_cleanly(capsys, ["train", "--resume", "--method", "ssvi", "--out", str(out)],
                   "holds a --method vi run, this command gives --method ssvi", untouched=out)


def test_resume_on_cpu_0_and_prior_options_that_do_not_apply(run_copy, capsys, tmp_path):
    out = run_copy("vi")
    assert cli.main(["train", "--resume", "--epochs", "3", "--device", "cpu:0", "--out", str(out)]) == 0
    capsys.readouterr()
    assert checkpoints.load(out / "checkpoint.pt", map_location="cpu:0")["epoch"] == 3
    _fails_cleanly(capsys, ["train", "--spike-scale", "0.5", "--out", str(tmp_path / "g")],
                   "--spike-scale applies to --prior spike-slab; this run's prior is gaussian")
    _fails_cleanly(capsys, ["train", "--net", "lenet5", "--hidden", "5", "--out", str(tmp_path / "h")],
                   "--hidden sets the widths of --net mlp")


def _rewrite(path: Path, change) -> None:
    state = checkpoints.load(path)
    change(state)
    path.write_bytes(checkpoints.encode(state))  # a valid header and checksum: anyone can compute them


CRAFTED = {
    "no metadata": lambda s: s.pop("metadata"),
    "metadata a list": lambda s: s.update(metadata=[1, 2]),
    "epochs not a number": lambda s: s["metadata"].update(epochs="x"),
    "hidden widths changed": lambda s: s["metadata"].update(hidden=[3, 4]),
    "another method": lambda s: s["metadata"].update(method="em-sghmc", prior="spike-slab"),
    "epoch a string": lambda s: s.update(epoch="x"),
    "model not a state dict": lambda s: s.update(model=5),
    "no model": lambda s: s.pop("model"),
}


@pytest.mark.parametrize("how", list(CRAFTED))
def test_a_well_formed_checkpoint_with_wrong_contents_is_refused_by_evaluate(run_copy, capsys, how):
    out = run_copy("vi")
    _rewrite(out / "checkpoint.pt", CRAFTED[how])
    line = _fails_cleanly(capsys, ["evaluate", str(out)], "checkpoint.pt", untouched=out)
    assert "refused" in line


@pytest.mark.parametrize("how", ["no metadata", "metadata a list", "epochs not a number", "epoch a string"])
def test_a_well_formed_checkpoint_with_wrong_contents_is_refused_on_resume(run_copy, capsys, how):
    out = run_copy("vi")
    _rewrite(out / "checkpoint.pt", CRAFTED[how])
    _fails_cleanly(capsys, ["train", "--resume", "--out", str(out)], "checkpoint.pt", untouched=out)
