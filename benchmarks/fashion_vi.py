"""Dense mean-field VI against a deterministic LeNet-5 on Fashion-MNIST (same epochs, batch 128):

(a) deterministic: the plain ``ps.nets.lenet5()`` trained with Adam (lr 1e-3) on cross-entropy;
    its softmax on the test split is scored with ``ps.metrics.classification_metrics``;
(b) dense VI: ``ps.BayesianNetwork(lenet5, prior=ps.priors.Gaussian(1.0), dataset_size=N)`` with
    a ``ps.MeanField`` guide (σ starts at ``--init-scale``), trained by ``ps.fit`` with KL weight 1
    (the plain ELBO, no warm-up), evaluated by ``ps.evaluate`` with 32 posterior samples.

Both networks start from the same initial weights (one seeded ``lenet5()``, copied) and see the
same number of epochs at batch 128. Reports accuracy, NLL, ECE, Brier, the VI's mean single-sample
accuracy and the training seconds of each, plus the accuracy gap (VI − det, in points) and the ECE
difference (VI − det), and checks the target: VI accuracy within 1 point of det, with lower ECE.

VI learning rate: 1e-3 (default ``--vi-lr``), chosen on a validation split, never the test split:
ps.fit on 50,000 training examples, scored (16 samples) on the other 10,000, seed 0, init_scale
1e-3. The deterministic net there (10 epochs): 90.17 %, NLL 0.268, ECE 0.0149.

    VI lr  epochs  val acc  NLL    ECE     final KL (nats)  median σ
    1e-3   3       87.20 %  0.342  0.0100  3.3e5            0.003
    3e-3   3       88.94 %  0.297  0.0130  2.2e5            0.033
    1e-3   10      89.30 %  0.286  0.0081  1.75e5           0.047
    2e-3   10      89.32 %  0.300  0.0294  4.6e4            0.46
    3e-3   10      88.25 %  0.310  0.0101  2.4e4            0.80

The 3-epoch check favours 3e-3, but over the real 10 epochs 1e-3 is best on accuracy, NLL and
ECE. Why: Adam moves ρ (σ = softplus(ρ)) by about lr per step, so the KL term needs roughly
4,000 steps at 1e-3 to grow σ from 1e-3 to ~0.05, and many more to reach the ELBO's optimum,
where most σ approach the prior's 1.0 (3e-3 gets there within 10 epochs: training NLL rises from
0.29 to 0.34 while the KL falls, and accuracy drops). So the 1e-3 result is a mean-field posterior
that has NOT converged (σ still ≈ 0.05 everywhere, its ELBO far worse than at 3e-3); it is what
dense VI gives in this epoch budget, not the ELBO optimum. init_scale 1e-2 (lr 1e-3: 89.22 %, ECE
0.030; lr 3e-3: 88.63 %, ECE 0.020) and 5e-2 (lr 3e-3: 87.88 %, ECE 0.008) did not do better.

Timings share the machine with other work and are indicative only; a few untimed warm-up steps
on a throwaway network run first so that neither method pays the one-off kernel set-up.

    .venv/bin/python benchmarks/fashion_vi.py [--epochs 10] [--seed 0] [--data-root ../shared/data]
        [--vi-lr 1e-3] [--init-scale 1e-3] [--train-limit N] [--out benchmarks/results/fashion_vi.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from torch import nn

import pyro_sparse as ps
from pyro_sparse.infer.svi import make_adam

REPO_ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZE = 128
DET_LR = 1e-3
NUM_SAMPLES = 32


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)


def warm_up(x: torch.Tensor, y: torch.Tensor, steps: int = 10) -> None:
    """A few untimed steps of a throwaway lenet5 (first calls set up the CPU kernels)."""
    net = ps.nets.lenet5()
    optimizer = make_adam(list(net.parameters()), DET_LR)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(net(x[:BATCH_SIZE]), y[:BATCH_SIZE])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def train_deterministic(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> float:
    """Adam on cross-entropy, reshuffled every epoch; returns the training seconds."""
    optimizer = make_adam(list(net.parameters()), DET_LR)
    shuffle = torch.Generator().manual_seed(seed)
    n, steps = len(x), math.ceil(len(x) / BATCH_SIZE)
    net.train()
    seconds = 0.0
    for epoch in range(epochs):
        started = time.perf_counter()
        order = torch.randperm(n, generator=shuffle)
        total = torch.zeros(())
        for step in range(steps):
            index = order[step * BATCH_SIZE : (step + 1) * BATCH_SIZE]
            loss = nn.functional.cross_entropy(net(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(index)
        seconds += time.perf_counter() - started
        print(f"  det epoch {epoch + 1}/{epochs}: cross-entropy {float(total) / n:.4f} ({seconds:.1f} s)")
    return seconds


@torch.no_grad()
def evaluate_deterministic(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    net.eval()
    probs = torch.cat([net(x[i : i + 1024]).softmax(-1) for i in range(0, len(x), 1024)])
    return ps.metrics.classification_metrics(probs.unsqueeze(0), y)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default="../shared/data",
                        help="data folder; a relative path is taken from the repository root")
    parser.add_argument("--vi-lr", type=float, default=1e-3, help="Adam learning rate of the VI fit")
    parser.add_argument("--init-scale", type=float, default=1e-3, help="initial σ of the MeanField guide")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="train on a random subset of this size (quick checks)")
    parser.add_argument("--out", default="benchmarks/results/fashion_vi.json")
    args = parser.parse_args()

    root = Path(args.data_root).expanduser()
    root = root if root.is_absolute() else REPO_ROOT / root
    ds = ps.data.load("fashion-mnist", root=root)
    if args.train_limit is not None:
        ds = ds.subsample(train=args.train_limit, seed=args.seed)
    x_train, y_train = ds.train.tensors
    x_test, y_test = ds.test.tensors
    n_train = len(x_train)
    print(f"Fashion-MNIST: {n_train} train / {len(x_test)} test, lenet5, {args.epochs} epochs, "
          f"batch {BATCH_SIZE}, seed {args.seed}, {torch.get_num_threads()} threads")

    warm_up(x_train, y_train)
    seed_everything(args.seed)
    initial = ps.nets.lenet5()  # both networks start from these weights

    # (a) deterministic
    seed_everything(args.seed)
    net = copy.deepcopy(initial)
    det_seconds = train_deterministic(net, x_train, y_train, args.epochs, args.seed)
    det = evaluate_deterministic(net, x_test, y_test)
    det["train_seconds"] = det_seconds

    # (b) dense mean-field VI
    seed_everything(args.seed)
    pyro.clear_param_store()
    model = ps.BayesianNetwork(copy.deepcopy(initial), prior=ps.priors.Gaussian(1.0), dataset_size=n_train)
    guide = ps.MeanField(model, init_scale=args.init_scale)
    history = ps.fit(model, guide, ds.train, epochs=args.epochs, batch_size=BATCH_SIZE, lr=args.vi_lr,
                     seed=args.seed, progress=False)
    for record in history:
        print(f"  VI  epoch {record['epoch']}/{args.epochs}: -ELBO/N {record['loss']:.4f}, "
              f"nll {record['nll']:.4f}, KL {record['kl']:.4g} ({record['seconds']:.1f} s)")
    seed_everything(args.seed)
    vi = ps.evaluate(model, guide, ds.test, num_samples=NUM_SAMPLES)
    vi["train_seconds"] = history[-1]["seconds"]
    vi["final_kl"] = history[-1]["kl"]

    gap_points = 100.0 * (vi["accuracy"] - det["accuracy"])
    ece_diff = vi["ece"] - det["ece"]
    within_1pt = gap_points >= -1.0
    lower_ece = ece_diff < 0
    comparison = {"accuracy_gap_points": gap_points, "ece_difference": ece_diff,
                  "vi_within_1_point": within_1pt, "vi_lower_ece": lower_ece,
                  "target_met": within_1pt and lower_ece}

    print()
    print(f"{'':<22} {'accuracy':>9} {'NLL':>8} {'ECE':>8} {'Brier':>8} {'1-sample acc':>13} {'train s':>8}")
    for label, r in (("(a) deterministic", det), ("(b) dense MF-VI", vi)):
        single = r.get("mean_sample_accuracy") if r is vi else None
        single_text = f"{100 * single:>12.2f}%" if single is not None else f"{'-':>13}"
        print(f"{label:<22} {100 * r['accuracy']:>8.2f}% {r['nll']:>8.4f} {r['ece']:>8.4f} "
              f"{r['brier']:>8.4f} {single_text} {r['train_seconds']:>8.1f}")
    print(f"accuracy gap (VI - det): {gap_points:+.2f} points; ECE difference (VI - det): {ece_diff:+.4f}")
    print(f"target (VI within 1 point, lower ECE): {'met' if comparison['target_met'] else 'NOT met'} "
          f"(within 1 point: {within_1pt}, lower ECE: {lower_ece})")

    out = Path(args.out)
    out = out if out.is_absolute() else REPO_ROOT / out
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"dataset": "fashion-mnist", "net": "lenet5", "train_examples": n_train,
            "test_examples": len(x_test),
            "epochs": args.epochs, "batch_size": BATCH_SIZE, "seed": args.seed, "det_lr": DET_LR,
            "vi_lr": args.vi_lr, "init_scale": args.init_scale, "prior": "Gaussian(1.0)", "kl_weight": 1.0,
            "num_samples": NUM_SAMPLES, "torch": torch.__version__, "threads": torch.get_num_threads()}
    results = {"deterministic": det, "mean_field_vi": vi, "comparison": comparison,
               "vi_history": list(history)}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
