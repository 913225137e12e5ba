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
from types import ModuleType
from typing import Any

import torch

from . import checkpoint as checkpoints
from . import data as datasets
from . import likelihoods, metrics, nets, plots, priors, sparse
from .distributed import barrier, current_world, finish
from .errors import CheckpointError, TrainingDiverged
from .evaluation import evaluate, summarize
from .infer.svi import History
from .loaders import check_augmentable
from .model import BayesianNetwork
from .posterior import Posterior
from .recipes import CHECKPOINT, CHECKPOINT_FILES, TrainedRun, recipe
from .run_folder import RunFolder, check_writable, existing_outputs, in_use, remove_outputs
from .run_options import METHOD_OPTIONS, RUN_OPTIONS, flag, resume_changes


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
    elif config["prior"] == "horseshoe":
        prior = priors.NodeHorseshoe(node_scale=config["prior_scale"])
    else:
        spike = config["spike_scale"] or 0.01  # None: em-sghmc sets σ₀ per layer itself
        prior = priors.SpikeAndSlab(config["prior_scale"], spike, config["inclusion"])
    likelihood = (
        likelihoods.Categorical() if dataset.task == "classification" else likelihoods.Gaussian(0.1, learn_scale=True)
    )
    return BayesianNetwork(net, prior=prior, likelihood=likelihood, dataset_size=len(dataset.train))


def load_dataset(config: dict[str, Any]) -> datasets.Dataset:
    dataset = datasets.load(config["data"], root=config.get("data_root"))
    if os.environ.get("PYRO_SPARSE_SMOKE") == "1":
        dataset = dataset.subsample(train=2000, test=1000)
    return dataset


# σ₀ of the spike-and-slab prior when --spike-scale is not given; None: em-sghmc sets it per layer, 2 % of
# the std of the layer's initial weights (infer/em.py).
DEFAULT_SPIKE_SCALE: dict[str, float | None] = {"em-sghmc": None}

DEFAULT_INCLUSION = 0.5  # π of the spike-and-slab prior when --inclusion is not given
SPIKE_AND_SLAB_OPTIONS = ("spike_scale", "inclusion")

# Defaults of options that only some methods read (None in the parser, so that the others can refuse them).
METHOD_DEFAULTS: dict[str, Any] = {"kl_weight": 1.0, "warmup_epochs": 0, "structure": "weight"}
PRIORS = ("gaussian", "spike-slab", "horseshoe")  # the first is the default; a recipe's PRIORS narrows the choice
STRUCTURES = ("weight", "unit")  # --structure; weight is the default

SEED_LIMIT = 2**32  # --seed in [0, 2^32), as numpy and scikit-learn take it


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, so that it is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(item) for item in value]
    return value


def _write_json(path: Path, record: dict[str, Any]) -> None:
    text = json.dumps(strict_json(record), indent=2, allow_nan=False) + "\n"
    checkpoints.atomic_write_bytes(path, text.encode())


def export_sizes(model: BayesianNetwork, posterior: Posterior) -> dict[str, int]:
    """Bytes of the posterior-mean network exported by ``sparse.export``: ``export_bytes`` in the smaller of
    the dense and the sparse (CSR) layouts (removed units cut out in both), ``dense_export_bytes`` with every
    weight of the full-size network stored."""
    full = sparse.storage_bytes(sparse.dense_network(model, posterior))
    if sum(posterior.active_counts().values()) == model.num_weights:  # nothing pruned: no sparse layout
        return {"export_bytes": full, "dense_export_bytes": full}
    smaller = min(sparse.storage_bytes(sparse.export(model, posterior, layout=layout))
                  for layout in ("dense", "sparse"))
    return {"export_bytes": smaller, "dense_export_bytes": full}


SPEEDUP_BATCH_SIZES = (1, 1024)


def unit_report(model: BayesianNetwork, posterior: Posterior, x: torch.Tensor) -> dict[str, Any]:
    """``units_total`` / ``units_active`` (neurons and channels of the layers whose units can be removed,
    ``pyro_sparse.units``) and ``export_speedup_batch_<B>``: how many times faster the exported
    posterior-mean network (``sparse.export``) runs than the dense network at batch B, timed side by
    side now, on this machine and the run's device (``sparse.speedups``); null when nothing is pruned
    (the export is then the dense network)."""
    total, active = sparse.unit_counts(model, posterior)
    pruned = active < total or sum(posterior.active_counts().values()) < model.num_weights
    ratios = (sparse.speedups(model, posterior, x[:256], SPEEDUP_BATCH_SIZES) if pruned
              else dict.fromkeys(SPEEDUP_BATCH_SIZES))
    return {"units_total": total, "units_active": active,
            **{f"export_speedup_batch_{size}": ratio for size, ratio in ratios.items()}}


