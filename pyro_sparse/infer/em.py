"""EM-SGHMC (Deng et al., 2019; Ke & Fan, 2022): SGHMC samples the weights while an EM loop adapts a
spike-and-slab prior and a pruning ramp removes the weights that fall in the spike, in one shot per
ramp step. ``sample_sghmc`` is the same driver without EM or pruning (dense SGHMC).

Every ``em_every`` steps, for each chain:

- E-step: ρ ← ρ + ω_k (γ(θ) − ρ), the stochastic-approximation average of each weight's inclusion
  probability γ(w) = π N(w; 0, σ₁²) / p(w), ω_k = (k + 10)^(−0.7) for the k-th E-step;
- M-step: π, σ₁ (and optionally σ₀) move by ω_k towards their MAP values given ρ and θ under
  Beta / inverse-gamma priors (``SpikeAndSlab.m_step``), the chain's own copy. (Jumping to the MAP
  values at once shrinks σ₁ to the scale of the freshly initialised weights before the data have
  grown them, and the network underfits: 77.8 % against 82.2 % on a Fashion-MNIST check);
- the prior gradient of the next steps is the adaptive L2 −λ w, λ = ρ/σ₁² + (1 − ρ)/σ₀²
  (``SpikeAndSlab.adaptive_precision``).

Pruning: ``prune_steps`` one-shot events between ``prune_start`` and ``prune_end`` (fractions of the
burn-in) bring each chain to sparsity s·(1 − (1 − k/K)³) at event k, removing the active weights
of lowest ρ·|w̄| (ties: lowest |w|), w̄ the stochastic-approximation average of w kept alongside ρ.
ρ alone saturates at 1 for every |w| ≫ σ₀, including weights the data do not inform, which wander
as far as the slab lets them; |w̄| is small for those. Removed weights, their momentum and their
noise are exactly zero from then on. After burn-in, ``samples`` draws per chain are kept, evenly
thinned.

The hyperparameters keep adapting (through ρ, with ever smaller ω_k) after burn-in, so each chain's
π and σ₁ converge to a chain-specific value rather than being sampled: expect their R-hat above 1
when the chains settle in different modes, which neural networks do.

Divergence: the step does not look for NaN (a host sync per step would stall a GPU). Each chain's
position and minibatch loss are checked (one sync per chain) every ``em_every`` steps and at every
step that keeps a draw or prunes, before the E-step, the pruning or the record use them; the
hyperparameters right after each M-step; and the whole chain state at the end of each epoch,
before the checkpoint is written. A non-finite value therefore stops the run within ``em_every``
steps with ``errors.TrainingDiverged``, and the checkpoint on disk stays the last good one.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import checkpoint as checkpoints
from ..data import as_tensors
from ..errors import CheckpointError, TrainingDiverged
from ..model import BayesianNetwork
from ..posterior import Posterior
from ..priors import SpikeAndSlab
from .sghmc import SGHMC, Schedule, SGHMCState, check_seed, first_non_finite, network_parameters, sghmc


@dataclass
class SGHMCResult:
    """What ``em_sghmc`` / ``sample_sghmc`` return.

    posterior: the kept draws (``Posterior.from_samples`` with chains, sample stats and, for EM,
        the hyperparameters of each draw).
    traces: name -> (chains, records) float tensors, one record every ``em_every`` steps:
        "step", "step_size", "log_joint" (minibatch estimate of log p(θ, D)), "sparsity", and for
        EM "inclusion" (π), "slab_scale" (σ₁), "spike_scale" (σ₀).
    inclusion_probability: site -> ρ averaged over chains (site shape); empty without EM.
    masks: site -> (chains, *site shape) bool, True where the weight is kept.
    history: one dict per epoch: epoch, neg_log_joint (−log p(θ, D) / N at the epoch's end, minibatch
        estimate), nll (mean minibatch NLL per example), log_joint, sparsity, step_size, seconds
        (sampling time so far) and for EM the chains' mean π, σ₁, σ₀.
    """

    posterior: Posterior
    traces: dict[str, torch.Tensor]
    inclusion_probability: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)


def _check(name: str, value: Any, low: float, high: float = math.inf, integer: bool = False,
           low_open: bool = False, high_open: bool = True) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    ok = ok and (not integer or int(value) == value)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'} in {interval}, got {value!r}")


def _chain_start(model: BayesianNetwork, chain: int, seed: int) -> dict[str, torch.Tensor]:
    """Chain 0 starts at the model's own initial values; chain c > 0 at a fresh initialisation of
    the network (``reset_parameters`` of each layer, seeded), so chains start apart (for R-hat)."""
    params = network_parameters(model)
    if chain == 0:
        return params
    import copy

    net = copy.deepcopy(model.net)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7919 * chain)
        for module in net.modules():
            if hasattr(module, "reset_parameters") and module is not net:
                module.reset_parameters()
    fresh = dict(net.named_parameters()) | dict(net.named_buffers())
    for name in model.sites:
        params[name] = fresh[name].detach().clone()
    for path in params:
        if path.startswith("net.") and path[4:] in fresh:
            params[path] = fresh[path[4:]].detach().clone()
    return params


class _Chain:
    """One chain's sampler state, EM state and kept draws."""

    def __init__(self, sampler: SGHMC, state: SGHMCState, num_sites: int, prior: SpikeAndSlab | None):
        self.state = state
        self.num_sites = num_sites
        self.inclusion = None
        self.weight_mean = state.position[:num_sites].detach().clone()
        self.hyper: dict[str, torch.Tensor] = {}
        if prior is not None:
            self.hyper = {name: getattr(prior, name).detach().clone()
                          for name in ("inclusion", "slab_scale", "spike_scale")}
            self.inclusion = prior.inclusion_probability(state.position[:num_sites]).detach()
            state.prior_precision = sampler.site_vector(state, 0.0)
            state.prior_precision[:num_sites] = prior.adaptive_precision(self.inclusion) / sampler.dataset_size
            sampler.refresh(state)
        self.draws: list[torch.Tensor] = []
        self.stats: dict[str, list[float]] = {}
        self.trace: dict[str, list[float]] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state.state_dict(), "inclusion": self.inclusion, "weight_mean": self.weight_mean,
                "hyper": self.hyper,
                "draws": self.draws, "stats": self.stats, "trace": self.trace}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.state.load_state_dict(saved["state"])
        self.inclusion, self.weight_mean, self.hyper = saved["inclusion"], saved["weight_mean"], saved["hyper"]
        self.draws, self.stats, self.trace = saved["draws"], saved["stats"], saved["trace"]


