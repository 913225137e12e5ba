"""Exported posterior-mean networks, dense against sparse: speed, size and equality of logits.

Trains mlp 784-400-400-10 with dense mean-field VI on Fashion-MNIST, prunes copies of the guide to
80, 90 and 95 % sparsity by SNR (one global threshold), exports each with ``ps.sparse.export`` as a dense
network (``layout="dense"``) and in sparse form (``layout="auto"``: CSR Linear layers, each with the
gather kernel from the batch size where it was timed faster than dense), then, side by side in one
run (rounds interleaved, median):

- milliseconds per forward pass at batch 1 and batch 1024 (CPU, no grad);
- the largest |logit difference| between the two exports and the Bayesian model's posterior mean;
- bytes on disk: ``torch.save(state_dict)`` and the ``torch.export`` program (``ps.sparse.save``).

    .venv/bin/python benchmarks/inference_speed.py [--epochs 3] [--data-root ../shared/data]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import pyro_sparse as ps
from pyro_sparse.sparse import SparseLinear, export, save


def forward_ms(net: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        net(x)
        return (time.perf_counter() - start) * 1e3


def state_dict_bytes(net: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    return buffer.tell()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "inference_speed.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    data = ps.data.load("fashion-mnist", root=args.data_root)
    model = ps.BayesianNetwork(ps.nets.mlp(784, (400, 400), 10), dataset_size=len(data.train))
    trained = ps.guides.SNRPruned(model)
    ps.fit(model, trained, data.train, epochs=args.epochs, lr=1e-3, batch_size=128, seed=0)
    x_test, y_test = data.test.tensors
    batches = {1: x_test[:1], 1024: x_test[:1024]}

    rows = []
    for sparsity in args.sparsities:
        guide = copy.deepcopy(trained)
        guide.prune(sparsity=sparsity, scope="global")
        with torch.no_grad():
            reference = model.apply(x_test[:1024], guide.mean_weights())
        nets = {layout: export(model, guide, layout=layout) for layout in ("dense", "auto")}
        kernels = [str(m.gather_min_batch) for m in nets["auto"].modules() if isinstance(m, SparseLinear)]
        times = {(layout, b): [] for layout in nets for b in batches}
        for _ in range(args.rounds):
            for (layout, b), samples in times.items():
                samples.append(forward_ms(nets[layout], batches[b]))
        median = {key: statistics.median(samples) for key, samples in times.items()}
        with tempfile.TemporaryDirectory() as folder:
            program = {layout: save(net, Path(folder) / f"{layout}.pt2", x_test[:2]) for layout, net in nets.items()}
        with torch.no_grad():
            differences = {layout: float((net(x_test[:1024]) - reference).abs().max()) for layout, net in nets.items()}
            accuracy = float((nets["auto"](x_test).argmax(-1) == y_test).float().mean())
        row = {
            "sparsity": guide.sparsity, "accuracy_sparse_export": accuracy, "kernels": kernels,
            "dense_ms_b1": median[("dense", 1)], "sparse_ms_b1": median[("auto", 1)],
            "dense_ms_b1024": median[("dense", 1024)], "sparse_ms_b1024": median[("auto", 1024)],
            "max_abs_logit_diff_dense": differences["dense"], "max_abs_logit_diff_sparse": differences["auto"],
            "state_dict_bytes_dense": state_dict_bytes(nets["dense"]),
            "state_dict_bytes_sparse": state_dict_bytes(nets["auto"]),
            "program_bytes_dense": program["dense"], "program_bytes_sparse": program["auto"],
        }
        row["speedup_b1"] = row["dense_ms_b1"] / row["sparse_ms_b1"]
        row["speedup_b1024"] = row["dense_ms_b1024"] / row["sparse_ms_b1024"]
        row["size_ratio_state_dict"] = row["state_dict_bytes_dense"] / row["state_dict_bytes_sparse"]
        row["size_ratio_program"] = row["program_bytes_dense"] / row["program_bytes_sparse"]
        rows.append(row)

    print(f"mlp 784-400-400-10, Fashion-MNIST, {args.epochs} epochs dense VI, SNR-pruned (global); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} rounds\n")
    print("| sparsity | gather from batch (per layer) | ms b=1 dense | ms b=1 sparse | ms b=1024 dense "
          "| ms b=1024 sparse | speed-up b=1024 | max \\|Δlogit\\| | weights on disk dense → sparse "
          "| .pt2 dense → sparse | accuracy |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['sparsity']:.0%} | {'/'.join(r['kernels'])} | {r['dense_ms_b1']:.3f} | {r['sparse_ms_b1']:.3f} "
              f"| {r['dense_ms_b1024']:.2f} | {r['sparse_ms_b1024']:.2f} | {r['speedup_b1024']:.2f}× "
              f"| {max(r['max_abs_logit_diff_dense'], r['max_abs_logit_diff_sparse']):.1e} "
              f"| {r['state_dict_bytes_dense'] / 1e3:.0f} → {r['state_dict_bytes_sparse'] / 1e3:.0f} kB "
              f"({r['size_ratio_state_dict']:.1f}×) "
              f"| {r['program_bytes_dense'] / 1e3:.0f} → {r['program_bytes_sparse'] / 1e3:.0f} kB "
              f"({r['size_ratio_program']:.1f}×) | {r['accuracy_sparse_export']:.4f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "epochs": args.epochs, "rounds": args.rounds,
                                          "threads": torch.get_num_threads()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