def _report(model: BayesianNetwork, run: TrainedRun, dataset: datasets.Dataset, config: dict[str, Any],
            out: Path) -> dict[str, Any]:
    x_test, y_test = datasets.as_tensors(dataset.test)
    predictions = run.posterior.predictive(x_test, num_samples=config["samples"])  # one set: metrics and plot
    outputs = predictions.outputs
    results = summarize(model, run.posterior, predictions, x_test, y_test)
    history = run.history
    record = {
        "method": config["method"], "net": config["net"], "data": config["data"], "epochs": config["epochs"],
        "seed": config["seed"], "prior": config["prior"], "batch_size": config["batch_size"], "lr": config["lr"],
        **{key: config[key] for key in ("kl_weight", "warmup_epochs") if config.get(key) is not None},
        "num_samples": config["samples"],
        "world_size": config.get("world_size", 1),
        "global_batch_size": config["batch_size"] * config.get("world_size", 1),
        **results,
        "train_flops": run.train_flops,
        "train_seconds": history[-1]["seconds"] if history else 0.0,
        **run.metrics,
    }
    record.update(export_sizes(model, run.posterior))
    record.update(unit_report(model, run.posterior, x_test))
    if config.get("resume_changes"):
        record["resume_changes"] = list(config["resume_changes"])
    _write_json(out / "metrics.json", record)
    if model.likelihood.task == "classification":
        probs = outputs.softmax(-1).mean(0)
        title = f"{config['method']} {config['net']} {config['data']}: ECE {results['ece']:.3f}"
        plots.reliability_diagram(metrics.reliability(probs, y_test), out / "reliability.png", title=title)
    return strict_json(record)


def check_config(config: dict[str, Any]) -> ModuleType:
    """Check the options against each other (after argparse checked each one); returns the recipe.

    Fills the defaults that depend on the method, writes names in their canonical form and makes
    ``--data-root`` absolute, so that the stored configuration rebuilds the run from any folder.
    """
    method = recipe(config["method"])
    config["device"] = check_device(config["device"])
    config["data"] = datasets.canonical_name(config["data"])
    kl_weight = config.get("kl_weight")
    if kl_weight is not None and (not math.isfinite(kl_weight) or kl_weight < 0):
        raise UsageError(f"--kl-weight must be a number >= 0, got {kl_weight}")
    if not 0 <= config["seed"] < SEED_LIMIT:
        raise UsageError(f"--seed must be an integer in [0, 2^32), got {config['seed']}")
    if config.get("resume") and config.get("overwrite"):
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    for option in METHOD_OPTIONS:
        if config.get(option) is not None and option not in method.OPTIONS:
            raise UsageError(f"{flag(option)} does not apply to --method {config['method']}")
    if config.get("hidden") is not None and config["net"] != "mlp":
        raise UsageError(f"--hidden sets the widths of --net mlp; it does not apply to --net {config['net']}")
    priors_allowed = getattr(method, "PRIORS", PRIORS)
    prior = config.get("prior") or priors_allowed[0]
    if prior not in priors_allowed:
        raise UsageError(f"--method {config['method']} needs --prior {' or '.join(priors_allowed)}, got {prior}")
    for option in SPIKE_AND_SLAB_OPTIONS:
        if config.get(option) is not None and prior != "spike-slab":
            raise UsageError(f"{flag(option)} applies to --prior spike-slab; this run's prior is {prior}")
    fill_method_defaults(config, method)
    config["data_root"] = str(datasets.resolve_root(config.get("data_root")).resolve())
    return method


def fill_method_defaults(config: dict[str, Any], method: ModuleType) -> None:
    """The defaults that depend on --method: the learning rate, the prior and its hyperparameters, and
    the options only some methods read."""
    for option, default in METHOD_DEFAULTS.items():
        if config.get(option) is None and option in method.OPTIONS:
            config[option] = default
    if config.get("lr") is None:
        config["lr"] = method.DEFAULT_LR
    if config.get("prior") is None:
        config["prior"] = getattr(method, "PRIORS", PRIORS)[0]
    if config["prior"] == "spike-slab":
        if config.get("spike_scale") is None:
            config["spike_scale"] = DEFAULT_SPIKE_SCALE.get(config["method"], 0.01)
        if config.get("inclusion") is None:
            config["inclusion"] = DEFAULT_INCLUSION


