"""EM-SGHMC as an explicit state and a step: ``EMSGHMC.init`` / ``step`` / ``result`` (the loops of
``infer.em`` drive it).

The algorithm is documented in ``infer.em`` (E-step, pooled M-step, pruning ramp, frozen
hyperparameters after burn-in, divergence checks). Here it is split so that any loop can run it:

    kernel = EMSGHMC(target, config, dataset_size=N)      # target: infer.sampling_target
    state = kernel.init(seed)
    while state.step < kernel.plan.total_steps:
        batches = [next(batch_iterator) for _ in state.chains]   # one minibatch per chain
        state = kernel.step(state, batches)
    result = kernel.result(state, history)

``em_sghmc`` / ``sample_sghmc`` shuffle tensors by epoch, checkpoint and report; another loop may take its
batches from elsewhere. ``config`` (``RunConfig``) holds every setting; ``kernel.plan`` says at which
steps E/M-steps, pruning events and kept draws fall. The hyperparameters the chains share live in
``em_shared``; the group spike-and-slab of ``structure="unit"`` and the removal of units in ``em_units``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..distributed import SINGLE_PROCESS, World, gather_objects
from ..posterior import Posterior
from ..priors import Prior, SpikeAndSlab, pool_statistics
from ..validation import check_count, check_fraction, check_number, check_positive
from .em_shared import SharedEM, all_reduced
from .em_units import SharedUnitEM, UnitLayout, prune_units, unit_result
from .sampling_target import NetworkTarget, PyroTarget
from .sghmc import SGHMC, Schedule, SGHMCState, first_non_finite


@dataclass
class SGHMCResult:
    """What ``em_sghmc`` / ``sample_sghmc`` return.

    posterior: the kept draws (``Posterior.from_samples`` with chains, sample stats and, for EM,
        the hyperparameters of each draw).
    traces: name -> (chains, records) float tensors, one record every ``em_every`` steps:
        "step", "step_size", "log_joint" (minibatch estimate of log p(θ, D)), "sparsity", and for
        EM the shared "inclusion" (π), "slab_scale" (σ₁), "spike_scale" (σ₀, the mean over weights
        of the per-layer σ₀) and the chain's own "implied_inclusion", "implied_slab_scale" (M-step
        of its statistics) and "conditional_inclusion", "conditional_slab_scale" (conditional draws); with
        ``structure="unit"`` also the shared π_u "unit_inclusion", "unit_sparsity" (fraction of the units
        removed) and the chain's "implied_unit_inclusion", "conditional_unit_inclusion".
    inclusion_probability: site -> ρ averaged over chains (site shape); empty without EM.
    masks: site -> (chains, *site shape) bool, True where the weight is kept.
    history: one dict per epoch: epoch, neg_log_joint (−log p(θ, D) / N at the epoch's end, minibatch
        estimate), nll (mean minibatch NLL per example), log_joint, sparsity, step_size, seconds
        (sampling time so far) and for EM the shared π, σ₁, σ₀ (mean over weights); with units also
        unit_inclusion (π_u) and unit_sparsity.
    spike_scale: site -> its σ₀ (EM; empty without).
    unit_inclusion (``structure="unit"``): unit group name -> (size,) the posterior inclusion probability of
        each unit, ρ_k averaged over the chains (ρ is frozen after burn-in, so this is also its mean over
        the kept draws); 0 for removed units. Empty for ``structure="weight"``.
    unit_masks (``structure="unit"``): group name -> bool keep mask (size,) of the groups with removed
        units, the same for every chain and draw; also ``posterior.unit_masks`` (what ``sparse.export``
        cuts out) beside ``posterior.unit_inclusion``.

    For EM, ``posterior.hyperparameters`` holds, per chain and draw, a draw of π and σ₁ from their
    conditional posterior given the draw's weights (diagnostics; see the module docstring), not the
    shared values (constant after burn-in, in ``traces`` and ``model.prior``); with ``structure="unit"``
    also "unit_inclusion" (π_u), and ``posterior.sample_stats`` "unit_sparsity".
    """

    posterior: Posterior
    traces: dict[str, torch.Tensor]
    inclusion_probability: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)
    spike_scale: dict[str, float] = field(default_factory=dict)
    unit_inclusion: dict[str, torch.Tensor] = field(default_factory=dict)
    unit_masks: dict[str, torch.Tensor] = field(default_factory=dict)


STRUCTURES = ("weight", "unit")


@dataclass(frozen=True)
class RunConfig:
    """The settings of one ``em_sghmc`` / ``sample_sghmc`` run (see ``em_sghmc`` for their meaning)."""

    em: bool
    target_sparsity: float
    chains: int
    samples: int
    epochs: int
    burn_in: int | None
    batch_size: int
    step_size: float | Schedule
    friction: float
    temperature: float
    preconditioner: bool
    noise: str
    em_every: int
    prune_start: float
    prune_end: float
    prune_steps: int
    beta_prior: tuple[float, float] = (1.0, 1.0)
    slab_prior: tuple[float, float] = (1.0, 1.0)
    spike_prior: tuple[float, float] | None = None
    spike_scale: float | str | None = None
    spike_fraction: float = 0.02
    seed: int | None = None
    checkpoint: str | os.PathLike | None = None
    resume: bool = False
    progress: bool | None = None
    metadata: dict[str, Any] | None = None
    callback: Callable[[dict[str, Any]], None] | None = None
    structure: str = "weight"

    def check(self) -> None:
        """A ValueError naming the first impossible setting."""
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {', '.join(map(repr, STRUCTURES))}, got {self.structure!r}")
        check_fraction("target_sparsity", self.target_sparsity)
        for name in ("chains", "samples", "epochs", "batch_size", "em_every", "prune_steps"):
            check_count(name, getattr(self, name))
        check_number("prune_start", self.prune_start, 0.0, 1.0)
        check_number("prune_end", self.prune_end, self.prune_start, 1.0)
        check_number("spike_fraction", self.spike_fraction, 0.0, 1.0, low_open=True, high_open=True)
        if not callable(self.step_size):
            check_positive("step_size", self.step_size)
        if self.burn_in is not None:
            check_number("burn_in", self.burn_in, 0, self.epochs, high_open=True, integer=True)
        if isinstance(self.spike_scale, str) and self.spike_scale not in ("auto", "per-layer"):
            raise ValueError(f"spike_scale must be 'auto', 'per-layer', a number > 0 or None, got {self.spike_scale!r}")
        if not isinstance(self.spike_scale, str | type(None)):
            check_positive("spike_scale", self.spike_scale)
        if self.resume and self.checkpoint is None:
            raise ValueError("resume=True needs a checkpoint path")
        if self.checkpoint is not None and Path(self.checkpoint).is_dir():
            raise ValueError(f"checkpoint {self.checkpoint} is a folder: give the path of a file in it, e.g. "
                             f"{Path(self.checkpoint) / 'checkpoint.pt'}")


class Chain:
    """One chain's sampler state, its inclusion averages ρ and w̄, and its kept draws; ``index``: its number
    among all the run's chains (over several processes, each process holds some of them)."""

    def __init__(self, state: SGHMCState, num_sites: int, index: int = 0):
        self.index = index
        self.state = state
        self.num_sites = num_sites
        self.inclusion: torch.Tensor | None = None
        self.unit_inclusion: torch.Tensor | None = None  # ρ_k (U,) of the units (structure="unit")
        self.weight_mean = state.position[:num_sites].detach().clone()
        self.draws: list[torch.Tensor] = []
        self.stats: dict[str, list[float]] = {}
        self.trace: dict[str, list[float]] = {}

    @property
    def weights(self) -> torch.Tensor:
        """The site weights (W,), a view of the position."""
        return self.state.position[: self.num_sites]

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state.state_dict(), "inclusion": self.inclusion, "unit_inclusion": self.unit_inclusion,
                "weight_mean": self.weight_mean, "draws": self.draws, "stats": self.stats, "trace": self.trace}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.state.load_state_dict(saved["state"])
        self.inclusion, self.weight_mean = saved["inclusion"], saved["weight_mean"]
        self.unit_inclusion = saved.get("unit_inclusion")
        self.draws, self.stats, self.trace = saved["draws"], saved["stats"], saved["trace"]