def _run(
    model: BayesianNetwork,
    data,
    em: bool,
    target_sparsity: float,
    chains: int,
    samples: int,
    epochs: int,
    burn_in: int | None,
    batch_size: int,
    step_size: float | Schedule,
    friction: float,
    temperature: float,
    preconditioner: bool,
    noise: str,
    em_every: int,
    prune_start: float,
    prune_end: float,
    prune_steps: int,
    beta_prior: tuple[float, float] | None,
    slab_prior: tuple[float, float] | None,
    spike_prior: tuple[float, float] | None,
    seed: int | None,
    checkpoint: str | os.PathLike | None,
    resume: bool,
    progress: bool | None,
    metadata: dict[str, Any] | None,
    callback: Callable[[dict[str, Any]], None] | None,
) -> SGHMCResult:
    _check("target_sparsity", target_sparsity, 0.0, 1.0)
    _check("chains", chains, 1, integer=True)
    _check("samples", samples, 1, integer=True)
    _check("epochs", epochs, 1, integer=True)
    _check("batch_size", batch_size, 1, integer=True)
    _check("em_every", em_every, 1, integer=True)
    _check("prune_steps", prune_steps, 1, integer=True)
    _check("prune_start", prune_start, 0.0, 1.0, high_open=False)
    _check("prune_end", prune_end, prune_start, 1.0, high_open=False)
    if not callable(step_size):
        _check("step_size", step_size, 0.0, low_open=True)
    burn_in = epochs // 2 if burn_in is None else burn_in
    _check("burn_in", burn_in, 0, epochs, integer=True)
    seed = check_seed(seed)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    prior = model.prior
    if em and not isinstance(prior, SpikeAndSlab):
        raise ValueError(
            f"em_sghmc needs a SpikeAndSlab prior, got {type(prior).__name__}: build the model with "
            f"prior=ps.priors.SpikeAndSlab(...) (or use sample_sghmc for dense SGHMC)"
        )
    x, y = as_tensors(data)
    model.check_batch(x, y)
    device = next(iter(model.net.buffers())).device
    x, y = x.to(device), y.to(device)
    n = len(x)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps, burn_steps = epochs * steps_per_epoch, burn_in * steps_per_epoch
    collect_steps = total_steps - burn_steps
    if collect_steps < samples:
        raise ValueError(
            f"samples={samples} per chain need at least as many steps after burn-in; there are {collect_steps} "
            f"({epochs - burn_in} epochs of {steps_per_epoch} steps): lower samples or burn_in, or raise epochs"
        )
    thinning = collect_steps // samples
    keep_at = {burn_steps + thinning * (k + 1) - 1 for k in range(samples)}
    prune_at = {}
    if em and target_sparsity > 0:
        for k in range(1, prune_steps + 1):
            fraction = prune_start + (prune_end - prune_start) * k / prune_steps
            prune_at[max(0, round(fraction * burn_steps) - 1)] = target_sparsity * (1 - (1 - k / prune_steps) ** 3)

    base_seed = int(torch.randint(2**62, ()).item()) if seed is None else seed
    sampler = sghmc(model, step_size, friction=friction, temperature=temperature, preconditioner=preconditioner,
                    burn_in=burn_steps, noise=noise)
    initial_hyper = {name: value.detach().clone() for name, value in prior.named_buffers()}
    runs = []
    for c in range(chains):
        state = sampler.init(_chain_start(model, c, base_seed), seed=base_seed + c)
        runs.append(_Chain(sampler, state, sampler.num_site_coords(state), prior if em else None))
    num_sites = runs[0].num_sites
    site_layout = [(name, shape) for name, shape in runs[0].state.layout if name in model.sites]
    shuffle = torch.Generator().manual_seed(base_seed)
    history: list[dict[str, Any]] = []
    start_epoch, seconds, last_saved = 0, 0.0, None
    if resume and Path(checkpoint).is_file():
        saved = checkpoints.load(checkpoint, map_location=device)
        _load_chains(runs, saved, checkpoint, em)
        shuffle.set_state(saved["shuffle_rng"])
        history, start_epoch, last_saved = saved["history"], saved["epoch"], checkpoint
        seconds = history[-1]["seconds"] if history else 0.0

    def diverged(epoch: int, step: int, what: str) -> TrainingDiverged:
        for name, value in initial_hyper.items():  # leave the model's prior as it was given, not NaN
            prior.get_buffer(name).copy_(value)
        return TrainingDiverged(f"epoch {epoch + 1}, step {step + 1}", what, "step_size", last_saved)

    show = False if progress is None else progress
    bar = tqdm(range(start_epoch, epochs), initial=start_epoch, total=epochs, disable=not show, desc="em-sghmc")
    model.train()
    for epoch in bar:
        started = time.perf_counter()
        orders = [torch.randperm(n, generator=shuffle).to(device) for _ in runs]
        nll_sum = torch.zeros((), device=device)
        for step in range(steps_per_epoch):
            k = epoch * steps_per_epoch + step
            for c, (run, order) in enumerate(zip(runs, orders, strict=True)):
                index = order[step * batch_size: (step + 1) * batch_size]
                state = sampler.step(run.state, (x[index], y[index]))
                nll_sum += state.loss
                if ((k + 1) % em_every == 0 or k in keep_at or k in prune_at) and not bool(state.is_finite()):
                    raise diverged(epoch, step, _what_is_not_finite(state, c))
                if em and (k + 1) % em_every == 0:
                    _em_step(sampler, run, prior, (k + 1) // em_every, beta_prior, slab_prior, spike_prior)
                    bad = first_non_finite(run.hyper)
                    if bad is not None:
                        raise diverged(epoch, step, f"the M-step of chain {c + 1} gave a non-finite {bad}")
                if k in prune_at:
                    _prune(sampler, run, prune_at[k])
                if (k + 1) % em_every == 0 or k in keep_at:
                    record = _record(sampler, run, model, prior, em, k, n)
                    if (k + 1) % em_every == 0:
                        for key, value in record.items():
                            run.trace.setdefault(key, []).append(value)
                    if k in keep_at:
                        run.draws.append(state.position.detach().clone())
                        for key, value in record.items():
                            run.stats.setdefault(key, []).append(value)
        seconds += time.perf_counter() - started
        what = _what_is_not_finite_at_epoch_end(runs, nll_sum)
        if what is not None:
            raise diverged(epoch, steps_per_epoch - 1, what)
        row = _epoch_row(runs, epoch, seconds, float(nll_sum) / (steps_per_epoch * len(runs)), model, prior, em, n)
        history.append(row)
        bar.set_postfix(neg_log_joint=f"{row['neg_log_joint']:.4f}", sparsity=f"{row['sparsity']:.3f}")
        if checkpoint is not None:
            checkpoints.save({"chains": [run.state_dict() for run in runs], "shuffle_rng": shuffle.get_state(),
                              "history": history, "epoch": epoch + 1, "epochs": epochs, "burn_in": burn_in,
                              "metadata": metadata or {}, "model": model.state_dict()}, checkpoint)
            last_saved = checkpoint
        if callback is not None:
            callback(row)
    bar.close()
    return _result(model, runs, site_layout, num_sites, prior, em, initial_hyper, history)


def _what_is_not_finite(state: SGHMCState, chain: int) -> str:
    """Which of a non-finite chain's position and minibatch loss went wrong, in words."""
    if not bool(torch.isfinite(state.loss)):
        return f"the minibatch loss of chain {chain + 1} is {float(state.loss)}"
    return f"the weights of chain {chain + 1} are not finite"


def _what_is_not_finite_at_epoch_end(runs: list[_Chain], nll_sum: torch.Tensor) -> str | None:
    """None when every tensor a checkpoint would hold (draws are checked as they are kept) is finite."""
    for c, run in enumerate(runs):
        saved = {key: value for key, value in run.state_dict().items() if key != "draws"}
        bad = first_non_finite(saved)
        if bad is not None:
            return f"{bad} of chain {c + 1} is not finite"
    if not bool(torch.isfinite(nll_sum)):
        return f"the epoch's summed minibatch loss is {float(nll_sum)}"
    return None


def _load_chains(runs: list[_Chain], saved: dict[str, Any], path: str | os.PathLike, em: bool) -> None:
    """Restore each chain from a checkpoint, or a ``CheckpointError`` if it belongs to another run."""
    fix = "or start a new checkpoint"
    if "chains" not in saved:
        raise CheckpointError(path, f"it was not written by em_sghmc or sample_sghmc; resume one of their runs, {fix}")
    count = len(saved["chains"])
    if count != len(runs):
        raise CheckpointError(path, f"it holds {count} chains, this run asks for {len(runs)}; resume with "
                                    f"chains={count}, {fix}")
    if bool(saved["chains"][0]["hyper"]) != em:
        writer, reader = ("sample_sghmc", "em_sghmc") if em else ("em_sghmc", "sample_sghmc")
        raise CheckpointError(path, f"it was written by {writer}, not {reader}; resume with {writer}, {fix}")
    for run, chain_saved in zip(runs, saved["chains"], strict=True):
        layout = tuple((name, torch.Size(shape)) for name, shape in chain_saved["state"]["layout"])
        try:
            if layout != run.state.layout:
                raise RuntimeError(_layout_difference(layout, run.state.layout))
            run.load_state_dict(chain_saved)
        except (RuntimeError, KeyError) as error:
            first_line = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise CheckpointError(path, f"it was written for another model or guide ({first_line}); resume with "
                                        f"the same model, {fix}") from error


def _layout_difference(saved: tuple, current: tuple) -> str:
    """The first parameter whose name or shape differs between two layouts, in words."""
    for (saved_name, saved_shape), (name, shape) in zip(saved, current, strict=False):
        if saved_name != name:
            return f"parameter {saved_name!r} there, {name!r} here"
        if saved_shape != shape:
            return f"{name!r} has shape {tuple(saved_shape)} there, {tuple(shape)} here"
    return f"{len(saved)} parameters there, {len(current)} here"


def _em_step(sampler: SGHMC, run: _Chain, prior: SpikeAndSlab, k: int, beta_prior, slab_prior, spike_prior) -> None:
    state = run.state
    with torch.no_grad():
        _load_hyper(prior, run.hyper)
        weights = state.position[: run.num_sites]
        mask = state.mask[: run.num_sites]
        rate = (k + 10) ** -0.7
        run.inclusion.lerp_(prior.inclusion_probability(weights), rate).mul_(mask)
        run.weight_mean.lerp_(weights, rate)
        prior.m_step(run.inclusion, weights, rate=rate, beta_prior=beta_prior or (1.0, 1.0),
                     slab_prior=slab_prior or (1.0, 1.0), spike_prior=spike_prior)
        torch.div(prior.adaptive_precision(run.inclusion), sampler.dataset_size,
                  out=state.prior_precision[: run.num_sites])
        sampler.refresh(state)
        for name, value in run.hyper.items():
            value.copy_(getattr(prior, name))


def _load_hyper(prior, hyper: dict[str, torch.Tensor]) -> None:
    for name, value in hyper.items():
        getattr(prior, name).copy_(value)


def _prune(sampler: SGHMC, run: _Chain, sparsity: float) -> None:
    """Keep the (1 − sparsity) fraction of site weights with the highest score ρ·|w̄| (ties: |w|)."""
    state = run.state
    with torch.no_grad():
        weights = state.position[: run.num_sites]
        remove = int(round(sparsity * run.num_sites))
        if remove <= int((~state.mask[: run.num_sites]).sum()):
            return
        by_magnitude = torch.argsort(weights.abs(), stable=True)
        score = run.inclusion * run.weight_mean.abs()
        order = by_magnitude[torch.argsort(score[by_magnitude], stable=True)]
        keep = torch.ones_like(state.mask)
        keep[order[:remove]] = False
        sampler.prune(state, keep)
        run.inclusion.mul_(state.mask[: run.num_sites])


def _record(sampler: SGHMC, run: _Chain, model: BayesianNetwork, prior, em: bool, k: int, n: int) -> dict[str, float]:
    state = run.state
    with torch.no_grad():
        if em:
            _load_hyper(prior, run.hyper)
        weights = state.position[: run.num_sites]
        log_prior = float(prior.log_prob(weights).sum())
        record = {"step": float(k + 1), "step_size": float(sampler.step_size(k)),
                  "log_joint": -n * float(state.loss) + log_prior,
                  "sparsity": 1.0 - float(state.mask[: run.num_sites].sum()) / run.num_sites}
        record.update({name: float(value) for name, value in run.hyper.items()})
    return record


def _epoch_row(runs, epoch, seconds, nll, model, prior, em, n) -> dict[str, Any]:
    log_priors = []
    for run in runs:
        if em:
            _load_hyper(prior, run.hyper)
        with torch.no_grad():
            log_priors.append(float(prior.log_prob(run.state.position[: run.num_sites]).sum()))
    log_prior = sum(log_priors) / len(runs)
    row = {"epoch": epoch + 1, "neg_log_joint": nll - log_prior / n, "nll": nll, "log_joint": -n * nll + log_prior,
           "sparsity": sum(1.0 - float(r.state.mask[: r.num_sites].sum()) / r.num_sites for r in runs) / len(runs),
           "step_size": float(runs[0].trace["step_size"][-1]) if runs[0].trace.get("step_size") else None,
           "seconds": seconds}
    if em:
        for name in ("inclusion", "slab_scale", "spike_scale"):
            row[name] = sum(float(r.hyper[name]) for r in runs) / len(runs)
    return row


def _result(model, runs, site_layout, num_sites, prior, em, initial_hyper, history) -> SGHMCResult:
    layout = runs[0].state.layout
    draws = torch.stack([draw for run in runs for draw in run.draws])  # (C·D, P), chain-major
    names = [name for name, _ in layout]
    pieces = draws.split([shape.numel() for _, shape in layout], dim=1)
    samples = {name: piece.reshape(len(draws), *shape) for name, piece, (_, shape) in zip(names, pieces, layout,
                                                                                           strict=True)}
    stats = {key: torch.tensor([run.stats[key] for run in runs]) for key in runs[0].stats}
    hyper_names = ("inclusion", "slab_scale", "spike_scale") if em else ()
    hyperparameters = {key: stats.pop(key) for key in hyper_names}
    stats.pop("step", None)
    sample_stats = {"lp": stats.pop("log_joint"), **stats}
    posterior = Posterior.from_samples(model, samples, chains=len(runs), sample_stats=sample_stats,
                                       hyperparameters=hyperparameters)
    traces = {key: torch.tensor([run.trace[key] for run in runs]) for key in runs[0].trace}
    masks = {}
    offset = 0
    for name, shape in site_layout:
        masks[name] = torch.stack([run.state.mask[offset: offset + shape.numel()].reshape(shape) for run in runs])
        offset += shape.numel()
    inclusion = {}
    if em:
        mean_rho = torch.stack([run.inclusion for run in runs]).mean(0)
        offset = 0
        for name, shape in site_layout:
            inclusion[name] = mean_rho[offset: offset + shape.numel()].reshape(shape).clone()
            offset += shape.numel()
        with torch.no_grad():  # the model's prior: the chains' mean hyperparameters
            for name in ("inclusion", "slab_scale", "spike_scale"):
                getattr(prior, name).copy_(torch.stack([run.hyper[name] for run in runs]).mean())
    else:
        for name, value in initial_hyper.items():
            prior.get_buffer(name).copy_(value)
    return SGHMCResult(posterior, traces, inclusion, masks, history)


def restore_result(model: BayesianNetwork, saved: dict[str, Any]) -> SGHMCResult:
    """The ``SGHMCResult`` of a run from its checkpoint (as written by ``em_sghmc(checkpoint=...)``).

    A run interrupted in its sampling phase gives the draws kept so far; one interrupted before any
    draw was kept (in burn-in) is a ValueError.
    """
    from types import SimpleNamespace

    if not saved["chains"] or not saved["chains"][0]["draws"]:
        of = f" of {saved['epochs']}" if "epochs" in saved else ""
        burn_in = f"the {saved['burn_in']} burn-in epochs" if "burn_in" in saved else "burn-in"
        raise ValueError(f"the run has no posterior draws yet (epoch {saved['epoch']}{of}; draws start after "
                         f"{burn_in}): finish it with --resume (em_sghmc(..., resume=True))")
    runs = []
    for chain in saved["chains"]:
        state = SimpleNamespace(layout=chain["state"]["layout"], mask=chain["state"]["mask"])
        runs.append(SimpleNamespace(state=state, draws=chain["draws"], stats=chain["stats"], trace=chain["trace"],
                                    inclusion=chain["inclusion"], hyper=chain["hyper"]))
    layout = runs[0].state.layout
    site_layout = [(name, shape) for name, shape in layout if name in model.sites]
    num_sites = sum(shape.numel() for _, shape in site_layout)
    em = bool(runs[0].hyper)
    initial = {name: value.detach().clone() for name, value in model.prior.named_buffers()}
    return _result(model, runs, site_layout, num_sites, model.prior, em, initial, saved["history"])


def em_sghmc(
    model: BayesianNetwork,
    data,
    target_sparsity: float = 0.9,
    chains: int = 2,
    samples: int = 32,
    epochs: int = 10,
    burn_in: int | None = None,
    batch_size: int = 128,
    step_size: float | Schedule = 1e-3,
    friction: float = 0.1,
    temperature: float = 1.0,
    preconditioner: bool = True,
    noise: str = "rademacher",
    em_every: int = 10,
    prune_start: float = 0.2,
    prune_end: float = 0.6,
    prune_steps: int = 4,
    beta_prior: tuple[float, float] = (1.0, 1.0),
    slab_prior: tuple[float, float] = (1.0, 1.0),
    spike_prior: tuple[float, float] | None = None,
    seed: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool | None = None,
    metadata: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> SGHMCResult:
    """Sample a sparse posterior of ``model`` (SpikeAndSlab prior) by SGHMC with EM and pruning.

    Args:
        model: a BayesianNetwork with a ``priors.SpikeAndSlab`` prior (its hyperparameters are the
            initial values; at the end they hold the chains' mean estimates). Take σ₀ well below
            the weights that matter: weights that fall in the spike are held at zero by the precision
            1/σ₀² (LeNet-5 on Fashion-MNIST: σ₀ = 0.001 gives 89.5 % at 90 % sparsity, 0.01 only 87.8 %).
        data: training data ((x, y), a TensorDataset or a ``ps.data.Dataset``).
        target_sparsity: s ∈ [0, 1), the fraction of Bayesian weights removed by the ramp (0: none).
        chains: number of chains (run side by side, step by step).
        samples: draws kept per chain after burn-in (evenly thinned).
        epochs: passes over the data per chain; burn_in: how many of them are burn-in (default half):
            the preconditioner adapts and the pruning ramp runs there, no draws are kept.
        batch_size, step_size, friction, temperature, preconditioner, noise: SGHMC (``infer.sghmc``);
            ``step_size`` is ε of the per-example loss, or a schedule ``step -> ε``.
        em_every: steps between E/M-steps (and trace records).
        prune_start, prune_end, prune_steps: the pruning ramp (fractions of the burn-in steps, events).
        beta_prior: (a, b) of π's Beta prior; slab_prior, spike_prior: (α, β) of the inverse-gamma
            priors of σ₁², σ₀² (spike_prior None: σ₀ fixed).
        seed: an integer in [0, 2**32); seeds initialisation of chains > 0, shuffling and noise.
        checkpoint, resume: write the whole state atomically after every epoch; continue from it
            (the result equals an uninterrupted run). The checkpoint holds "epoch" (done) and "epochs"
            (planned): the run is finished when they are equal. Resuming a checkpoint of another model,
            number of chains or sampler is an ``errors.CheckpointError``.
        progress: show a progress bar. metadata: stored in the checkpoint. callback: called with
            each epoch's history row.

    Returns:
        an ``SGHMCResult``.

    Raises:
        errors.TrainingDiverged: a position, minibatch loss or hyperparameter became NaN or infinite
            (detected within ``em_every`` steps, before anything is written: the checkpoint on disk
            is the last good one); lower ``step_size``.
    """
    return _run(model, data, True, target_sparsity, chains, samples, epochs, burn_in, batch_size, step_size,
                friction, temperature, preconditioner, noise, em_every, prune_start, prune_end, prune_steps,
                beta_prior, slab_prior, spike_prior, seed, checkpoint, resume, progress, metadata, callback)


def sample_sghmc(
    model: BayesianNetwork,
    data,
    chains: int = 2,
    samples: int = 32,
    epochs: int = 10,
    burn_in: int | None = None,
    batch_size: int = 128,
    step_size: float | Schedule = 1e-3,
    friction: float = 0.1,
    temperature: float = 1.0,
    preconditioner: bool = True,
    noise: str = "rademacher",
    record_every: int = 10,
    seed: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool | None = None,
    metadata: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> SGHMCResult:
    """Dense SGHMC under the model's own prior (no EM, no pruning); arguments as in ``em_sghmc``
    (``record_every`` plays ``em_every``'s part: trace records and divergence checks)."""
    return _run(model, data, False, 0.0, chains, samples, epochs, burn_in, batch_size, step_size, friction,
                temperature, preconditioner, noise, record_every, 0.2, 0.6, 1, None, None, None, seed, checkpoint,
                resume, progress, metadata, callback)


__all__ = ["SGHMCResult", "em_sghmc", "restore_result", "sample_sghmc"]
