"""SNR pruning of dense mean-field VI on Fashion-MNIST: accuracy, NLL, ECE and mean single-sample
accuracy against the pruned fraction, ours against Sharma & Jennings' setting (BPrune).

For each network (lenet5; mlp 784-400-400-10) one dense mean-field VI posterior is trained
(``ps.fit``, Gaussian(1) prior, KL weight 1, batch 128, lr ``--lr``; lr 1e-3 is what
``fashion_vi.py`` chose on a validation split for lenet5 in 10 epochs), then copies of it are
pruned by SNR = |μ| / σ (``ps.guides.snr_sweep``) to each target sparsity and evaluated on the
test split with 32 posterior samples, in five settings (pruned weights are exact zeros, μ = σ = 0,
in all but the last):

    layer         every layer loses the same fraction: its own round(s · n) lowest-SNR weights
    layer+ft      the same, then ``--finetune-epochs`` epochs of ``ps.fit`` (lr ``--finetune-lr``)
    global        one SNR threshold across all layers (the quantile removing round(s · N) of all N
                  weights), no fine-tuning = the paper's setting
    global+ft     ours (``ps.guides.SNRPruned`` default, ``--method snr``): the same, then fine-tuning
    paper-noise   the paper's tool: global, no fine-tuning, pruned weights μ = 0 but σ = softplus(0)

The 0 % row of the fine-tuned settings is dense VI trained ``--finetune-epochs`` epochs longer (the
fair reference for what fine-tuning alone adds). Accuracy loss is reported against the dense row.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/snr_sweep.py [--nets lenet5 mlp] [--epochs 10]
        [--finetune-epochs 2] [--lr 1e-3] [--finetune-lr 1e-3] [--sparsities 0 0.5 0.8 0.9 0.95]
        [--data-root ../shared/data] [--train-limit N] [--out benchmarks/results/snr_sweep.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import pyro
import torch

import pyro_sparse as ps
from pyro_sparse.guides import SNRPruned, snr_sweep

REPO_ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZE = 128
NUM_SAMPLES = 32
SETTINGS = {  # name -> snr_sweep arguments (finetune_epochs filled in from the command line)
    "layer": {"scope": "layer", "finetune": False},
    "layer+ft": {"scope": "layer", "finetune": True},
    "global": {"scope": "global", "finetune": False},
    "global+ft": {"scope": "global", "finetune": True},
    "paper-noise": {"scope": "global", "finetune": False, "pruned": "noise"},
}
COLUMNS = ("accuracy", "nll", "ece", "mean_sample_accuracy")


def build_net(name: str) -> torch.nn.Module:
    return ps.nets.lenet5() if name == "lenet5" else ps.nets.mlp(784, (400, 400), 10)


def run_net(name: str, ds: ps.data.Dataset, args: argparse.Namespace) -> dict:
    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    model = ps.BayesianNetwork(build_net(name), prior=ps.priors.Gaussian(1.0), dataset_size=len(ds.train))
    guide = SNRPruned(model)
    started = time.perf_counter()
    history = ps.fit(model, guide, ds.train, epochs=args.epochs, batch_size=BATCH_SIZE, lr=args.lr,
                     seed=args.seed, progress=False)
    print(f"[{name}] dense VI: {args.epochs} epochs in {time.perf_counter() - started:.0f} s, "
          f"final -ELBO/N {history[-1]['loss']:.4f}", flush=True)
    torch.manual_seed(args.seed)
    dense = ps.evaluate(model, guide, ds.test, num_samples=NUM_SAMPLES)
    print(f"[{name}] dense: " + ", ".join(f"{k} {dense[k]:.4f}" for k in COLUMNS), flush=True)
    rows = []
    chosen = [name for name in SETTINGS if name in args.settings]
    first_finetuned = next((name for name in chosen if SETTINGS[name]["finetune"]), None)
    for setting in chosen:
        spec = SETTINGS[setting]
        targets = [s for s in args.sparsities if s > 0 or setting == first_finetuned]
        for target in targets:
            started = time.perf_counter()
            (row,) = snr_sweep(
                model, guide, ds, [target], scope=spec["scope"], pruned=spec.get("pruned", "zero"),
                finetune_epochs=args.finetune_epochs if spec["finetune"] else 0, num_samples=NUM_SAMPLES,
                seed=args.seed, lr=args.finetune_lr, batch_size=BATCH_SIZE,
            )
            row.update(setting=setting, seconds=time.perf_counter() - started,
                       accuracy_loss_points=100 * (dense["accuracy"] - row["accuracy"]))
            rows.append(row)
            print(f"[{name}] {setting:<11} {100 * target:>4.0f} %: acc {100 * row['accuracy']:.2f} "
                  f"(loss {row['accuracy_loss_points']:+.2f} pts), nll {row['nll']:.4f}, ece {row['ece']:.4f}, "
                  f"1-sample {100 * row['mean_sample_accuracy']:.2f}, achieved sparsity {row['sparsity']:.4f} "
                  f"({row['seconds']:.0f} s)", flush=True)
    layers = copy.deepcopy(guide)
    layers.prune(sparsity=0.9, scope="global")
    return {"dense": dense, "dense_history": list(history), "rows": rows,
            "global_90_layer_sparsity": layers.layer_sparsity()}


def markdown(name: str, result: dict, sparsities: list[float]) -> str:
    dense = result["dense"]
    lines = [f"**{name}** — dense VI: accuracy {100 * dense['accuracy']:.2f} %, NLL {dense['nll']:.4f}, "
             f"ECE {dense['ece']:.4f}, single-sample {100 * dense['mean_sample_accuracy']:.2f} %", "",
             "| setting | sparsity | accuracy | loss (pts) | NLL | ECE | single-sample acc. |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["rows"]:
        lines.append(f"| {row['setting']} | {100 * row['target_sparsity']:.0f} % | {100 * row['accuracy']:.2f} % | "
                     f"{row['accuracy_loss_points']:+.2f} | {row['nll']:.4f} | {row['ece']:.4f} | "
                     f"{100 * row['mean_sample_accuracy']:.2f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", choices=("lenet5", "mlp"), default=["lenet5", "mlp"])
    parser.add_argument("--epochs", type=int, default=10, help="epochs of dense VI")
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of dense VI")
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.8, 0.9, 0.95])
    parser.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default="../shared/data",
                        help="data folder; a relative path is taken from the repository root")
    parser.add_argument("--train-limit", type=int, default=None, help="train on a random subset (quick checks)")
    parser.add_argument("--test-limit", type=int, default=None, help="evaluate on a random subset (quick checks)")
    parser.add_argument("--out", default="benchmarks/results/snr_sweep.json")
    args = parser.parse_args()

    root = Path(args.data_root).expanduser()
    root = root if root.is_absolute() else REPO_ROOT / root
    ds = ps.data.load("fashion-mnist", root=root)
    if args.train_limit is not None or args.test_limit is not None:
        ds = ds.subsample(train=args.train_limit, test=args.test_limit, seed=args.seed)
    out = Path(args.out)
    out = out if out.is_absolute() else REPO_ROOT / out
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"dataset": "fashion-mnist", "train_examples": len(ds.train), "test_examples": len(ds.test),
            "epochs": args.epochs, "finetune_epochs": args.finetune_epochs, "lr": args.lr,
            "finetune_lr": args.finetune_lr, "settings": args.settings, "batch_size": BATCH_SIZE, "seed": args.seed,
            "prior": "Gaussian(1.0)", "kl_weight": 1.0, "num_samples": NUM_SAMPLES,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"Fashion-MNIST {len(ds.train)} train / {len(ds.test)} test; {meta}", flush=True)
    results = {}
    for name in args.nets:
        results[name] = run_net(name, ds, args)
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))  # partial results survive
    print()
    for name, result in results.items():
        print(markdown(name, result, args.sparsities))
        print()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