# Options that a resumed run takes from this command even when not given (they describe this machine).
NOT_FROM_CHECKPOINT = frozenset({"out", "resume", "overwrite", "device"})


def given_options(argv: Sequence[str]) -> set[str]:
    """The ``train`` options that ``argv`` gives explicitly (the others take their defaults)."""
    parser = make_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    for action in train_parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


def stored_options(saved: Any, path: Path) -> dict[str, Any]:
    """The run options stored in a checkpoint, checked the way the command line checks them.

    Raises:
        CheckpointError: the checkpoint holds no options, or options no command line could give.
    """
    metadata = saved.get("metadata") if isinstance(saved, dict) else None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("method"), str):
        raise CheckpointError(path, "it holds no run options (it was not written by `pyro-sparse train`)")
    argv = ["train"]
    for option, value in metadata.items():
        if option not in RUN_OPTIONS or option in NOT_FROM_CHECKPOINT or value is None:
            continue
        if isinstance(value, bool):
            argv += [flag(option)] if value else []
        elif isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            argv += [flag(option), *map(str, value)]
        elif isinstance(value, str | int | float):
            argv += [f"{flag(option)}={value}"]
        else:
            raise CheckpointError(path, f"its stored option {flag(option)} is a {type(value).__name__}: it was not "
                                        "written by `pyro-sparse train`")
    try:
        parsed = vars(make_parser().parse_args([*argv, "--out", str(path.parent)]))
    except UsageError as error:
        raise CheckpointError(path, f"its stored options are invalid ({error}): it was not written by `pyro-sparse "
                                    "train`") from None
    options = {option: parsed.get(option) for option in RUN_OPTIONS if option in metadata}
    changes = metadata.get("resume_changes", [])
    options["resume_changes"] = [str(c) for c in changes] if isinstance(changes, list) else []
    return options


def _epochs_done(saved: dict[str, Any], path: Path) -> int:
    epoch = saved.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise CheckpointError(path, "it does not say how many epochs it holds: it was not written by pyro-sparse")
    return epoch


def _find_checkpoint(out: Path) -> Path | None:
    """The run's latest checkpoint in ``out`` (the final phase's, else snr's dense phase's)."""
    return next((out / name for name in CHECKPOINT_FILES if (out / name).is_file()), None)


Resumed = tuple[dict[str, Any], Path, dict[str, Any]]  # the checkpoint, its path, its run options


def _prepare_resume(config: dict[str, Any], given: set[str], out: Path) -> Resumed | None:
    """For --resume: the run's checkpoint (loaded), its path and its run options; those this command does not give
    are taken from it. None when there is nothing to resume."""
    latest = _find_checkpoint(out) if out.is_dir() else None
    if latest is None:
        return None
    saved = checkpoints.load(latest)
    stored = stored_options(saved, latest)
    for option, value in stored.items():
        if option not in given and option not in NOT_FROM_CHECKPOINT:
            config[option] = value
    return saved, latest, stored


def _check_earlier_run(method: ModuleType, config: dict[str, Any], out: Path,
                       resumed: Resumed | None) -> None:
    """Refuse a busy folder, and an earlier run without --resume or --overwrite; on --resume compare
    the options with the checkpoint's and record the changes that apply from the next epoch."""
    holder = in_use(out) if out.is_dir() else None
    if holder is not None:
        raise UsageError(f"--out {out} is in use by another pyro-sparse run ({holder}): wait for it to end, or "
                         "choose another --out")
    earlier = existing_outputs(out) if out.is_dir() else []
    if not config["resume"]:
        if earlier and not config.get("overwrite"):
            raise UsageError(f"{out} already holds a run ({', '.join(earlier)}): pass --resume to continue it, "
                             f"--overwrite to replace it, or choose another --out")
        return
    if resumed is None:
        if earlier:
            raise UsageError(f"--resume: {out} holds no checkpoint to continue from ({', '.join(earlier)}): "
                             f"pass --overwrite to start afresh")
        return
    saved, latest, stored = resumed
    if stored["method"] != config["method"]:
        raise UsageError(f"--resume: {out} holds a --method {stored['method']} run, this command gives "
                         f"--method {config['method']}: repeat it, or train a new run in another --out")
    changes = resume_changes(stored, config, method, str(out))
    done = _epochs_done(saved, latest)
    phase_option = getattr(method, "PHASE_EPOCHS", {}).get(latest.name, "epochs")
    if config.get(phase_option) is not None and config[phase_option] < done:
        raise UsageError(f"--resume: {latest} already holds {done} epochs; {flag(phase_option)} "
                         f"{config[phase_option]} would shorten a run that is done: give at least {done}")
    label = getattr(method, "PHASE_LABELS", {}).get(latest.name, "epoch")
    config["resume_changes"] = [*stored["resume_changes"], *(f"{change} from {label} {done + 1}" for change in changes)]


