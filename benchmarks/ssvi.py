"""Sparse-subspace VI (``ps.guides.SparseSubspace``) against dense mean-field VI on Fashion-MNIST.

Part ``accuracy`` (lenet5 and mlp 784-400-400-10, 10 epochs, batch 128, Gaussian(1) prior, KL
weight 1, seed 0; the same initial network for every variant; Adam lr 1e-3 for dense VI, as chosen
in benchmarks/fashion_vi.py, and ``--ssvi-lr`` for SSVI): dense VI, SSVI at density
0.1 and 0.05 (removal "snr", gradient growth, ΔT = 100 steps, α = 0.3, updates until 75 % of
training; lenet5 keeps its first conv dense, as in the paper, and is also run with every layer
sparse, ``dense_layers=()``). Reports accuracy, NLL, ECE (32 posterior samples), counted training
FLOPs (DESIGN.md: 3 × forward, × 2 in LRT layers, from the active weights, plus one dense forward
and backward on the batch of every gradient-growth update) and their ratio to dense VI, training
seconds, and the bytes of trainable parameters plus Adam's state and their ratio to dense VI.

Part ``steps``: milliseconds per training step side by side (interleaved rounds, one step of each
variant per round, median; batch 128, random inputs; on ``--device``, CPU by default, each step timed
by ``timing.timed``, which waits for a GPU before and after it): dense VI against SSVI at density 0.1
(first conv dense, and all sparse), for mlp 784-400-400-10 and lenet5; plus the cost of one support
update (dense gradient + remove-and-add), amortised over ΔT = 100 steps.

Part ``unit-steps`` (issue 14): the same side-by-side step timing on mlp 784-400-400-10 only: dense VI
against weight-level SSVI at density 0.5 and 0.1 and unit-level SSVI (``structure="unit"``: the smaller
dense network of the active units, ``infer.compact``) with half and a quarter of the hidden units active,
and unit-level SSVI at 0.5 run on the masked dense network (``infer.compact.dense_units``), to show what
the compaction itself is worth; plus each SSVI variant's support update, amortised over ΔT = 100 steps.
Part ``unit-accuracy``: dense VI against unit-level SSVI at 0.5 on Fashion-MNIST (mlp, ``--train-limit``
images, the test split, ``--epochs``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ssvi.py [--part accuracy|steps|unit-steps|unit-accuracy|all]
        [--nets lenet5 mlp] [--epochs 10] [--data-root ../shared/data] [--train-limit N] [--steps 60]
        [--device cpu|cuda] [--out benchmarks/results/ssvi.json]

The JSON is merged into ``--out`` (results of other nets and parts already there are kept).

SSVI learning rate for lenet5, chosen on a validation split (ps.fit on 50,000 training images, scored
with 16 samples on the other 10,000, seed 0, density 0.1, first conv dense unless noted; dense VI
at lr 1e-3 there: 90.09 %, NLL 0.276, ECE 0.0133):

    SSVI setting                      val acc  NLL    ECE
    lr 1e-3                           87.00 %  0.363  0.0132
    lr 2e-3                           88.27 %  0.324  0.0279
    lr 3e-3                           88.45 %  0.317  0.0227
    lr 5e-3                           88.09 %  0.332  0.0336
    lr 1e-3, layer_density="erk"      87.82 %  0.346  0.0204
    lr 3e-3, layer_density="erk"      88.45 %  0.316  0.0284
    lr 3e-3, no updates (α = 0)       87.98 %  0.334  0.0177
    lr 3e-3, update_every 50          88.16 %  0.321  0.0232

So lenet5's SSVI runs use ``--ssvi-lr 3e-3`` (uniform layer density); the support updates are worth
about half a point over a static random support. The mlp runs use lr 1e-3 (not tuned: dense VI's).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path
from typing import Any

import pyro
import torch
from timing import timed

import pyro_sparse as ps
from pyro_sparse.evaluation import training_flops_per_example
from pyro_sparse.guides.subspace import dense_trainable_bytes, trainable_bytes
from pyro_sparse.infer.compact import dense_units
from pyro_sparse.infer.elbo import negative_elbo
from pyro_sparse.infer.svi import make_adam

REPO_ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZE = 128
LR = 1e-3
NUM_SAMPLES = 32
NETS = {"lenet5": lambda: ps.nets.lenet5(1, 10, 28), "mlp": lambda: ps.nets.mlp(784, (400, 400), 10)}


def variants(net: str, layer_density: str) -> dict[str, dict[str, Any] | None]:
    """Label -> SparseSubspace keyword arguments (None: dense VI)."""
    runs: dict[str, dict[str, Any] | None] = {"dense VI": None}
    for density in (0.1, 0.05):
        runs[f"SSVI {density}"] = {"density": density, "layer_density": layer_density}
    if net == "lenet5":
        runs["SSVI 0.1, all sparse"] = {"density": 0.1, "dense_layers": (), "layer_density": layer_density}
    return runs


def make_guide(model: ps.BayesianNetwork, kwargs: dict[str, Any] | None) -> ps.MeanField:
    return ps.MeanField(model) if kwargs is None else ps.guides.SparseSubspace(model, **kwargs)


def train_and_evaluate(initial: torch.nn.Module, kwargs: dict[str, Any] | None, ds: ps.data.Dataset, epochs: int,
                       lr: float, seed: int) -> tuple[ps.BayesianNetwork, ps.MeanField, list, dict[str, Any]]:
    """One variant from the shared initial network: (model, guide, fit's history, ps.evaluate's metrics)."""
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    model = ps.BayesianNetwork(copy.deepcopy(initial), dataset_size=len(ds.train))
    guide = make_guide(model, kwargs)
    history = ps.fit(model, guide, ds.train, epochs=epochs, batch_size=BATCH_SIZE, lr=lr, seed=seed, progress=False)
    torch.manual_seed(seed)
    return model, guide, history, ps.evaluate(model, guide, ds.test, num_samples=NUM_SAMPLES)


def run_accuracy(net: str, ds: ps.data.Dataset, epochs: int, seed: int, ssvi_lr: float,
                 layer_density: str, only: list[str] | None = None) -> dict[str, dict[str, Any]]:
    x_train, _ = ds.train.tensors
    torch.manual_seed(seed)
    initial = NETS[net]()
    results = {}
    for label, kwargs in variants(net, layer_density).items():
        if only and label not in only:
            continue
        lr = LR if kwargs is None else ssvi_lr
        model, guide, history, metrics = train_and_evaluate(initial, kwargs, ds, epochs, lr, seed)
        examples = len(x_train) * epochs
        flops = training_flops_per_example(model, guide.active_counts(), x_train) * examples
        if kwargs is not None:
            flops += guide.gradient_flops(x_train)
        dense_flops = training_flops_per_example(model, {}, x_train) * examples
        nbytes = trainable_bytes([*guide.parameters(), *model.parameters()])
        row = {key: metrics[key] for key in ("accuracy", "nll", "ece", "brier", "mean_sample_accuracy",
                                               "sparsity", "active_weights", "total_weights")}
        row.update(lr=lr, active_counts=guide.active_counts(), train_flops=flops,
                   train_flops_ratio=flops / dense_flops, train_seconds=history[-1]["seconds"],
                   trainable_bytes=nbytes, trainable_bytes_ratio=nbytes / dense_trainable_bytes(model))
        if kwargs is not None:
            row.update(support_updates=len(guide.update_log),
                       moved_per_update=[entry["moved"] for entry in guide.update_log])
        results[label] = row
        print(f"  {net} {label}: acc {100 * row['accuracy']:.2f} %, NLL {row['nll']:.4f}, ECE {row['ece']:.4f}, "
              f"FLOPs ratio {row['train_flops_ratio']:.3f}, bytes ratio {row['trainable_bytes_ratio']:.3f}, "
              f"{row['train_seconds']:.0f} s", flush=True)
    dense = results["dense VI"]
    for row in results.values():
        row["accuracy_gap_points"] = 100 * (row["accuracy"] - dense["accuracy"])
        row["ece_difference"] = row["ece"] - dense["ece"]
    return results


def _step(model, guide, optimizer, x, y) -> None:
    terms = negative_elbo(model, guide, x, y)
    optimizer.zero_grad(set_to_none=True)
    terms.loss.backward()
    optimizer.step()


def run_steps(net: str, steps: int, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    x = torch.randn(BATCH_SIZE, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (BATCH_SIZE,), device=device)
    setups = {"dense VI": None, "SSVI 0.1": {"density": 0.1}}
    if net == "lenet5":
        setups["SSVI 0.1, all sparse"] = {"density": 0.1, "dense_layers": ()}
    runs, guides, result = {}, {}, {}
    for label, kwargs in setups.items():
        model = ps.BayesianNetwork(NETS[net](), dataset_size=60000).to(device)
        guide = make_guide(model, kwargs).to(device)
        optimizer = make_adam([*guide.parameters(), *model.parameters()], LR)
        runs[label] = lambda m=model, g=guide, o=optimizer: _step(m, g, o, x, y)
        guides[label] = (guide, optimizer)
        result[f"{label} trainable_bytes"] = trainable_bytes([*guide.parameters(), *model.parameters()])
    for fn in runs.values():  # warm-up
        for _ in range(5):
            fn()
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(steps):
        for label, fn in runs.items():
            times[label].append(timed(fn, device))
    for label in runs:
        result[f"{label} ms"] = statistics.median(times[label])
        result[f"{label} / dense"] = result[f"{label} ms"] / statistics.median(times["dense VI"])
        if label != "dense VI":
            guide, optimizer = guides[label]
            update_ms = statistics.median(timed(lambda g=guide, o=optimizer: g.update_support(0.1, (x, y), o), device)
                                          for _ in range(10))
            result[f"{label} update ms"] = update_ms
            amortised = result[f"{label} ms"] + update_ms / 100
            result[f"{label} amortised / dense"] = amortised / result["dense VI ms"]
    return result


UNIT_STEP_SETUPS: dict[str, dict[str, Any] | None] = {
    "dense VI": None,
    "SSVI weight 0.5": {"density": 0.5},
    "SSVI weight 0.1": {"density": 0.1},
    "SSVI unit 0.5": {"density": 0.5, "structure": "unit"},
    "SSVI unit 0.25": {"density": 0.25, "structure": "unit"},
    "SSVI unit 0.5, masked dense": {"density": 0.5, "structure": "unit"},
}


def run_unit_steps(steps: int, device: torch.device) -> dict[str, Any]:
    """ms per step of ``UNIT_STEP_SETUPS`` on mlp 784-400-400-10, interleaved rounds, medians."""
    torch.manual_seed(0)
    x = torch.randn(BATCH_SIZE, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (BATCH_SIZE,), device=device)
    runs, guides, result = {}, {}, {}
    for label, kwargs in UNIT_STEP_SETUPS.items():
        model = ps.BayesianNetwork(NETS["mlp"](), dataset_size=60000).to(device)
        guide = make_guide(model, kwargs).to(device)
        optimizer = make_adam([*guide.parameters(), *model.parameters()], LR)
        if label.endswith("masked dense"):
            def step(m=model, g=guide, o=optimizer) -> None:
                with dense_units():
                    _step(m, g, o, x, y)
        else:
            def step(m=model, g=guide, o=optimizer) -> None:
                _step(m, g, o, x, y)
        runs[label], guides[label] = step, (guide, optimizer)
        result[label] = {"active_weights": guide.num_active, "trainable_bytes":
                         trainable_bytes([*guide.parameters(), *model.parameters()])}
    for fn in runs.values():  # warm-up
        for _ in range(5):
            fn()
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(steps):
        for label, fn in runs.items():
            times[label].append(timed(fn, device))
    dense_ms = statistics.median(times["dense VI"])
    for label, row in result.items():
        row["ms"] = statistics.median(times[label])
        row["ratio"] = row["ms"] / dense_ms
        if label != "dense VI" and not label.endswith("masked dense"):
            guide, optimizer = guides[label]
            update_ms = statistics.median(timed(lambda g=guide, o=optimizer: g.update_support(0.1, (x, y), o), device)
                                          for _ in range(10))
            row["update_ms"] = update_ms
            row["amortised_ratio"] = (row["ms"] + update_ms / 100) / dense_ms
    return result


def run_unit_accuracy(ds: ps.data.Dataset, epochs: int, seed: int) -> dict[str, dict[str, Any]]:
    """Dense VI against unit-level SSVI at density 0.5 (mlp, the same initial network, lr 1e-3)."""
    torch.manual_seed(seed)
    initial = NETS["mlp"]()
    results = {}
    for label, kwargs in (("dense VI", None), ("SSVI unit 0.5", {"density": 0.5, "structure": "unit"})):
        _, _, history, metrics = train_and_evaluate(initial, kwargs, ds, epochs, LR, seed)
        results[label] = {key: metrics[key] for key in ("accuracy", "nll", "ece", "mean_sample_accuracy",
                                                          "sparsity", "active_weights")}
        results[label]["train_seconds"] = history[-1]["seconds"]
        print(f"  {label}: acc {100 * metrics['accuracy']:.2f} %, NLL {metrics['nll']:.4f}, ECE {metrics['ece']:.4f}, "
              f"{history[-1]['seconds']:.1f} s training", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("accuracy", "steps", "unit-steps", "unit-accuracy", "all"), default="all")
    parser.add_argument("--nets", nargs="+", choices=tuple(NETS), default=list(NETS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--train-limit", type=int, default=None, help="train on a random subset (quick checks)")
    parser.add_argument("--steps", type=int, default=60, help="interleaved rounds of the step-time part")
    parser.add_argument("--device", default="cpu", help="device of the step-time part (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--ssvi-lr", type=float, default=LR, help="Adam learning rate of the SSVI runs")
    parser.add_argument("--layer-density", choices=("uniform", "erk"), default="uniform",
                        help="SparseSubspace(layer_density=...) of the SSVI runs")
    parser.add_argument("--only", nargs="+", default=None,
                        help='variants of the accuracy part to run, e.g. "dense VI" "SSVI 0.1" (default: all)')
    parser.add_argument("--out", default="benchmarks/results/ssvi.json")
    args = parser.parse_args()
    out = Path(args.out)
    out = out if out.is_absolute() else REPO_ROOT / out
    meta = {"batch_size": BATCH_SIZE, "dense_vi_lr": LR, "ssvi_lr": args.ssvi_lr,
            "layer_density": args.layer_density, "epochs": args.epochs, "seed": args.seed, "prior": "Gaussian(1.0)",
            "num_samples": NUM_SAMPLES, "train_limit": args.train_limit, "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    new: dict[str, Any] = {}
    part_meta = {"accuracy": meta}
    if args.part in ("accuracy", "all"):
        root = Path(args.data_root).expanduser()
        ds = ps.data.load("fashion-mnist", root=root if root.is_absolute() else REPO_ROOT / root)
        if args.train_limit is not None:
            ds = ds.subsample(train=args.train_limit, seed=args.seed)
        print(f"Fashion-MNIST {len(ds.train)} / {len(ds.test)}, {args.epochs} epochs, batch {BATCH_SIZE}, "
              f"lr {LR} (dense VI) / {args.ssvi_lr} (SSVI), layer density {args.layer_density}")
        for net in args.nets:
            rows = run_accuracy(net, ds, args.epochs, args.seed, args.ssvi_lr, args.layer_density, args.only)
            new.setdefault("accuracy", {})[net] = rows
            print(f"\n{net}: {'':<22} {'acc %':>7} {'gap':>6} {'NLL':>7} {'ECE':>7} {'FLOPs ratio':>11} "
                  f"{'bytes ratio':>11} {'train s':>8}")
            for label, r in rows.items():
                print(f"{'':<6}{label:<22} {100 * r['accuracy']:>7.2f} {r['accuracy_gap_points']:>+6.2f} "
                      f"{r['nll']:>7.4f} {r['ece']:>7.4f} {r['train_flops_ratio']:>11.3f} "
                      f"{r['trainable_bytes_ratio']:>11.3f} {r['train_seconds']:>8.0f}")
    if args.part in ("steps", "all"):
        device = torch.device(args.device)
        print(f"\nms per training step, batch {BATCH_SIZE}, {device}, median of {args.steps} interleaved rounds")
        part_meta["steps"] = {**meta, "steps": args.steps, "device": str(device)}
        if device.type == "cuda":
            part_meta["steps"]["device_name"] = torch.cuda.get_device_name(device)
        for net in args.nets:
            result = run_steps(net, args.steps, device)
            new.setdefault("steps", {})[net] = result
            print(f"  {net}: " + ", ".join(f"{k} {v:.3g}" for k, v in result.items() if "bytes" not in k))
    if args.part == "unit-steps":
        device = torch.device(args.device)
        print(f"\nmlp 784-400-400-10: ms per training step, batch {BATCH_SIZE}, {device}, "
              f"{torch.get_num_threads()} thread(s), median of {args.steps} interleaved rounds")
        part_meta["unit-steps"] = {**meta, "steps": args.steps, "device": str(device)}
        if device.type == "cuda":
            part_meta["unit-steps"]["device_name"] = torch.cuda.get_device_name(device)
        result = run_unit_steps(args.steps, device)
        new.setdefault("unit-steps", {})["mlp"] = result
        print(f"  {'':<30} {'active weights':>14} {'ms':>8} {'/ dense':>8} {'update ms':>10} {'amortised':>10}")
        for label, row in result.items():
            update = f"{row['update_ms']:>10.2f} {row['amortised_ratio']:>10.3f}" if "update_ms" in row else ""
            print(f"  {label:<30} {row['active_weights']:>14} {row['ms']:>8.2f} {row['ratio']:>8.3f} {update}")
    if args.part == "unit-accuracy":
        root = Path(args.data_root).expanduser()
        ds = ps.data.load("fashion-mnist", root=root if root.is_absolute() else REPO_ROOT / root)
        if args.train_limit is not None:
            ds = ds.subsample(train=args.train_limit, seed=args.seed)
        part_meta["unit-accuracy"] = {**meta, "lr": LR}
        print(f"Fashion-MNIST {len(ds.train)} / {len(ds.test)}, mlp, {args.epochs} epochs, batch {BATCH_SIZE}, lr {LR}")
        new.setdefault("unit-accuracy", {})["mlp"] = run_unit_accuracy(ds, args.epochs, args.seed)
    saved = json.loads(out.read_text()) if out.is_file() else {}
    for part, by_net in new.items():
        saved.setdefault(part, {}).update(by_net)
        for net in by_net:
            saved.setdefault("meta", {}).setdefault(part, {})[net] = part_meta[part]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(saved, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
