"""Weight- against unit-level sparsity on Fashion-MNIST: accuracy, calibration and measured inference speed.

Every row is one ``pyro-sparse train`` run with the CLI's defaults (what a user gets) except ``--epochs``,
``--batch-size 128`` and ``--hidden 400 400`` for the mlp (784-400-400-10), on the full Fashion-MNIST
training split (60,000 images), evaluated on its test split (10,000). The speed-ups are the run's own
``metrics.json`` figures: the exported
posterior-mean network (``ps.sparse.export``: removed units cut out, CSR where weights are pruned inside
the kept units) against the dense network with the same weights, one forward pass each at batch 1 and
batch 1024, timed side by side at the end of the run (``ps.sparse.speedups``: interleaved rounds,
ratio of medians). Acceptance (issue 14): a unit-level posterior whose export is ≥ 2× faster than the
dense one at batch 1024 and ≥ 1.5× at batch 1, accuracy within 1 point of dense VI, ECE ≤ dense VI's
+ 0.01, for mlp 784-400-400-10 and lenet5.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/structured.py [--nets mlp lenet5] [--epochs 10]
        [--runs vi snr-weight snr-unit ...] [--data-root ../shared/data] [--jobs 2]

``--remeasure`` times every export again after all runs are trained, one after the other in one process
(the runs' own figures were timed while other runs trained beside them). Runs are cached in
``runs/structured/<net>/<run>`` (a finished run is not retrained; delete the folder
to retrain); the table goes to stdout and ``benchmarks/results/structured.json``.

``--part scores`` compares the two unit scores of ``SNRPruned.prune(structure="unit")`` on the dense-VI
run's posterior (run the main part first): "energy" √(Σμ²/Σσ²) and "mean_snr" (mean |μ|/σ) over each
unit's incoming weights, with one threshold for all layers, and "energy" with the same fraction per layer,
pruning 50, 75 and 90 % of the hidden units: accuracy before and after one epoch of fine-tuning and the
export's speed-ups (``benchmarks/results/structured_scores.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# name -> (label, extra CLI arguments)
RUNS: dict[str, tuple[str, list[str]]] = {
    "vi": ("dense VI", ["--method", "vi"]),
    "snr-weight": ("SNR, weights", ["--method", "snr", "--structure", "weight"]),
    "snr-unit": ("SNR, units", ["--method", "snr", "--structure", "unit"]),
    "ssvi-weight": ("SSVI, weights", ["--method", "ssvi", "--structure", "weight"]),
    "ssvi-unit": ("SSVI, units", ["--method", "ssvi", "--structure", "unit"]),
    "em-weight": ("EM-SGHMC, weights", ["--method", "em-sghmc", "--structure", "weight"]),
    "em-unit": ("EM-SGHMC, units", ["--method", "em-sghmc", "--structure", "unit"]),
    "horseshoe-unit": ("horseshoe, units", ["--method", "snr", "--prior", "horseshoe", "--structure", "unit"]),
}
COLUMNS = ("accuracy", "ece", "nll", "sparsity", "units_active", "units_total", "export_speedup_batch_1",
           "export_speedup_batch_1024", "export_bytes", "dense_export_bytes", "train_seconds")


def train(net: str, run: str, epochs: int, data_root: str, root: Path) -> dict:
    """One CLI run (or its cached result): its metrics.json as a dict."""
    out = root / net / run
    metrics = out / "metrics.json"
    if metrics.is_file():
        return json.loads(metrics.read_text())
    command = [sys.executable, "-m", "pyro_sparse.cli", "train", "--net", net, "--data", "fashion-mnist",
               "--data-root", data_root, "--epochs", str(epochs), "--batch-size", "128", "--out", str(out),
               "--overwrite", *(["--hidden", "400", "400"] if net == "mlp" else []), *RUNS[run][1]]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return json.loads(metrics.read_text())


def row(net: str, run: str, record: dict, dense: dict | None) -> dict:
    values = {"net": net, "run": RUNS[run][0], **{key: record.get(key) for key in COLUMNS}}
    if dense is not None:
        values["accuracy_gap_points"] = 100 * (record["accuracy"] - dense["accuracy"])
        values["ece_excess"] = record["ece"] - dense["ece"]
        values["meets_target"] = bool(
            record.get("units_active", 0) < record.get("units_total", 0)
            and record["export_speedup_batch_1024"] >= 2.0 and record["export_speedup_batch_1"] >= 1.5
            and values["accuracy_gap_points"] >= -1.0 and values["ece_excess"] <= 0.01
        )
    return values


def format_row(values: dict) -> str:
    def number(key: str, spec: str) -> str:
        value = values.get(key)
        return "—" if value is None else format(value, spec)

    units = f"{values['units_active']}/{values['units_total']}" if values.get("units_total") else "—"
    return (f"| {values['net']} | {values['run']} | {number('accuracy', '.4f')} | "
            f"{number('accuracy_gap_points', '+.2f')} | {number('ece', '.4f')} | {number('sparsity', '.3f')} | "
            f"{units} | "
            f"{number('export_speedup_batch_1', '.2f')} | {number('export_speedup_batch_1024', '.2f')} | "
            f"{values['export_bytes'] / 1e3:.0f} / {values['dense_export_bytes'] / 1e3:.0f} | "
            f"{number('train_seconds', '.0f')} | {'yes' if values.get('meets_target') else 'no'} |")


def compare_scores(net: str, root: Path, data_root: str) -> list[dict]:
    """``--part scores``: see the module docstring."""
    import copy

    import torch

    import pyro_sparse as ps
    from pyro_sparse import checkpoint, cli

    folder = root / net / "vi"
    saved = checkpoint.load(folder / "checkpoint.pt")
    config = {**cli.parser_defaults(str(folder)), **cli.stored_options(saved, folder / "checkpoint.pt"),
              "data_root": data_root}
    dataset = ps.data.load("fashion-mnist", root=data_root)
    model = cli.build_model(config, dataset)
    model.load_state_dict(saved["model"])
    dense = ps.guides.SNRPruned(model)
    dense.load_state_dict(saved["guide"])
    rows = []
    x = dataset.test.tensors[0][:256]
    settings = [(score, "global") for score in ps.guides.snr.UNIT_SCORES] + [("energy", "layer")]
    for sparsity in (0.5, 0.75, 0.9):
        for score, scope in settings:
            pruned_model = copy.deepcopy(model)
            guide = ps.guides.SNRPruned(pruned_model)
            guide.load_state_dict(dense.state_dict())
            guide.prune(sparsity=sparsity, structure="unit", unit_score=score, scope=scope)
            torch.manual_seed(0)
            before = ps.evaluate(pruned_model, guide, dataset.test, num_samples=16)
            ps.fit(pruned_model, guide, dataset.train, epochs=1, batch_size=128, seed=0, progress=False)
            torch.manual_seed(0)
            after = ps.evaluate(pruned_model, guide, dataset.test, num_samples=16)
            kept = {name: int(mask.sum()) for name, mask in guide.unit_masks().items()}
            speed = ps.sparse.speedups(pruned_model, guide, x)
            rows.append({"net": net, "unit_sparsity": sparsity, "score": score, "scope": scope, "units_kept": kept,
                         "accuracy_pruned": before["accuracy"], "accuracy_finetuned": after["accuracy"],
                         "ece_finetuned": after["ece"], "speedup_batch_1": speed[1], "speedup_batch_1024": speed[1024]})
            print(f"| {net} | {sparsity:.0%} | {score} | {scope} | {kept} | {before['accuracy']:.4f} | "
                  f"{after['accuracy']:.4f} | {after['ece']:.4f} | {speed[1]:.2f} | {speed[1024]:.2f} |", flush=True)
    return rows


def remeasure(jobs: list[tuple[str, str]], root: Path, data_root: str) -> dict[tuple[str, str], dict[int, float]]:
    """The speed-ups of every run's export again, one run after the other in this process (the runs' own
    figures were timed while other runs trained beside them): batch size -> dense time / export time."""
    import torch

    from pyro_sparse import checkpoint, cli, sparse

    dataset = None
    results = {}
    for net, run in jobs:
        folder = root / net / run
        saved = checkpoint.load(folder / "checkpoint.pt")
        config = {**cli.parser_defaults(str(folder)), **cli.stored_options(saved, folder / "checkpoint.pt"),
                  "data_root": data_root}
        method = cli.check_config(config)
        dataset = dataset or cli.load_dataset(config)
        model = cli.build_model(config, dataset)
        posterior = method.restore(config, model, saved)
        torch.manual_seed(0)
        results[net, run] = sparse.speedups(model, posterior, dataset.test.tensors[0][:256], (1, 1024),
                                            seconds=1.0)
        print(f"{net} {run}: {results[net, run]}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("table", "scores"), default="table")
    parser.add_argument("--remeasure", action="store_true",
                        help="time every export again, one after the other, after all runs are trained")
    parser.add_argument("--nets", nargs="+", default=["mlp", "lenet5"])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--data-root", default=str(REPO_ROOT.parent / "shared" / "data"))
    parser.add_argument("--root", default=str(REPO_ROOT / "runs" / "structured"))
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (each on one thread)")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "structured.json"))
    args = parser.parse_args()
    if args.part == "scores":
        print("| net | units removed | score | scope | units kept | accuracy pruned | after 1 epoch fine-tuning | "
              "ECE | speed-up batch 1 | speed-up batch 1024 |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        rows = [row for net in args.nets for row in compare_scores(net, Path(args.root), args.data_root)]
        Path(args.out).with_name("structured_scores.json").write_text(json.dumps(rows, indent=2) + "\n")
        return
    runs = ["vi", *[run for run in args.runs if run != "vi"]]
    jobs = [(net, run) for net in args.nets for run in runs]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        records = dict(zip(jobs, pool.map(lambda job: train(*job, args.epochs, args.data_root, Path(args.root)),
                                          jobs), strict=True))
    if args.remeasure:
        for job, ratios in remeasure(jobs, Path(args.root), args.data_root).items():
            records[job] = {**records[job], **{f"export_speedup_batch_{size}": value for size, value in ratios.items()}}
    rows = [row(net, run, records[net, run], None if run == "vi" else records[net, "vi"]) for net, run in jobs]
    print("| net | run | accuracy | Δ vs dense VI (points) | ECE | weight sparsity | units active | "
          "speed-up batch 1 | speed-up batch 1024 | export / dense kB | train s | target met |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for values in rows:
        print(format_row(values))
    Path(args.out).write_text(json.dumps({"epochs": args.epochs, "remeasured": args.remeasure, "rows": rows},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