def train(config: dict[str, Any], given: set[str] | None = None) -> dict[str, Any]:
    """Run ``pyro-sparse train`` from its configuration; returns the metrics written to metrics.json.

    Every check of the input (options, data, network) runs before the output folder is created. With
    ``config["resume"]`` the options not in ``given`` (default: none, all options count as given) are
    taken from the run's checkpoint, so that ``--resume --out DIR`` alone continues the run as it was.
    """
    given = set(config) if given is None else given
    out = check_writable(config["out"])
    resumed = _prepare_resume(config, given, out) if config.get("resume") else None
    method = check_config(config)
    _check_earlier_run(method, config, out, resumed)
    torch.manual_seed(config["seed"])
    dataset = load_dataset(config)
    model = build_model(config, dataset)
    for split in (dataset.train, dataset.test):
        model.check_batch(*datasets.as_tensors(split))
    if config.get("augment"):
        check_augmentable(datasets.as_tensors(dataset.train)[0])
    if config["device"] == "cuda" and "LOCAL_RANK" in os.environ:  # under torchrun: one GPU per process
        config["device"] = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    world = current_world(config["device"])  # under torchrun: one run over several processes (fit's data parallelism)
    config["world_size"] = world.size
    barrier(world)  # every process has checked the folder before process 0 writes in it
    if not world.is_main:  # the others train alongside process 0 and write nothing
        method.train(config, model, dataset, out)
        finish(world)
        return {}
    with RunFolder(out):
        if config.get("overwrite"):
            remove_outputs(out)
        run = method.train(config, model, dataset, out)
        finish(world)  # training is over on every process: process 0 reports alone, however long that takes
        History(run.history).to_csv(out / "history.csv")
        if run.history and "loss" in run.history[0]:
            plots.training_curve(run.history, out / "training_curve.png")
        return _report(model, run, dataset, config, out)


