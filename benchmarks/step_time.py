"""Milliseconds per training step, side by side in one run (batch 128, CPU by default; ``--device cuda``
for a GPU, every step timed by ``timing.timed``, which waits for the device before and after it):

(a) plain PyTorch: the deterministic network, cross-entropy, Adam;
(b) pyro-sparse: the MeanField guide's fused ELBO step (closed-form KL, local reparameterization
    for Linear layers, the default);
(b') the same with one weight draw per batch in every layer (``local_reparameterization="none"``);
(b'') (b) with the spike-and-slab prior instead of the Gaussian one;
(c) Pyro: the same BayesianNetwork with ``SVI(model, AutoNormal(model), Adam, TraceMeanField_ELBO())``;
(d) ``ps.fit``'s step on the same network written in Pyro's BNN idiom (``PyroModule`` layers with
    ``PyroSample`` N(0, 1) weights, a ``pyro.plate`` Categorical likelihood), the same MeanField guide
    traced from it: the ELBO from Pyro traces (``infer.pyro_elbo``), as ``fit`` runs a model it does not
    recognise;
(e) ``ps.fit``'s step on the same idiom, the fused fast path ``fit`` takes for it (``infer.pyromodule_elbo``:
    closed-form KL, local reparameterization for Linear layers, the likelihood from the model's own site).

Width sweep (issue 13): mlp 784-W-W-10 for W in ``--widths``, (a) and (b) side by side, and

(f) the floor of any exact dense-VI step with local reparameterization: the two products per Linear layer
    (x·μ and x²·σ²) and Adam over two tensors per weight (μ and a log-variance, σ² = exp of it: one pass
    per weight), no softplus, no KL: what (b) would cost if its per-weight elementwise work were free.

Steps of all variants are interleaved in rounds so machine noise hits them alike; the median over
rounds is reported. Prints tables with the ratios (b)/(a), (c)/(b), (d)/(b), (e)/(b), (f)/(a) and writes JSON.

    .venv/bin/python benchmarks/step_time.py [--steps 60] [--widths 128,400,1024,2048] [--sweep-steps 20]
                                             [--device cpu|cuda] [--out benchmarks/results/step_time.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import pyro
import pyro.distributions as dist
import pyro.optim
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_value
from pyro.nn import PyroModule, PyroSample
from pyro.nn.module import to_pyro_module_
from timing import timed
from torch import nn

import pyro_sparse as ps
from pyro_sparse.infer.elbo import negative_elbo
from pyro_sparse.infer.pyro_elbo import traced_negative_elbo
from pyro_sparse.infer.pyromodule_elbo import fused_objective
from pyro_sparse.infer.svi import make_adam, parameter_groups

NETS = {
    "mlp 784-400-400-10": lambda: ps.nets.mlp(784, (400, 400), 10),
    "lenet5": lambda: ps.nets.lenet5(1, 10, 28),
}


class PyroIdiom(PyroModule):
    """A network in Pyro's BNN idiom: its Linear / Conv weights ``PyroSample`` N(0, 1), a Categorical likelihood.

    The prior's parameters are made on ``device``: ``module.to(device)`` does not move a ``PyroSample``'s
    distribution, and N(0.0, 1.0).expand(shape) would hold CPU tensors of the weight's shape."""

    def __init__(self, net: nn.Module, device: torch.device):
        super().__init__()
        to_pyro_module_(net)
        zero, one = torch.zeros((), device=device), torch.ones((), device=device)
        for layer in net.modules():
            if isinstance(layer, nn.Linear | nn.Conv2d):
                prior = dist.Normal(zero, one).expand(layer.weight.shape).to_event(layer.weight.dim())
                layer.weight = PyroSample(prior)
        self.body = net

    def forward(self, x, y=None):
        logits = self.body(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


def idiom_and_guide(name: str, x: torch.Tensor, y: torch.Tensor,
                    device: torch.device) -> tuple[PyroIdiom, ps.MeanField]:
    """Pyro's idiom of network ``name`` and its MeanField guide, whose means start at the network's own
    initial weights, as a BayesianNetwork's guide does (``init_to_median`` of N(0, 1) draws would start the
    784-400-400-10 mlp with logits in the hundreds, whose saturated softmax makes denormal gradients that
    slow every product several-fold: a different step, not a comparable one)."""
    net = NETS[name]()
    initial = {f"body.{path}": param.detach().to(device, copy=True) for path, param in net.named_parameters()
               if path.endswith("weight") and param.dim() > 1}
    idiom = PyroIdiom(net, device).to(device)
    guide = ps.MeanField(idiom, init_loc_fn=init_to_value(values=initial))
    guide.setup(x, y)
    return idiom, guide.to(device)


def idiom_step(model, guide, optimizer, x, y, dataset_size):
    terms = traced_negative_elbo(model, guide, x, y, dataset_size)
    optimizer.zero_grad(set_to_none=True)
    terms.loss.backward()
    optimizer.step()


def fused_idiom_step(objective, model, guide, optimizer, x, y):
    terms = objective(model, guide, x, y)
    optimizer.zero_grad(set_to_none=True)
    terms.loss.backward()
    optimizer.step()


def plain_step(net, optimizer, x, y):
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    optimizer.step()


def ours_step(model, guide, optimizer, x, y):
    terms = negative_elbo(model, guide, x, y)
    optimizer.zero_grad(set_to_none=True)
    terms.loss.backward()
    optimizer.step()


def floor_step(model, moments, optimizer, x, y):
    """(f): the network's output with local reparameterization from the (μ, log σ²) leaves in ``moments``."""
    optimizer.zero_grad(set_to_none=True)
    output = model.apply(x, None, {name: (loc, log_var.exp()) for name, (loc, log_var) in moments.items()})
    (-model.likelihood.log_prob(output, y).mean()).backward()
    optimizer.step()


def floor_model(make_net, dataset_size: int, device: torch.device):
    """A BayesianNetwork of ``make_net()`` with (μ, log σ²) leaves per site for ``floor_step``, an Adam over them."""
    model = ps.BayesianNetwork(make_net(), dataset_size=dataset_size).to(device)
    guide = ps.MeanField(model).to(device)
    with torch.no_grad():
        moments = {site: (q.loc.detach().clone().requires_grad_(), q.var.log().detach().requires_grad_())
                   for site, q in guide.moments_and_kl(model.prior)[0].items()}
    optimizer = make_adam([tensor for pair in moments.values() for tensor in pair] + list(model.parameters()), 1e-3)
    return model, moments, optimizer


def interleaved_medians(runs: dict, steps: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median ms of each step function in ``runs``, their steps interleaved in rounds (after ``warmup`` of each);
    ``timing.timed`` waits for the device around every step, so CUDA's queued kernels are counted."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(steps):
        for key, fn in runs.items():
            times[key].append(timed(fn, device))
    return {key: statistics.median(values) for key, values in times.items()}


def benchmark(name: str, steps: int, batch_size: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch_size, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    dataset_size = 60000

    net = NETS[name]().to(device)
    plain_opt = make_adam(list(net.parameters()), 1e-3)  # the same (fused) Adam as ours

    model = ps.BayesianNetwork(NETS[name](), dataset_size=dataset_size).to(device)
    guide = ps.MeanField(model).to(device)
    ours_opt = make_adam([*guide.parameters(), *model.parameters()], 1e-3)
    draws_model = ps.BayesianNetwork(NETS[name](), dataset_size=dataset_size, local_reparameterization="none")
    draws_model.to(device)
    draws_guide = ps.MeanField(draws_model).to(device)
    draws_opt = make_adam([*draws_guide.parameters(), *draws_model.parameters()], 1e-3)
    slab_model = ps.BayesianNetwork(NETS[name](), prior=ps.priors.SpikeAndSlab(1.0, 0.01, 0.5),
                                    dataset_size=dataset_size).to(device)
    slab_guide = ps.MeanField(slab_model).to(device)
    slab_opt = make_adam([*slab_guide.parameters(), *slab_model.parameters()], 1e-3)

    pyro.clear_param_store()
    pyro_model = ps.BayesianNetwork(NETS[name](), dataset_size=dataset_size).to(device)
    svi = SVI(pyro_model, AutoNormal(pyro_model), pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())

    idiom, idiom_guide = idiom_and_guide(name, x, y, device)
    idiom_opt = make_adam(parameter_groups(idiom, idiom_guide, 1e-3, 1e-3, list(idiom.parameters())), 1e-3)

    fast_idiom, fast_guide = idiom_and_guide(name, x, y, device)
    fast_opt = make_adam(parameter_groups(fast_idiom, fast_guide, 1e-3, 1e-3, list(fast_idiom.parameters())), 1e-3)
    fast_objective = fused_objective(fast_idiom, fast_guide, (x, y), dataset_size)
    if fast_objective is None:
        raise RuntimeError("the fused objective did not recognise Pyro's idiom")

    runs = {
        "plain_ms": lambda: plain_step(net, plain_opt, x, y),
        "ours_ms": lambda: ours_step(model, guide, ours_opt, x, y),
        "ours_weight_draws_ms": lambda: ours_step(draws_model, draws_guide, draws_opt, x, y),
        "ours_spike_slab_ms": lambda: ours_step(slab_model, slab_guide, slab_opt, x, y),
        "pyro_svi_ms": lambda: svi.step(x, y),
        "pyro_idiom_fit_ms": lambda: idiom_step(idiom, idiom_guide, idiom_opt, x, y, dataset_size),
        "pyro_idiom_fused_ms": lambda: fused_idiom_step(fast_objective, fast_idiom, fast_guide, fast_opt, x, y),
    }
    result = interleaved_medians(runs, steps, warmup=5, device=device)
    result["ours_over_plain"] = result["ours_ms"] / result["plain_ms"]
    result["pyro_over_ours"] = result["pyro_svi_ms"] / result["ours_ms"]
    result["weight_draws_over_plain"] = result["ours_weight_draws_ms"] / result["plain_ms"]
    result["pyro_over_plain"] = result["pyro_svi_ms"] / result["plain_ms"]
    result["idiom_over_ours"] = result["pyro_idiom_fit_ms"] / result["ours_ms"]
    result["fused_idiom_over_ours"] = result["pyro_idiom_fused_ms"] / result["ours_ms"]
    return result


def sweep_width(width: int, steps: int, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict:
    """(a), (b) and (f) for the mlp 784-W-W-10, interleaved."""
    def make_net():
        return ps.nets.mlp(784, (width, width), 10)

    net = make_net().to(device)
    plain_opt = make_adam(list(net.parameters()), 1e-3)
    model = ps.BayesianNetwork(make_net(), dataset_size=60000).to(device)
    guide = ps.MeanField(model).to(device)
    ours_opt = make_adam([*guide.parameters(), *model.parameters()], 1e-3)
    floor = floor_model(make_net, 60000, device)
    runs = {"plain_ms": lambda: plain_step(net, plain_opt, x, y),
            "ours_ms": lambda: ours_step(model, guide, ours_opt, x, y),
            "floor_ms": lambda: floor_step(*floor, x, y)}
    result = interleaved_medians(runs, steps, warmup=3, device=device)
    result["ours_over_plain"] = result["ours_ms"] / result["plain_ms"]
    result["floor_over_plain"] = result["floor_ms"] / result["plain_ms"]
    return result


def sweep(widths: list[int], steps: int, batch_size: int, device: torch.device) -> dict:
    """``sweep_width`` at every width, printing a row each."""
    torch.manual_seed(0)
    x = torch.randn(batch_size, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    results = {}
    for width in widths:
        name = f"mlp 784-{width}-{width}-10"
        result = results[name] = sweep_width(width, steps, x, y, device)
        print(f"{name:<22} {result['plain_ms']:>10.2f} {result['ours_ms']:>10.2f} {result['floor_ms']:>10.2f} "
              f"{result['ours_over_plain']:>8.2f} {result['floor_over_plain']:>8.2f}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--widths", default="128,400,1024,2048", help="mlp widths of the sweep ('' for none)")
    parser.add_argument("--sweep-steps", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/step_time.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    widths = [int(width) for width in args.widths.split(",") if width]

    results = {name: benchmark(name, args.steps, args.batch_size, device) for name in NETS}
    header = (f"{'network':<20} {'(a) plain':>10} {'(b) ours':>10} {'(b´) draws':>11} {'(b´´) s&s':>10} "
              f"{'(c) Pyro SVI':>13} {'(d) idiom':>10} {'(e) fused':>10} "
              f"{'(b)/(a)':>8} {'(b´)/(a)':>9} {'(c)/(b)':>8} {'(c)/(a)':>8} {'(d)/(b)':>8} {'(e)/(b)':>8}")
    print(f"ms per training step, batch {args.batch_size}, {device}, median of {args.steps} interleaved rounds")
    print(header)
    for name, r in results.items():
        print(f"{name:<20} {r['plain_ms']:>10.2f} {r['ours_ms']:>10.2f} {r['ours_weight_draws_ms']:>11.2f} "
              f"{r['ours_spike_slab_ms']:>10.2f} "
              f"{r['pyro_svi_ms']:>13.2f} {r['pyro_idiom_fit_ms']:>10.2f} {r['pyro_idiom_fused_ms']:>10.2f} "
              f"{r['ours_over_plain']:>8.2f} {r['weight_draws_over_plain']:>9.2f} {r['pyro_over_ours']:>8.2f} "
              f"{r['pyro_over_plain']:>8.2f} {r['idiom_over_ours']:>8.2f} {r['fused_idiom_over_ours']:>8.2f}")
    swept = {}
    if widths:
        print(f"\nwidth sweep: ms per training step, batch {args.batch_size}, {device}, "
              f"median of {args.sweep_steps} interleaved rounds")
        print(f"{'network':<22} {'(a) plain':>10} {'(b) ours':>10} {'(f) floor':>10} {'(b)/(a)':>8} {'(f)/(a)':>8}")
        swept = sweep(widths, args.sweep_steps, args.batch_size, device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"batch_size": args.batch_size, "device": str(device), "steps": args.steps,
            "sweep_steps": args.sweep_steps, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        meta["device_name"] = torch.cuda.get_device_name(device)
    out.write_text(json.dumps({"meta": meta, "results": results, "width_sweep": swept}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
