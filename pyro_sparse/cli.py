"""``pyro-sparse train | evaluate | demo``.

    pyro-sparse train --method vi --net mlp --data digits --epochs 30 --out runs/vi
    pyro-sparse evaluate runs/vi
    pyro-sparse demo

``train`` writes metrics.json, history.csv, checkpoint.pt and PNG plots to --out. Bad input ends
with exit status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as checkpoints
from . import data as datasets
from . import likelihoods, metrics, nets, plots, priors
from .evaluation import evaluate, summarize
from .infer.svi import History
from .model import BayesianNetwork
from .recipes import CHECKPOINT, TrainedRun, recipe


class UsageError(ValueError):
    """Bad command-line input."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise UsageError(message)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _fraction(low_open: bool, high_open: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text)
        ok_low = value > 0 if low_open else value >= 0
        ok_high = value < 1 if high_open else value <= 1
        if not (math.isfinite(value) and ok_low and ok_high):
            interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must lie in {interval}, got {text}")
        return value

    return parse


# ----------------------------------------------------------------------------------------------
# Building a run from its configuration
# ----------------------------------------------------------------------------------------------
def build_model(config: dict[str, Any], dataset: datasets.Dataset) -> BayesianNetwork:
    """The BayesianNetwork described by a run configuration (the CLI's arguments)."""
    outputs = dataset.num_classes if dataset.task == "classification" else 1
    hidden = config.get("hidden")
    net = nets.build(config["net"], dataset.input_shape, outputs, **({"hidden": hidden} if hidden else {}))
    if config["prior"] == "gaussian":
        prior = priors.Gaussian(config["prior_scale"])
    else:
        prior = priors.SpikeAndSlab(config["prior_scale"], config["spike_scale"], config["inclusion"])
    likelihood = (
        likelihoods.Categorical() if dataset.task == "classification" else likelihoods.Gaussian(0.1, learn_scale=True)
    )
    return BayesianNetwork(net, prior=prior, likelihood=likelihood, dataset_size=len(dataset.train))


def load_dataset(config: dict[str, Any]) -> datasets.Dataset:
    dataset = datasets.load(config["data"], root=config.get("data_root"))
    if os.environ.get("PYRO_SPARSE_SMOKE") == "1":
        dataset = dataset.subsample(train=2000, test=1000)
    return dataset


# σ₀ of the spike-and-slab prior when --spike-scale is not given: SGHMC samples that fall in a spike of
# 0.01 are not pruned but held near zero, and lenet5 underfits (benchmarks/em_sghmc.py).
DEFAULT_SPIKE_SCALE = {"em-sghmc": 0.001}

# Method-specific command-line options: the CLI rejects those the chosen method does not read.
METHOD_OPTIONS = ("sparsity", "density", "chains", "finetune_epochs", "finetune_lr", "update_every")


