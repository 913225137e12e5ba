"""Issue 12's sparse-regression acceptance on several data sets: a plain Pyro model, n = 200, p = 100, 10 true
inputs (coefficients ±1 to ±2, noise 0.5), one fresh data set per seed.

- SNRPruned under ``pyro.infer.SVI`` (Trace_ELBO, Adam 0.03, 600 full-batch steps), pruned to 90 %: does it
  keep exactly the 10 true inputs?
- EM-SGHMC (``ps.em_sghmc``, defaults but for 500 epochs of 4 minibatches of 50, no pruning ramp) on the same
  model with the coefficients drawn from a ``ps.priors.SpikeAndSlab(1.0, 0.05, 0.5)`` object: are the inclusion
  probabilities above 0.5 exactly on the true inputs? Also the smallest on a true input, the largest on a
  null input, the learned π, the posterior mean of the noise, and the held-out RMSE of the posterior.

Prints a table and writes JSON.

    .venv/bin/python benchmarks/pyro_models.py [--seeds 0 1 2 3 4] [--out benchmarks/results/pyro_models.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO

import pyro_sparse as ps


def sparse_regression(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 100, generator=generator)
    beta = torch.zeros(100)
    beta[:10] = torch.linspace(1.0, 2.0, 10) * torch.tensor([1.0, -1.0] * 5)
    return x, x @ beta + 0.5 * torch.randn(n, generator=generator), beta


def gaussian_model(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    noise = pyro.sample("noise", dist.HalfNormal(2.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(x @ w, noise), obs=y)


def spike_and_slab_model(prior: ps.priors.SpikeAndSlab):
    def model(x, y=None):
        w = pyro.sample("w", prior.distribution((x.shape[-1],)))
        noise = pyro.sample("noise", dist.HalfNormal(2.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(x @ w, noise), obs=y)

    return model


def one_seed(seed: int) -> dict[str, float | bool]:
    x, y, beta = sparse_regression(200, seed)
    x_test, y_test, _ = sparse_regression(1000, 1000 + seed)
    y_test = x_test @ beta + 0.5 * torch.randn(1000, generator=torch.Generator().manual_seed(seed))
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = ps.SNRPruned(gaussian_model)
    svi = SVI(gaussian_model, guide, pyro.optim.Adam({"lr": 0.03}), Trace_ELBO())
    for _ in range(600):
        svi.step(x, y)
    guide.prune(sparsity=0.9)
    snr_exact = torch.equal(guide.masks()["w"], beta != 0)

    prior = ps.priors.SpikeAndSlab(slab_scale=1.0, spike_scale=0.05, inclusion=0.5)
    model = spike_and_slab_model(prior)
    started = time.perf_counter()
    result = ps.em_sghmc(model, (x, y), target_sparsity=0.0, chains=2, samples=50, epochs=500, batch_size=50,
                         seed=seed, progress=False)
    seconds = time.perf_counter() - started
    inclusion = result.inclusion_probability["w"]
    metrics = ps.evaluate(model, result.posterior, (x_test, y_test))
    return {"seed": seed, "snr_keeps_exactly_true": snr_exact,
            "em_includes_exactly_true": torch.equal(inclusion > 0.5, beta != 0),
            "em_min_true": float(inclusion[beta != 0].min()), "em_max_null": float(inclusion[beta == 0].max()),
            "em_pi": float(prior.inclusion), "em_noise": float(result.posterior.samples["noise"].mean()),
            "em_test_rmse": metrics["rmse"], "em_coverage_95": metrics["coverage_95"], "em_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pyro_models.json"))
    args = parser.parse_args()
    rows = [one_seed(seed) for seed in args.seeds]
    header = ("seed", "SNR 90 %: exactly true", "EM: >0.5 exactly true", "EM min true", "EM max null", "π",
              "noise", "test RMSE", "cover 95", "EM s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print(f"| {row['seed']} | {row['snr_keeps_exactly_true']} | {row['em_includes_exactly_true']} | "
              f"{row['em_min_true']:.3f} | {row['em_max_null']:.3f} | {row['em_pi']:.3f} | {row['em_noise']:.3f} | "
              f"{row['em_test_rmse']:.3f} | {row['em_coverage_95']:.3f} | {row['em_seconds']:.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