def evaluate_run(directory: str, samples: int | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Re-evaluate a run from its checkpoint; ``"finished": false`` when training was cut short."""
    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"{directory} is not a folder: give a `pyro-sparse train` output folder")
    latest = _find_checkpoint(folder)
    if latest is None:
        raise FileNotFoundError(f"no {CHECKPOINT} in {directory}: is it a `pyro-sparse train` output folder?")
    saved = checkpoints.load(latest)
    config = {**parser_defaults(str(folder)), **stored_options(saved, latest)}
    if data_root is not None:
        config["data_root"] = str(Path(data_root).expanduser().resolve())
    try:
        method = check_config(config)
    except UsageError as error:
        raise CheckpointError(latest, f"its stored options do not go together ({error})") from None
    epoch = _epochs_done(saved, latest)
    dataset = load_dataset(config)
    model = build_model(config, dataset)
    try:
        posterior = method.restore(config, model, saved)
    except (KeyError, TypeError, AttributeError, IndexError, RuntimeError) as error:
        raise CheckpointError(latest, f"its contents do not fit a --method {config['method']} run of its own "
                                      f"options ({_first_line(error)})") from None
    torch.manual_seed(config["seed"])
    results = evaluate(model, posterior, dataset.test, num_samples=samples or config["samples"])
    epochs = saved.get("epochs")
    finished = latest.name == CHECKPOINT and isinstance(epochs, int) and epoch >= epochs
    return strict_json({"method": config["method"], "net": config["net"], "data": config["data"],
                        "finished": finished, "epoch": epoch, "checkpoint": latest.name, **results})


# The demo: each method at its default settings on digits (the methods' own default sparsity or density), and
# SNR pruning of whole units, whose exported network is smaller and faster.
DEMO_RUNS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("vi", {}),
    ("snr", {"sparsity": 0.9}),
    ("ssvi", {"density": 0.1}),
    ("em-sghmc", {"sparsity": 0.9}),
    ("snr", {"sparsity": 0.75, "structure": "unit"}),
)
DEMO_COLUMNS = ("method", "structure", "accuracy", "ece", "nll", "sparsity", "units", "export_kB", "dense_export_kB",
                "speedup_b1", "speedup_b1024", "train_seconds")


def demo(out: str, epochs: int) -> list[dict[str, Any]]:
    """The main job on the embedded digits data: dense VI, SNR pruning to 90 %, SSVI at density 0.1,
    EM-SGHMC at 90 % and SNR pruning of 75 % of the hidden units, each with its defaults; prints one table
    (accuracy, calibration, sparsity, the size of the exported network against the dense one, and how many
    times faster it runs than the dense network at batch 1 and 1024, measured at the end of each run)."""
    rows = []
    for method, options in DEMO_RUNS:
        structure = options.get("structure", "weight")
        run = Path(out) / (method if structure == "weight" else f"{method}-{structure}")
        config = default_config(method=method, net="mlp", data="digits", epochs=epochs, out=str(run),
                                overwrite=True, **options)  # the demo always trains afresh
        print(f"training {method} ({', '.join(f'{k} {v}' for k, v in options.items()) or 'dense'}) on digits ...",
              flush=True)
        record = train(config)
        record["structure"] = structure
        record["units"] = f"{record['units_active']}/{record['units_total']}"
        record["export_kB"] = record["export_bytes"] / 1000
        record["dense_export_kB"] = record["dense_export_bytes"] / 1000
        record["speedup_b1"] = record["export_speedup_batch_1"]
        record["speedup_b1024"] = record["export_speedup_batch_1024"]
        rows.append(record)
    print()
    print(format_table(rows, DEMO_COLUMNS))
    print(f"\nexport_kB: the posterior-mean network exported by ps.sparse.export (removed units cut out, CSR where "
          f"sparse) against the dense network; speedup_b1 / speedup_b1024: how many times faster it runs than the "
          f"dense network at batch 1 / 1024, timed side by side on this machine.\nunits: hidden units kept / all. "
          f"Outputs (metrics.json, history.csv, checkpoint.pt, PNG plots) in {out}/<method>/")
    return rows


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else "-" if value is None else str(value)

    widths = [max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell(r.get(c)).ljust(w) for c, w in zip(columns, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def parser_defaults(out: str = "runs/default") -> dict[str, Any]:
    """Every ``train`` option at its command-line default (before the method fills its own)."""
    config = vars(make_parser().parse_args(["train", "--out", out]))
    config.pop("command")
    return config


def default_config(**overrides: Any) -> dict[str, Any]:
    """The configuration ``pyro-sparse train`` uses when an option is not given."""
    config = {**parser_defaults(), **overrides}
    fill_method_defaults(config, recipe(config["method"]))
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
    t.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (vi, snr, ssvi) or SGHMC step size (em-sghmc); default: the method's DEFAULT_LR")
    t.add_argument("--prior", choices=PRIORS, default=None, help="gaussian (default), spike-slab (em-sghmc: "
                   "spike-slab only, the default there) or horseshoe (node-wise: one scale per unit, vi, snr and ssvi; "
                   "snr --structure unit removes the units of smallest posterior scale)")
    t.add_argument("--prior-scale", type=_positive_float, default=1.0,
                   help="σ of the Gaussian, σ₁ of the spike-and-slab's slab, b₀ of the horseshoe's node scales")
    t.add_argument("--spike-scale", type=_positive_float, default=None,
                   help="σ₀ of the spike (default 0.01; em-sghmc: per layer, 2 %% of the layer's initial weight std)")
    t.add_argument("--inclusion", type=_fraction(True, True), default=None,
                   help="π, prior slab probability (spike-slab; default 0.5)")
    t.add_argument("--hidden", type=_positive_int, nargs="+", default=None, help="mlp hidden widths")
    t.add_argument("--kl-weight", type=float, default=None, help="β, the KL weight (default 1 = ELBO; not em-sghmc)")
    t.add_argument("--warmup-epochs", type=_nonnegative_int, default=None,
                   help="epochs of linear KL warm-up (default 0; not em-sghmc)")
    t.add_argument("--sparsity", type=_fraction(False, True), default=None, help="target sparsity (snr, em-sghmc)")
    t.add_argument("--finetune-epochs", type=_nonnegative_int, default=None,
                   help="epochs of fine-tuning the surviving weights after pruning (snr; default epochs // 2)")
    t.add_argument("--finetune-lr", type=_positive_float, default=None,
                   help="fine-tuning learning rate (snr; default --lr)")
    t.add_argument("--structure", choices=STRUCTURES, default=None,
                   help="what sparsity removes (snr, ssvi, em-sghmc): weight (default) or unit: whole neurons and "
                        "conv channels, for a smaller and faster exported network; --sparsity / --density then "
                        "count units")
    t.add_argument("--density", type=_fraction(True, False), default=None, help="support density (ssvi)")
    t.add_argument("--update-every", type=_positive_int, default=None, help="steps between support updates (ssvi)")
    t.add_argument("--chains", type=_positive_int, default=None, help="number of chains (em-sghmc)")
    t.add_argument("--samples", type=_positive_int, default=32, help="posterior samples for prediction")
    t.add_argument("--seed", type=int, default=0, help="an integer in [0, 2^32)")
    t.add_argument("--device", default="cpu", help="cpu or cuda")
    t.add_argument("--augment", action="store_true",
                   help="random crops (padding 4) and horizontal flips of colour images, e.g. cifar10")
    t.add_argument("--workers", type=_nonnegative_int, default=0, help="DataLoader worker processes (default 0)")
    t.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="bf16: the forward pass under bfloat16 autocast, for GPUs (vi, snr, ssvi; default fp32)")
    t.add_argument("--out", required=True, help="output folder (one run per folder)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out (options that define the run must match; --epochs and --lr "
                        "may change where the method allows it, from the next epoch on)")
    t.add_argument("--overwrite", action="store_true", help="replace the earlier run in --out")

    e = commands.add_parser("evaluate", help="re-evaluate a trained run")
    e.add_argument("directory")
    e.add_argument("--samples", type=_positive_int, default=None)
    e.add_argument("--data-root", default=None, help="where the dataset files are now (default: as trained)")

    d = commands.add_parser("demo", help="the main job on the embedded digits data")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=_positive_int, default=30)
    return parser


SUPPORTED_DEVICES = ("cpu", "cuda")


def check_device(device: str) -> str:
    """--device: cpu, or cuda[:N] when that GPU exists; returns it as torch writes it ("cpu", "cuda:1")."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {device!r}; use cpu or cuda") from None
    if parsed.type not in SUPPORTED_DEVICES:
        raise UsageError(f"--device {device} is not supported; use cpu or cuda")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA GPUs")
    return "cpu" if parsed.type == "cpu" else str(parsed)