def site_spike_scales(initial: dict[str, torch.Tensor], prior: SpikeAndSlab, spike_scale: float | str | None,
                      fraction: float) -> dict[str, float]:
    """σ₀ per site of ``initial`` (site name -> its initial weights): ``fraction`` × the std of the site's
    initial weights ("per-layer"; the prior's σ₀ where that std is 0), one number for all (a float), or
    the prior's own (None)."""
    scales = {}
    for name, weights in initial.items():
        if spike_scale is None:
            scales[name] = float(prior.spike_scale)
        elif isinstance(spike_scale, str):
            std = float(weights.detach().float().std()) if weights.numel() > 1 else 0.0
            scales[name] = fraction * std if std > 0 else float(prior.spike_scale)
        else:
            scales[name] = float(spike_scale)
    return scales


@dataclass
class _Plan:
    """Where the run's events fall, in steps."""

    steps_per_epoch: int
    total_steps: int
    burn_steps: int
    keep_at: set[int]
    prune_at: dict[int, float]


def _plan(config: RunConfig, steps_per_epoch: int, burn_in: int) -> _Plan:
    total_steps, burn_steps = config.epochs * steps_per_epoch, burn_in * steps_per_epoch
    collect_steps = total_steps - burn_steps
    if collect_steps < config.samples:
        raise ValueError(
            f"samples={config.samples} per chain need at least as many steps after burn-in; there are "
            f"{collect_steps} ({config.epochs - burn_in} epochs of {steps_per_epoch} steps): lower samples or "
            f"burn_in, or raise epochs"
        )
    thinning = collect_steps // config.samples
    keep_at = {burn_steps + thinning * (k + 1) - 1 for k in range(config.samples)}
    prune_at = {}
    if config.em and (config.target_sparsity > 0 or config.structure == "unit"):
        for k in range(1, config.prune_steps + 1):
            fraction = config.prune_start + (config.prune_end - config.prune_start) * k / config.prune_steps
            sparsity = config.target_sparsity * (1 - (1 - k / config.prune_steps) ** 3)
            prune_at[max(0, round(fraction * burn_steps) - 1)] = sparsity
    return _Plan(steps_per_epoch, total_steps, burn_steps, keep_at, prune_at)


