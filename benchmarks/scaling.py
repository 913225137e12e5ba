"""Data-parallel scaling of ``ps.fit`` under ``torchrun`` (after BPrune's performance analysis).

For 1 and 2 processes (more with ``--processes``), dense mean-field VI and SSVI at density 0.1 train an
MLP 784-400-400-10 on generated MNIST-shaped data (4,096 examples, 10 classes; per-process batch 128, so the
global batch grows with the processes: weak scaling) for ``--epochs`` epochs, 1 thread per process. Measured:
examples per second (from the run's own ``seconds``), parallel efficiency (examples/s per process relative
to 1 process), and the bytes each process puts into the gradient all-reduce per step (``fit``'s history,
``allreduce_bytes_per_step``). Then a model of the efficiency at 8–64 nodes:

    t_step(K) = t_compute + t_allreduce(K),   t_allreduce(K) = 2 (K − 1) / K · bytes / bandwidth + 2 (K − 1) · latency

(ring all-reduce), with t_compute the measured 1-process step time and the stated bandwidth and latency.
Prints the tables and writes JSON.

    .venv/bin/python benchmarks/scaling.py [--processes 1 2] [--epochs 2] [--out benchmarks/results/scaling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

METHODS = {"dense VI": "vi", "SSVI 0.1": "ssvi"}
NETWORKS = [(10e9 / 8, "10 Gb/s Ethernet", 20e-6), (100e9 / 8, "100 Gb/s InfiniBand", 2e-6)]


def worker(method: str, epochs: int, out: Path) -> None:
    """One process of a run (under torchrun): fit, then process 0 writes what it measured."""
    import torch

    import pyro_sparse as ps

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 784, generator=generator)
    y = (x[:, :10].argmax(-1) + (x[:, 10] > 0).long()) % 10
    torch.manual_seed(0)
    model = ps.BayesianNetwork(ps.nets.mlp(784, (400, 400), 10), dataset_size=len(x))
    guide = ps.MeanField(model) if method == "vi" else ps.SparseSubspace(model, density=0.1, dense_layers=())
    history = ps.fit(model, guide, (x, y), epochs=epochs, batch_size=128, seed=0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if int(os.environ.get("RANK", "0")) == 0:
        steps = len(history) * -(-len(x) // (128 * world))
        out.write_text(json.dumps({"seconds": history[-1]["seconds"], "examples": len(x) * len(history),
                                   "steps": steps, "bytes": history[-1].get("allreduce_bytes_per_step", 0),
                                   "gradient_bytes": 4 * sum(p.numel() for p in guide.parameters()) +
                                   4 * sum(p.numel() for p in model.parameters())}))


def measure(method: str, processes: int, epochs: int, out: Path) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] \
        if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, __file__, "--worker", method, "--epochs", str(epochs), "--result", str(out)],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scaling.json"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.epochs, args.result)
        return
    rows = []
    scratch = args.out.with_suffix(".part")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for label, method in METHODS.items():
        for processes in args.processes:
            run = measure(method, processes, args.epochs, scratch)
            rows.append({"method": label, "processes": processes, **run,
                         "examples_per_second": run["examples"] / run["seconds"],
                         "step_ms": 1000 * run["seconds"] / run["steps"]})
    scratch.unlink(missing_ok=True)
    print("| method | processes | examples/s | per process | efficiency | step ms | all-reduce bytes/step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        single = next(r for r in rows if r["method"] == row["method"] and r["processes"] == 1)
        row["efficiency"] = row["examples_per_second"] / row["processes"] / single["examples_per_second"]
        print(f"| {row['method']} | {row['processes']} | {row['examples_per_second']:.0f} | "
              f"{row['examples_per_second'] / row['processes']:.0f} | {row['efficiency']:.2f} | {row['step_ms']:.1f} | "
              f"{row['bytes']:,} |")
    dense = next(r for r in rows if r["method"] == "dense VI" and r["processes"] > 1)
    sparse = next(r for r in rows if r["method"] == "SSVI 0.1" and r["processes"] > 1)
    print(f"\nSSVI 0.1 / dense VI all-reduce bytes: {sparse['bytes'] / dense['bytes']:.3f}")
    print("\nModelled efficiency at K nodes (ring all-reduce; t_compute = the measured 1-process step):")
    print("| method | network | " + " | ".join(f"K={k}" for k in (8, 16, 32, 64)) + " |")
    print("|---|---|" + "---:|" * 4)
    model = []
    for label in METHODS:
        single = next(r for r in rows if r["method"] == label and r["processes"] == 1)
        many = next(r for r in rows if r["method"] == label and r["processes"] > 1)
        compute = single["step_ms"] / 1000
        for bandwidth, name, latency in NETWORKS:
            efficiency = {}
            for k in (8, 16, 32, 64):
                comm = 2 * (k - 1) / k * many["bytes"] / bandwidth + 2 * (k - 1) * latency
                efficiency[k] = compute / (compute + comm)
            model.append({"method": label, "network": name, **{f"K={k}": v for k, v in efficiency.items()}})
            print(f"| {label} | {name} | " + " | ".join(f"{v:.2f}" for v in efficiency.values()) + " |")
    args.out.write_text(json.dumps({"measured": rows, "model": model}, indent=1))


if __name__ == "__main__":
    main()