# The API's step-size arguments, as the command line's options.
STEP_SIZE_OPTIONS = {"step_size": "lr"}


def _fail(message: str, status: int = 2) -> int:
    print(f"pyro-sparse: {message}", file=sys.stderr)
    return status


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _out_of_memory(error: RuntimeError) -> bool:
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text


def _interrupted(args: argparse.Namespace) -> str:
    out = getattr(args, "out", None)
    if args.command != "train" or out is None:
        return "interrupted"
    saved = [name for name in CHECKPOINT_FILES if (Path(out) / name).is_file()]
    if not saved:
        return "interrupted before the first checkpoint; nothing was saved"
    return f"interrupted; the last checkpoint {Path(out) / saved[0]} is intact: continue with --resume"


def main(argv: Sequence[str] | None = None) -> int:
    args = argparse.Namespace(command=None)
    try:
        args = make_parser().parse_args(argv)
        if args.command == "train":
            config = vars(args).copy()
            config.pop("command")
            started = time.perf_counter()
            record = train(config, given_options(sys.argv[1:] if argv is None else argv))
            if record:  # empty on the processes other than 0 of a torchrun job: process 0 reports
                print(json.dumps(record, indent=2))
                print(f"wrote {config['out']}/metrics.json in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        elif args.command == "evaluate":
            print(json.dumps(evaluate_run(args.directory, args.samples, args.data_root), indent=2))
        else:
            demo(args.out, args.epochs)
    except KeyboardInterrupt:
        return _fail(_interrupted(args), status=130)
    except TrainingDiverged as error:
        option = STEP_SIZE_OPTIONS.get(error.option, error.option)
        changeable = getattr(recipe(args.method), "CHANGEABLE_ON_RESUME", ()) if args.command == "train" else ()
        return _fail("error: " + error.describe(flag(option), resumable=option in changeable))
    except (ValueError, FileNotFoundError) as error:
        return _fail("error: " + _first_line(error))
    except RuntimeError as error:  # torch.OutOfMemoryError is one; other RuntimeErrors are bugs: let them show
        if not _out_of_memory(error):
            raise
        return _fail("error: out of memory (" + _first_line(error)[:120] + "): use a smaller network or --batch-size")
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        return _fail(f"error: {error.strerror or _first_line(error)}{where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