def _start_em(sampler: SGHMC, runs: list[Chain], site_layout: list, spike_scales: dict[str, float],
              prior: SpikeAndSlab, config: RunConfig, units: UnitLayout | None = None) -> SharedEM:
    """The shared EM state from the prior and the per-site σ₀ (with ``units``: a group spike-and-slab over
    them); each chain's ρ = γ(its initial weights) and its adaptive-L2 precision."""
    device = runs[0].state.position.device
    sizes = torch.tensor([shape.numel() for _, shape in site_layout], device=device)
    groups = torch.repeat_interleave(torch.arange(len(site_layout), device=device), sizes)
    spike = torch.tensor([spike_scales[name] for name, _ in site_layout], device=device)
    if units is None:
        shared = SharedEM(prior, spike, groups, config.chains, config)
    else:
        shared = SharedUnitEM(prior, spike, groups, config.chains, config, units)
    for run in runs:
        if units is None:
            run.inclusion = shared.mixture().inclusion_probability(run.weights).detach()
        else:
            run.inclusion, run.unit_inclusion = shared.responsibilities(run.weights.detach(),
                                                                        run.state.mask[: run.num_sites])
        run.state.prior_precision = sampler.site_vector(run.state, 0.0)
        _set_precision(sampler, run, shared)
    return shared


def _set_precision(sampler: SGHMC, run: Chain, shared: SharedEM) -> None:
    """The chain's adaptive-L2 precision λ / N from its ρ and the shared hyperparameters."""
    torch.div(shared.precision(run.inclusion), sampler.dataset_size, out=run.state.prior_precision[: run.num_sites])
    sampler.refresh(run.state)