def _report(model: BayesianNetwork, run: TrainedRun, dataset: datasets.Dataset, config: dict[str, Any],
            out: Path) -> dict[str, Any]:
    x_test, y_test = datasets.as_tensors(dataset.test)
    model.check_batch(x_test, y_test)
    outputs = run.posterior.predict(x_test, num_samples=config["samples"])  # one set of draws: metrics and plot
    results = summarize(model, run.posterior, outputs, x_test, y_test)
    history = run.history
    record = {
        "method": config["method"], "net": config["net"], "data": config["data"], "epochs": config["epochs"],
        "seed": config["seed"], "prior": config["prior"], "batch_size": config["batch_size"], "lr": config["lr"],
        "kl_weight": config["kl_weight"], "warmup_epochs": config["warmup_epochs"],
        "num_samples": config["samples"],
        **results,
        "train_flops": run.train_flops,
        "train_seconds": history[-1]["seconds"] if history else 0.0,
        **run.metrics,
    }
    (out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    if model.likelihood.task == "classification":
        probs = outputs.softmax(-1).mean(0)
        title = f"{config['method']} {config['net']} {config['data']}: ECE {results['ece']:.3f}"
        plots.reliability_diagram(metrics.reliability(probs, y_test), out / "reliability.png", title=title)
    return record


def train(config: dict[str, Any]) -> dict[str, Any]:
    """Run ``pyro-sparse train`` from its configuration; returns the metrics written to metrics.json."""
    method = recipe(config["method"])
    if config.get("spike_scale") is None:
        config["spike_scale"] = DEFAULT_SPIKE_SCALE.get(config["method"], 0.01)
    for option in METHOD_OPTIONS:
        if config.get(option) is not None and option not in method.OPTIONS:
            raise UsageError(f"--{option.replace('_', '-')} does not apply to --method {config['method']}")
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / CHECKPOINT
    if config["resume"] and path.is_file():
        saved = checkpoints.load(path)["metadata"]
        keys = ("method", "net", "data", "prior", "prior_scale", "batch_size", "seed", *METHOD_OPTIONS)
        changed = [key for key in keys if saved.get(key) != config.get(key)]
        if changed:
            raise UsageError(f"--resume: {out} was trained with different {', '.join(changed)}")
    elif path.is_file() and not config["resume"]:
        raise UsageError(f"{out} already holds a run; pass --resume to continue it or choose another --out")

    torch.manual_seed(config["seed"])
    dataset = load_dataset(config)
    model = build_model(config, dataset)
    run = method.train(config, model, dataset, out)
    History(run.history).to_csv(out / "history.csv")
    if run.history and "loss" in run.history[0]:
        plots.training_curve(run.history, out / "training_curve.png")
    return _report(model, run, dataset, config, out)


def evaluate_run(directory: str, samples: int | None = None) -> dict[str, Any]:
    """Re-evaluate a finished run from its checkpoint."""
    path = Path(directory) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no {CHECKPOINT} in {directory}: is it a `pyro-sparse train` output folder?")
    saved = checkpoints.load(path)
    config = saved["metadata"]
    dataset = load_dataset(config)
    model = build_model(config, dataset)
    posterior = recipe(config["method"]).restore(config, model, saved)
    torch.manual_seed(config["seed"])
    results = evaluate(model, posterior, dataset.test, num_samples=samples or config["samples"])
    return {"method": config["method"], "net": config["net"], "data": config["data"], **results}


DEMO_COLUMNS = ("prior", "accuracy", "mean_sample_accuracy", "nll", "ece", "brier", "sparsity", "train_seconds")


def demo(out: str, epochs: int) -> list[dict[str, Any]]:
    """The main job on the embedded digits data: dense mean-field VI with each prior; prints a table."""
    rows = []
    for prior in ("gaussian", "spike-slab"):
        run = Path(out) / prior
        (run / CHECKPOINT).unlink(missing_ok=True)  # the demo always trains afresh
        config = default_config(method="vi", net="mlp", data="digits", epochs=epochs, prior=prior, out=str(run))
        print(f"training {config['method']} {config['net']} on {config['data']} with the {prior} prior ...",
              flush=True)
        rows.append(train(config))
    print()
    print(format_table(rows, DEMO_COLUMNS))
    print(f"\nOutputs (metrics.json, history.csv, checkpoint.pt, PNG plots) in {out}/<prior>/")
    return rows


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    widths = [max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell(r.get(c)).ljust(w) for c, w in zip(columns, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def default_config(**overrides: Any) -> dict[str, Any]:
    """The configuration ``pyro-sparse train`` uses when an option is not given."""
    config = vars(make_parser().parse_args(["train", "--out", "runs/default"]))
    config.pop("command")
    config.update(overrides)
    return config


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyro-sparse", description="Sparse Bayesian neural networks in Pyro.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = commands.add_parser("train", help="train a Bayesian network and evaluate it")
    t.add_argument("--method", default="vi", help="vi (dense mean-field VI), snr, ssvi or em-sghmc")
    t.add_argument("--net", default="mlp", help=f"one of: {', '.join(sorted(nets.NETS))}")
    t.add_argument("--data", default="digits", help=f"one of: {', '.join(datasets.DATASETS)}")
    t.add_argument("--data-root", default=None, help="folder with the dataset files (MNIST/, FashionMNIST/, ...)")
    t.add_argument("--epochs", type=_positive_int, default=30)
    t.add_argument("--batch-size", type=_positive_int, default=64)
    t.add_argument("--lr", type=_positive_float, default=5e-3)
    t.add_argument("--prior", choices=("gaussian", "spike-slab"), default="gaussian")
    t.add_argument("--prior-scale", type=_positive_float, default=1.0, help="σ of the Gaussian / slab")
    t.add_argument("--spike-scale", type=_positive_float, default=None,
                   help="σ₀ of the spike (default 0.01; 0.001 for em-sghmc, whose samples would sit in a wider spike)")
    t.add_argument("--inclusion", type=_fraction(True, True), default=0.5, help="π, prior slab probability")
    t.add_argument("--hidden", type=_positive_int, nargs="+", default=None, help="mlp hidden widths")
    t.add_argument("--kl-weight", type=float, default=1.0, help="β, the KL weight (1 = ELBO)")
    t.add_argument("--warmup-epochs", type=int, default=0, help="epochs of linear KL warm-up")
    t.add_argument("--sparsity", type=_fraction(False, True), default=None, help="target sparsity (snr, em-sghmc)")
    t.add_argument("--finetune-epochs", type=_nonnegative_int, default=None,
                   help="epochs of fine-tuning the surviving weights after pruning (snr; default epochs // 2)")
    t.add_argument("--finetune-lr", type=_positive_float, default=None,
                   help="fine-tuning learning rate (snr; default --lr)")
    t.add_argument("--density", type=_fraction(True, False), default=None, help="support density (ssvi)")
    t.add_argument("--update-every", type=_positive_int, default=None, help="steps between support updates (ssvi)")
    t.add_argument("--chains", type=_positive_int, default=None, help="number of chains (em-sghmc)")
    t.add_argument("--samples", type=_positive_int, default=32, help="posterior samples for prediction")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu", help="cpu or cuda")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")

    e = commands.add_parser("evaluate", help="re-evaluate a trained run")
    e.add_argument("directory")
    e.add_argument("--samples", type=_positive_int, default=None)

    d = commands.add_parser("demo", help="the main job on the embedded digits data")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=_positive_int, default=30)
    return parser


def _check_device(device: str) -> None:
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use cpu or cuda") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = make_parser().parse_args(argv)
        if args.command == "train":
            config = vars(args)
            config.pop("command")
            _check_device(config["device"])
            if config["kl_weight"] < 0 or not math.isfinite(config["kl_weight"]):
                raise UsageError(f"--kl-weight must be >= 0, got {config['kl_weight']}")
            if config["warmup_epochs"] < 0:
                raise UsageError(f"--warmup-epochs must be >= 0, got {config['warmup_epochs']}")
            started = time.perf_counter()
            record = train(config)
            print(json.dumps(record, indent=2))
            print(f"wrote {config['out']}/metrics.json in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        elif args.command == "evaluate":
            print(json.dumps(evaluate_run(args.directory, args.samples), indent=2))
        else:
            demo(args.out, args.epochs)
    except (ValueError, FileNotFoundError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"pyro-sparse: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