def _averaging_weight(k: int, plan: _Plan, em_every: int) -> float:
    """ω of the E/M-step after step k: (j + 10)^(−0.7) for the j-th E-step (j ≥ 1) of a run, and
    (i + 1)^(−0.7) for the i-th E-step (i ≥ 0) after the latest pruning event.

    Deviation from Deng et al. (2019), whose ω_k = (k + 10)^(−0.7) runs on from the start: a pruning
    event changes the statistics at once (removed weights count as spike), and averages that still
    remember the dense network make the hyperparameters lag their fixed point by the end of a short
    burn-in (a digits check: shared π 0.24 at the end of burn-in against 0.10 implied by the draws).
    The averaging therefore restarts at each pruning event (the first E-step after it jumps to the
    new statistics), and the last event (``prune_end``) leaves the rest of burn-in for it to settle."""
    pruned_before = [step for step in plan.prune_at if step < k]
    if not pruned_before:
        return ((k + 1) // em_every + 10) ** -0.7
    since = (k + 1) // em_every - (max(pruned_before) + 1) // em_every - 1  # E-steps since, before this one
    return (max(since, 0) + 1) ** -0.7


def _em_step(sampler: SGHMC, runs: list[Chain], shared: SharedEM, rate: float, world: World = SINGLE_PROCESS) -> None:
    """An E-step of every chain, then one M-step on the chains' pooled statistics (``rate``: ω): over several
    processes, the statistics of their chains are summed by one all-reduce, so all get the same M-step."""
    with torch.no_grad():
        statistics = []
        for run in runs:
            gamma, unit_gamma = shared.responsibilities(run.weights, run.state.mask[: run.num_sites])
            run.inclusion.lerp_(gamma, rate)
            if unit_gamma is not None:
                run.unit_inclusion.lerp_(unit_gamma, rate)
            run.weight_mean.lerp_(run.weights, rate)
            statistics.append(shared.statistics_of(gamma, run.weights, unit_gamma))
        pooled = all_reduced(pool_statistics(statistics), world)
        for key, value in shared.statistics.items():
            value.lerp_(pooled[key].to(value), rate)
        shared.hyper.update(shared.map_of(shared.statistics))
        for run in runs:
            _set_precision(sampler, run, shared)


def _prune(sampler: SGHMC, run: Chain, sparsity: float) -> None:
    """Keep the (1 − sparsity) fraction of site weights with the highest score ρ·|w̄| (ties: |w|)."""
    state = run.state
    with torch.no_grad():
        weights = run.weights
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


def _log_prior(prior: Prior | None, run: Chain, shared: SharedEM | None) -> float:
    """log p(θ) of the chain's active site weights where the sampler's loss leaves it out: the shared
    spike-and-slab (EM) or the model's prior applied as an L2 term (``state.prior_precision``); 0 where
    the loss holds the prior itself. Pruned weights are removed from the model, not held at 0, so they
    add nothing (as for a guide)."""
    if shared is None and run.state.prior_precision is None:
        return 0.0
    with torch.no_grad():
        mask = run.state.mask[: run.num_sites]
        if shared is not None:
            return float(shared.log_prior(run.weights, mask))
        return float(prior.log_prob(run.weights)[mask].sum())


def _sparsity(run: Chain) -> float:
    """The fraction of the chain's site weights removed (0 without sites)."""
    return 1.0 - float(run.state.mask[: run.num_sites].sum()) / run.num_sites if run.num_sites else 0.0


def _record(sampler: SGHMC, run: Chain, prior: Prior | None, shared: SharedEM | None, k: int,
            n: int, seed: int) -> dict[str, float]:
    """The trace record of a chain after step k (``seed``: of the conditional hyperparameter draw)."""
    state = run.state
    record = {"step": float(k + 1), "step_size": float(sampler.step_size(k)),
              "log_joint": -n * float(state.loss) + _log_prior(prior, run, shared), "sparsity": _sparsity(run)}
    if shared is not None:
        record.update(_shared_values(shared))
        record.update(shared.unit_values())
        with torch.no_grad():
            record.update(shared.implied(run.weights, state.mask[: run.num_sites], seed))
    return record


def _shared_values(shared: SharedEM) -> dict[str, float]:
    """π, σ₁ and the mean over weights of σ₀, as floats."""
    return {"inclusion": float(shared.hyper["inclusion"]), "slab_scale": float(shared.hyper["slab_scale"]),
            "spike_scale": float(shared.spike_per_weight.mean())}


def _epoch_row(per_chain: list[tuple[float, float, float | None]], epoch: int, seconds: float, nll: float,
               shared: SharedEM | None, n: int) -> dict[str, Any]:
    """The history row of an epoch (see ``SGHMCResult.history``) from each chain's (log prior of its active
    weights, sparsity, last step size)."""
    log_prior = sum(row[0] for row in per_chain) / len(per_chain)
    row = {"epoch": epoch + 1, "neg_log_joint": nll - log_prior / n, "nll": nll, "log_joint": -n * nll + log_prior,
           "sparsity": sum(row[1] for row in per_chain) / len(per_chain), "step_size": per_chain[0][2],
           "seconds": seconds}
    if shared is not None:
        row.update(_shared_values(shared))
        row.update(shared.unit_values())
    return row


def _split_sites(flat: torch.Tensor, site_layout) -> dict[str, torch.Tensor]:
    """A (W,) site vector as site -> tensor of the site's shape."""
    pieces = flat.split([shape.numel() for _, shape in site_layout])
    return {name: piece.reshape(shape).clone() for (name, shape), piece in zip(site_layout, pieces, strict=True)}


def sghmc_result(make_posterior, prior, runs, site_layout, shared, initial_hyper, history,
                 spike_scales) -> SGHMCResult:
    """The ``SGHMCResult`` of finished chains; ``make_posterior(samples, chains, **stats)`` builds the
    posterior of the draws; ``prior`` (None: none to learn or restore) gets the shared EM estimates."""
    layout = runs[0].state.layout
    draws = torch.stack([draw for run in runs for draw in run.draws])  # (C·D, P), chain-major
    names = [name for name, _ in layout]
    pieces = draws.split([shape.numel() for _, shape in layout], dim=1)
    samples = {name: piece.reshape(len(draws), *shape) for name, piece, (_, shape) in zip(names, pieces, layout,
                                                                                           strict=True)}
    stats = {key: torch.tensor([run.stats[key] for run in runs]) for key in runs[0].stats}
    hyperparameters = {}
    if shared is not None:  # per chain and draw, what the draw implies (the shared values are constant)
        hyperparameters = {"inclusion": stats.pop("conditional_inclusion"),
                           "slab_scale": stats.pop("conditional_slab_scale")}
    if "conditional_unit_inclusion" in stats:
        hyperparameters["unit_inclusion"] = stats.pop("conditional_unit_inclusion")
    for key in ("step", "inclusion", "slab_scale", "spike_scale", "implied_inclusion", "implied_slab_scale",
                "unit_inclusion", "implied_unit_inclusion"):
        stats.pop(key, None)
    sample_stats = {"lp": stats.pop("log_joint"), **stats}
    posterior = make_posterior(samples, len(runs), sample_stats=sample_stats, hyperparameters=hyperparameters)
    traces = {key: torch.tensor([run.trace[key] for run in runs]) for key in runs[0].trace}
    num_sites = runs[0].num_sites
    masks = {name: torch.stack([mask for mask in per_chain]) for name, per_chain in
             _transpose([_split_sites(run.state.mask[:num_sites], site_layout) for run in runs]).items()}
    inclusion = {}
    unit_masks, unit_inclusion = unit_result(shared, runs)
    posterior.unit_masks, posterior.unit_inclusion = unit_masks, unit_inclusion
    if shared is not None:
        inclusion = _split_sites(torch.stack([run.inclusion for run in runs]).mean(0), site_layout)
        with torch.no_grad():  # the model's prior: the shared hyperparameters (σ₀: its mean over weights)
            for name, value in _shared_values(shared).items():
                getattr(prior, name).fill_(value)
    else:
        for name, value in initial_hyper.items():
            prior.get_buffer(name).copy_(value)
    return SGHMCResult(posterior, traces, inclusion, masks, history, dict(spike_scales), unit_inclusion, unit_masks)


def _transpose(per_chain: list[dict[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    return {name: [chain[name] for chain in per_chain] for name in per_chain[0]}


def _what_is_not_finite(state: SGHMCState, chain: int) -> str:
    """Which of a non-finite chain's position and minibatch loss went wrong, in words."""
    if not bool(torch.isfinite(state.loss)):
        return f"the minibatch loss of chain {chain + 1} is {float(state.loss)}"
    return f"the weights of chain {chain + 1} are not finite"

class Diverged(Exception):
    """A chain's position or loss, or a hyperparameter, became NaN or infinite; the message says which
    (the loop adds where, and raises ``errors.TrainingDiverged``)."""


@dataclass
class EMState:
    """Every chain and the shared EM state of one run.

    chains: one ``Chain`` each (sampler state, ρ and w̄ averages, kept draws, traces); shared: the
    hyperparameters all chains share and their averaged statistics (None without EM); step: the
    number of steps taken (every chain has taken that many); seed: the run's base seed.
    """

    chains: list[Chain]
    shared: SharedEM | None
    seed: int
    step: int = 0


class EMSGHMC:
    """EM-SGHMC (dense SGHMC when ``config.em`` is False) as ``init`` / ``step`` / ``result`` (module
    docstring).

    Over several processes (``world``) the run's ``config.chains`` chains are dealt out round-robin (chain c
    to process c mod K); each process steps its own chains on its own batches, the E/M-step sums the
    chains' statistics over the processes in one all-reduce, divergence checks agree, and ``result`` and
    ``history_row`` gather every chain, so every process ends with the whole run. Chain c starts, draws its
    noise and is recorded exactly as chain c of a one-process run.

    Args:
        target: what to sample (``sampling_target``: a BayesianNetwork or any Pyro model).
        config: the run's settings.
        dataset_size: N, the number of training examples.
        steps_per_epoch: minibatches per pass over the data (default ⌈N / config.batch_size⌉); with the
            epochs, it sets the plan.
        world: the processes that share the chains (default: this one alone).
    """

    def __init__(self, target: NetworkTarget | PyroTarget, config: RunConfig, dataset_size: int,
                 steps_per_epoch: int | None = None, world: World = SINGLE_PROCESS):
        config.check()
        if config.structure == "unit" and not isinstance(target, NetworkTarget):
            raise ValueError("structure='unit' needs a ps.BayesianNetwork (its units are found by tracing the "
                             "network): for a Pyro model use structure='weight'")
        if config.chains < world.size:
            raise ValueError(f"chains={config.chains} cannot be spread over {world.size} processes: give at least "
                             f"one chain per process")
        self.target, self.config, self.dataset_size, self.world = target, config, dataset_size, world
        self.burn_in = config.epochs // 2 if config.burn_in is None else config.burn_in
        steps_per_epoch = math.ceil(dataset_size / config.batch_size) if steps_per_epoch is None else steps_per_epoch
        self.plan = _plan(config, steps_per_epoch, self.burn_in)
        self.sampler = target.sampler(step_size=config.step_size, friction=config.friction,
                                      temperature=config.temperature, preconditioner=config.preconditioner,
                                      burn_in=self.plan.burn_steps, noise=config.noise)
        prior = target.prior
        self.initial_hyper = {} if prior is None else {name: value.detach().clone()
                                                        for name, value in prior.named_buffers()}
        self.site_layout: list[tuple[str, torch.Size]] = []
        self.spike_scales: dict[str, float] = {}

    @property
    def chain_indices(self) -> list[int]:
        """The chains this process runs (all of them in a one-process run)."""
        return list(range(self.world.rank, self.config.chains, self.world.size))

    def init(self, seed: int) -> EMState:
        """This process's chains at their start (``target.chain_start``), noise seeded by ``seed`` + chain; with
        EM, each chain's ρ = γ(its initial weights) under the initial hyperparameters and σ₀ per site."""
        config, target = self.config, self.target
        runs = []
        for c in self.chain_indices:
            state = self.sampler.init(target.chain_start(c, seed), seed=seed + c)
            runs.append(Chain(state, self.sampler.num_site_coords(state), index=c))
        self.site_layout = [(name, shape) for name, shape in runs[0].state.layout if name in target.site_names]
        shared = None
        if config.em:
            spike_scale = target.default_spike_scale if config.spike_scale == "auto" else config.spike_scale
            self.spike_scales = site_spike_scales(target.initial_site_values(), target.prior, spike_scale,
                                                  config.spike_fraction)
            units = target.unit_layout(runs[0].state.layout) if config.structure == "unit" else None
            shared = _start_em(self.sampler, runs, self.site_layout, self.spike_scales, target.prior, config, units)
        return EMState(runs, shared, seed)

    def step(self, state: EMState, batches: list[Any]) -> EMState:
        """Step k = ``state.step`` of this process's chains (``batches[i]``: the minibatch of its i-th chain,
        e.g. ``(x, y)``), then what the plan puts at k: an E/M-step, a pruning event, trace records, a kept
        draw. Updates ``state`` in place and returns it.

        Raises:
            Diverged: a chain checked at this step (every ``em_every`` steps and where a draw is kept or
                weights are pruned), on any process, or the M-step's hyperparameters are not finite.
        """
        plan, config, sampler = self.plan, self.config, self.sampler
        k, em_every, shared = state.step, config.em_every, state.shared
        checked = (k + 1) % em_every == 0 or k in plan.keep_at or k in plan.prune_at
        problem = None
        for run, batch in zip(state.chains, batches, strict=True):
            sampler.step(run.state, batch)
            if checked and problem is None and not bool(run.state.is_finite()):
                problem = _what_is_not_finite(run.state, run.index)
        if checked:
            problem = self.first_problem(problem)
        if problem is not None:
            raise Diverged(problem)
        if shared is not None and (k + 1) % em_every == 0 and k < plan.burn_steps:
            _em_step(sampler, state.chains, shared, _averaging_weight(k, plan, em_every), self.world)
            bad = first_non_finite(shared.hyper)
            if bad is not None:
                raise Diverged(f"the M-step gave a non-finite {bad}")
        if k in plan.prune_at and isinstance(shared, SharedUnitEM):
            prune_units(sampler, state.chains, shared, plan.prune_at[k], self.world)
        for run in state.chains:
            if k in plan.prune_at and not isinstance(shared, SharedUnitEM):
                _prune(sampler, run, plan.prune_at[k])
            if (k + 1) % em_every == 0 or k in plan.keep_at:
                record = _record(sampler, run, self.target.prior, shared, k, self.dataset_size,
                                 seed=(state.seed + 7919 * run.index) * 2**20 + k)
                if (k + 1) % em_every == 0:
                    for key, value in record.items():
                        run.trace.setdefault(key, []).append(value)
                if k in plan.keep_at:
                    run.draws.append(run.state.position.detach().clone())
                    for key, value in record.items():
                        run.stats.setdefault(key, []).append(value)
        state.step += 1
        return state

    def first_problem(self, problem: str | None) -> str | None:
        """The first process's description of a non-finite value (None when every process has none): every
        process gets the same answer, so all stop together."""
        if not self.world.active:
            return problem
        return next((found for found in gather_objects(problem, self.world) if found is not None), None)

    def all_chains(self, state: EMState) -> list[Any]:
        """Every chain of the run, in chain order: this process's own, and over several processes copies of
        the others' (their kept draws, records, ρ, masks and sampler states) gathered from every process."""
        if not self.world.active:
            return list(state.chains)
        local = [{"index": run.index, "num_sites": run.num_sites, **run.state_dict()} for run in state.chains]
        gathered = [chain for part in gather_objects(_moved(local, "cpu"), self.world) for chain in part]
        device = state.chains[0].state.position.device
        chains = []
        for saved in sorted(gathered, key=lambda chain: chain["index"]):
            saved = _moved(saved, device)
            chains.append(SimpleNamespace(
                index=saved["index"], num_sites=saved["num_sites"], draws=saved["draws"], stats=saved["stats"],
                trace=saved["trace"], inclusion=saved["inclusion"], unit_inclusion=saved.get("unit_inclusion"),
                saved=saved,
                state=SimpleNamespace(layout=saved["state"]["layout"], mask=saved["state"]["mask"],
                                      position=saved["state"]["position"],
                                      prior_precision=saved["state"]["prior_precision"])))
        return chains

    def history_row(self, state: EMState, epoch: int, seconds: float, nll: float) -> dict[str, Any]:
        """The history row of the epoch that just ended (``SGHMCResult.history``); ``nll``: its mean minibatch
        loss over every chain."""
        per_chain = [(_log_prior(self.target.prior, run, state.shared), _sparsity(run),
                      run.trace["step_size"][-1] if run.trace.get("step_size") else None) for run in state.chains]
        if self.world.active:
            per_chain = [row for part in gather_objects(per_chain, self.world) for row in part]
        return _epoch_row(per_chain, epoch, seconds, nll, state.shared, self.dataset_size)

    def restore_prior(self) -> None:
        """Put the prior's hyperparameters back to their values before the run (after a divergence)."""
        for name, value in self.initial_hyper.items():
            self.target.prior.get_buffer(name).copy_(value)

    def result(self, state: EMState, history: list[dict[str, Any]]) -> SGHMCResult:
        """The ``SGHMCResult`` of every chain's kept draws; the prior receives the shared estimates (EM)."""
        return sghmc_result(self.target.posterior, self.target.prior, self.all_chains(state), self.site_layout,
                            state.shared, self.initial_hyper, history, self.spike_scales)


def _moved(value: Any, device: torch.device | str) -> Any:
    """Tensors (nested in dicts, lists and tuples) moved to ``device``; everything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _moved(item, device) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_moved(item, device) for item in value)
    return value
