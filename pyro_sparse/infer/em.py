"""EM-SGHMC (Deng et al., 2019; Ke & Fan, 2022): SGHMC samples the weights of several chains while
an EM loop, pooled over the chains, adapts a spike-and-slab prior, and a pruning ramp removes the
weights that fall in the spike, in one shot per ramp step. ``sample_sghmc`` is the same driver
without EM or pruning (dense SGHMC).

During burn-in, every ``em_every`` steps (after every chain has taken its step):

- E-step, per chain c: ρ_c ← ρ_c + ω_k (γ(θ_c) − ρ_c), the stochastic-approximation average of each
  weight's inclusion probability γ(w) = π N(w; 0, σ₁²) / p(w), ω_k = (k + 10)^(−0.7) for the k-th
  E-step as in Deng et al., restarted at each pruning event (``_averaging_weight``). Each chain keeps
  its own ρ (its weights differ);
- M-step, shared: the sufficient statistics (Σγ, Σγw², Σ(1 − γ)w² per layer, γ = γ(θ_c) of the
  current weights; ``priors.em_statistics``) of all chains are summed (``priors.pool_statistics``:
  the same sum is an all-reduce across ranks), averaged over the E-steps with the same weights ω_k
  (stochastic approximation on the statistics, as in SAEM, started from the statistics the initial
  hyperparameters imply), and π, σ₁ (and optionally σ₀) are their MAP values
  (``priors.map_hyperparameters``). All chains sample under these shared
  hyperparameters, so chains that disagree about them show it in their diagnostics (below) instead of
  each drifting to its own value. (Jumping to the MAP values of the current statistics at once would
  shrink σ₁ to the scale of the freshly initialised weights before the data have grown them);
- the prior gradient of the next steps is the adaptive L2 −λ w, λ = ρ/σ₁² + (1 − ρ)/σ₀²
  (``priors.adaptive_precision``).

**Hyperparameters settle before draws are kept: the E- and M-steps are frozen after burn-in** (ρ, π,
σ₁, σ₀ and so the per-weight precisions stay at their end-of-burn-in values). Deviation from Deng
et al. (2019), whose weights ω_k → 0 but Σω_k = ∞ keep the hyperparameters moving for ever: in a run of
finite length they never settle (σ₁ rose 0.55 → 1.13 through the whole sampling phase of a digits run),
so the kept draws came from a moving target. Frozen, the draws sample one posterior: that of the
weights under the empirical-Bayes prior fitted in burn-in, with a constant mass matrix.

Diagnostics of the hyperparameters: at every record and kept draw, what the chain's own draw says
about π and σ₁ is recorded besides the shared values (``_SharedEM.implied``): the MAP M-step of that
chain's statistics alone, with γ(w) of the draw under the shared hyperparameters (traces
"implied_inclusion", "implied_slab_scale"), and a draw from the conditional posterior p(π, σ₁ | w)
(traces "conditional_inclusion", "conditional_slab_scale"; ``posterior.hyperparameters`` "inclusion"
and "slab_scale" per chain and draw, which is what the ArviZ export summarises). R-hat is computed on
the conditional draws: the M-step estimates barely move within a chain once the masks are fixed
(π's within-chain sd 0.001 on digits, against 0.005 for its conditional posterior given the weights),
so their R-hat only says that chains have different masks (2.0 on digits, 4 chains), while that of the
conditional draws compares the chains' disagreement with how well the weights determine π and σ₁
(1.05 and 1.18 on the same run). The shared values are in the traces and, at the end, in ``model.prior``.

σ₀ per layer: by default (``spike_scale="per-layer"``) each site's σ₀ is ``spike_fraction`` (0.02)
times the standard deviation of its initial weights (≈ 1/√(3 fan_in) for PyTorch's default
initialisation), so the spike sits well below every layer's weights whatever its width; a float
sets one σ₀ for all sites, None keeps the prior's own.

Pruning: ``prune_steps`` one-shot events between ``prune_start`` and ``prune_end`` (fractions of the
burn-in) bring each chain to sparsity s·(1 − (1 − k/K)³) at event k, removing the active weights
of lowest ρ·|w̄| (ties: lowest |w|), w̄ the stochastic-approximation average of w kept alongside ρ.
Deviation from Ke & Fan (2022) / Deng et al. (2019), who prune by ρ (or |w|) alone: ρ alone
saturates at 1 for every |w| ≫ σ₀, including weights the data do not inform, which wander as far as
the slab lets them; |w̄| is small for those. Removed weights, their momentum and their noise are
exactly zero from then on. After burn-in, ``samples`` draws per chain are kept, evenly thinned.

Step size: ε of ``infer.sghmc`` is in preconditioned units (the drift moves a coordinate by about
ε per step whatever the scale of the loss; the RMSprop scale √V is set during burn-in), so one default
serves digits, Fashion-MNIST and small tabular tasks (see ``DEFAULT_STEP_SIZE``).

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
from ..priors import SpikeAndSlab, adaptive_precision, em_statistics, map_hyperparameters, pool_statistics
from ..validation import check_count, check_fraction, check_number, check_positive, check_seed
from .sghmc import SGHMC, Schedule, SGHMCState, first_non_finite, network_parameters, sghmc


@dataclass
class SGHMCResult:
    """What ``em_sghmc`` / ``sample_sghmc`` return.

    posterior: the kept draws (``Posterior.from_samples`` with chains, sample stats and, for EM,
        the hyperparameters of each draw).
    traces: name -> (chains, records) float tensors, one record every ``em_every`` steps:
        "step", "step_size", "log_joint" (minibatch estimate of log p(θ, D)), "sparsity", and for
        EM the shared "inclusion" (π), "slab_scale" (σ₁), "spike_scale" (σ₀, the mean over weights
        of the per-layer σ₀) and the chain's own "implied_inclusion", "implied_slab_scale" (M-step
        of its statistics) and "conditional_inclusion", "conditional_slab_scale" (conditional draws).
    inclusion_probability: site -> ρ averaged over chains (site shape); empty without EM.
    masks: site -> (chains, *site shape) bool, True where the weight is kept.
    history: one dict per epoch: epoch, neg_log_joint (−log p(θ, D) / N at the epoch's end, minibatch
        estimate), nll (mean minibatch NLL per example), log_joint, sparsity, step_size, seconds
        (sampling time so far) and for EM the shared π, σ₁, σ₀ (mean over weights).
    spike_scale: site -> its σ₀ (EM; empty without).

    For EM, ``posterior.hyperparameters`` holds, per chain and draw, a draw of π and σ₁ from their
    conditional posterior given the draw's weights (diagnostics; see the module docstring), not the
    shared values (constant after burn-in, in ``traces`` and ``model.prior``).
    """

    posterior: Posterior
    traces: dict[str, torch.Tensor]
    inclusion_probability: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)
    spike_scale: dict[str, float] = field(default_factory=dict)


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

    def check(self) -> None:
        """A ValueError naming the first impossible setting."""
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
        if isinstance(self.spike_scale, str) and self.spike_scale != "per-layer":
            raise ValueError(f"spike_scale must be 'per-layer', a number > 0 or None, got {self.spike_scale!r}")
        if not isinstance(self.spike_scale, str | type(None)):
            check_positive("spike_scale", self.spike_scale)
        if self.resume and self.checkpoint is None:
            raise ValueError("resume=True needs a checkpoint path")
        if self.checkpoint is not None and Path(self.checkpoint).is_dir():
            raise ValueError(f"checkpoint {self.checkpoint} is a folder: give the path of a file in it, e.g. "
                             f"{Path(self.checkpoint) / 'checkpoint.pt'}")


class _Chain:
    """One chain's sampler state, its inclusion averages ρ and w̄, and its kept draws."""

    def __init__(self, state: SGHMCState, num_sites: int):
        self.state = state
        self.num_sites = num_sites
        self.inclusion: torch.Tensor | None = None
        self.weight_mean = state.position[:num_sites].detach().clone()
        self.draws: list[torch.Tensor] = []
        self.stats: dict[str, list[float]] = {}
        self.trace: dict[str, list[float]] = {}

    @property
    def weights(self) -> torch.Tensor:
        """The site weights (W,), a view of the position."""
        return self.state.position[: self.num_sites]

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state.state_dict(), "inclusion": self.inclusion, "weight_mean": self.weight_mean,
                "draws": self.draws, "stats": self.stats, "trace": self.trace}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.state.load_state_dict(saved["state"])
        self.inclusion, self.weight_mean = saved["inclusion"], saved["weight_mean"]
        self.draws, self.stats, self.trace = saved["draws"], saved["stats"], saved["trace"]


class _SharedEM:
    """The hyperparameters all chains share and the averaged sufficient statistics they come from.

    inclusion π, slab_scale σ₁: 0-dim; spike_scale σ₀: (G,) per site; groups: (W,) the site of each
    weight; statistics: the stochastic-approximation average of the pooled ``em_statistics``.
    """

    def __init__(self, prior: SpikeAndSlab, spike_scale: torch.Tensor, groups: torch.Tensor, chains: int,
                 config: RunConfig):
        self.config = config
        self.groups = groups
        self.hyper = {"inclusion": prior.inclusion.detach().clone(), "slab_scale": prior.slab_scale.detach().clone(),
                      "spike_scale": spike_scale.to(prior.slab_scale)}
        self.hyper["slab_scale"] = torch.maximum(self.hyper["slab_scale"], spike_scale.max() * 1.01)
        self.statistics = self._implied_statistics(chains)

    def _implied_statistics(self, chains: int) -> dict[str, torch.Tensor]:
        """Statistics of ``chains`` chains whose MAP values (flat priors) are the current hyperparameters."""
        pi, slab, spike = self.hyper["inclusion"], self.hyper["slab_scale"], self.hyper["spike_scale"]
        sizes = torch.bincount(self.groups, minlength=len(spike)).to(slab) * chains
        count = sizes.sum()
        return {"count": count, "included": count * pi, "slab_square": count * pi * slab**2,
                "spike_count": sizes * (1 - pi), "spike_square": sizes * (1 - pi) * spike**2}

    @property
    def spike_per_weight(self) -> torch.Tensor:
        """σ₀ of each site weight (W,)."""
        return self.hyper["spike_scale"][self.groups]

    def mixture(self):
        """The spike-and-slab of every site weight under the shared hyperparameters (batch shape (W,))."""
        from ..distributions import SpikeAndSlabNormal

        return SpikeAndSlabNormal(self.hyper["slab_scale"], self.spike_per_weight, self.hyper["inclusion"])

    def statistics_of(self, inclusion: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        return em_statistics(inclusion, weights, self.groups, len(self.hyper["spike_scale"]))

    def map_of(self, statistics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        config = self.config
        return map_hyperparameters(statistics, self.hyper["spike_scale"], config.beta_prior, config.slab_prior,
                                   config.spike_prior)

    def precision(self, inclusion: torch.Tensor) -> torch.Tensor:
        """The adaptive-L2 precision (W,) of a chain with inclusion averages ρ."""
        return adaptive_precision(inclusion, self.hyper["slab_scale"], self.spike_per_weight)

    def implied(self, weights: torch.Tensor, mask: torch.Tensor, seed: int) -> dict[str, float]:
        """What one chain's draw says about π and σ₁ on its own (γ = γ(w) under the shared values):

        - "implied_inclusion", "implied_slab_scale": the MAP M-step of the chain's statistics alone;
        - "conditional_inclusion", "conditional_slab_scale": a draw from their conditional posterior
          given the weights, z_j ~ Bernoulli(γ_j), π ~ Beta(a + Σz, b + p − Σz),
          σ₁² ~ InvGamma(α + Σz/2, β + Σz w²/2) (whose mode is the M-step), seeded by ``seed``.

        Removed weights count as spike (γ = z = 0)."""
        gamma = self.mixture().inclusion_probability(weights) * mask
        new = self.map_of(self.statistics_of(gamma, weights))
        (a, b), (alpha, beta) = self.config.beta_prior, self.config.slab_prior
        with torch.random.fork_rng(devices=[weights.device] if weights.is_cuda else []):
            torch.manual_seed(seed)
            z = (torch.rand(gamma.shape, device=gamma.device) < gamma).to(weights.dtype)
            included, count = z.sum(), float(weights.numel())
            gamma_draws = torch._standard_gamma(torch.stack([included + a, count - included + b,
                                                             alpha + included / 2]))
        pi = gamma_draws[0] / (gamma_draws[0] + gamma_draws[1])
        slab_variance = (beta + torch.dot(z, weights * weights) / 2) / gamma_draws[2]
        return {"implied_inclusion": float(new["inclusion"]), "implied_slab_scale": float(new["slab_scale"]),
                "conditional_inclusion": float(pi), "conditional_slab_scale": float(slab_variance.sqrt())}

    def state_dict(self) -> dict[str, Any]:
        return {"hyper": self.hyper, "statistics": self.statistics}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.hyper, self.statistics = saved["hyper"], saved["statistics"]


def site_spike_scales(model: BayesianNetwork, prior: SpikeAndSlab, spike_scale: float | str | None,
                      fraction: float) -> dict[str, float]:
    """σ₀ per site: ``fraction`` × the std of the site's initial weights ("per-layer"; the prior's σ₀
    where that std is 0), one number for all (a float), or the prior's own (None)."""
    scales = {}
    for name in model.sites:
        if spike_scale is None:
            scales[name] = float(prior.spike_scale)
        elif isinstance(spike_scale, str):
            std = float(model.initial_value(name).detach().float().std()) if model.sites[name].numel > 1 else 0.0
            scales[name] = fraction * std if std > 0 else float(prior.spike_scale)
        else:
            scales[name] = float(spike_scale)
    return scales


@dataclass
class _Plan:
    """Where the run's events fall, in steps."""

    steps_per_epoch: int
    burn_steps: int
    keep_at: set[int]
    prune_at: dict[int, float]


def _plan(config: RunConfig, n: int, burn_in: int) -> _Plan:
    steps_per_epoch = math.ceil(n / config.batch_size)
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
    if config.em and config.target_sparsity > 0:
        for k in range(1, config.prune_steps + 1):
            fraction = config.prune_start + (config.prune_end - config.prune_start) * k / config.prune_steps
            sparsity = config.target_sparsity * (1 - (1 - k / config.prune_steps) ** 3)
            prune_at[max(0, round(fraction * burn_steps) - 1)] = sparsity
    return _Plan(steps_per_epoch, burn_steps, keep_at, prune_at)


def _run(model: BayesianNetwork, data, config: RunConfig) -> SGHMCResult:
    config.check()
    burn_in = config.epochs // 2 if config.burn_in is None else config.burn_in
    seed = check_seed(config.seed)
    prior, em = model.prior, config.em
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
    plan = _plan(config, n, burn_in)

    base_seed = int(torch.randint(2**62, ()).item()) if seed is None else seed
    sampler = sghmc(model, config.step_size, friction=config.friction, temperature=config.temperature,
                    preconditioner=config.preconditioner, burn_in=plan.burn_steps, noise=config.noise)
    initial_hyper = {name: value.detach().clone() for name, value in prior.named_buffers()}
    runs = []
    for c in range(config.chains):
        state = sampler.init(_chain_start(model, c, base_seed), seed=base_seed + c)
        runs.append(_Chain(state, sampler.num_site_coords(state)))
    site_layout = [(name, shape) for name, shape in runs[0].state.layout if name in model.sites]
    shared, spike_scales = None, {}
    if em:
        spike_scales = site_spike_scales(model, prior, config.spike_scale, config.spike_fraction)
        shared = _start_em(sampler, runs, site_layout, spike_scales, prior, config)
    shuffle = torch.Generator().manual_seed(base_seed)
    history: list[dict[str, Any]] = []
    start_epoch, seconds, last_saved = 0, 0.0, None
    checkpoint = config.checkpoint
    if config.resume and Path(checkpoint).is_file():
        saved = checkpoints.load(checkpoint, map_location=device)
        _load_chains(runs, saved, checkpoint, em)
        if shared is not None:
            shared.load_state_dict(saved["em"])
        shuffle.set_state(saved["shuffle_rng"])
        history, start_epoch, last_saved = saved["history"], saved["epoch"], checkpoint
        seconds = history[-1]["seconds"] if history else 0.0

    def diverged(epoch: int, step: int, what: str) -> TrainingDiverged:
        for name, value in initial_hyper.items():  # leave the model's prior as it was given, not NaN
            prior.get_buffer(name).copy_(value)
        return TrainingDiverged(f"epoch {epoch + 1}, step {step + 1}", what, "step_size", last_saved)

    bar = tqdm(range(start_epoch, config.epochs), initial=start_epoch, total=config.epochs,
               disable=not config.progress, desc="em-sghmc")
    model.train()
    em_every = config.em_every
    for epoch in bar:
        started = time.perf_counter()
        orders = [torch.randperm(n, generator=shuffle).to(device) for _ in runs]
        nll_sum = torch.zeros((), device=device)
        for step in range(plan.steps_per_epoch):
            k = epoch * plan.steps_per_epoch + step
            checked = (k + 1) % em_every == 0 or k in plan.keep_at or k in plan.prune_at
            for c, (run, order) in enumerate(zip(runs, orders, strict=True)):
                index = order[step * config.batch_size: (step + 1) * config.batch_size]
                state = sampler.step(run.state, (x[index], y[index]))
                nll_sum += state.loss
                if checked and not bool(state.is_finite()):
                    raise diverged(epoch, step, _what_is_not_finite(state, c))
            if shared is not None and (k + 1) % em_every == 0 and k < plan.burn_steps:
                _em_step(sampler, runs, shared, _averaging_weight(k, plan, em_every))
                bad = first_non_finite(shared.hyper)
                if bad is not None:
                    raise diverged(epoch, step, f"the M-step gave a non-finite {bad}")
            for c, run in enumerate(runs):
                if k in plan.prune_at:
                    _prune(sampler, run, plan.prune_at[k])
                if (k + 1) % em_every == 0 or k in plan.keep_at:
                    record = _record(sampler, run, model, shared, k, n, seed=(base_seed + 7919 * c) * 2**20 + k)
                    if (k + 1) % em_every == 0:
                        for key, value in record.items():
                            run.trace.setdefault(key, []).append(value)
                    if k in plan.keep_at:
                        run.draws.append(run.state.position.detach().clone())
                        for key, value in record.items():
                            run.stats.setdefault(key, []).append(value)
        seconds += time.perf_counter() - started
        what = _what_is_not_finite_at_epoch_end(runs, nll_sum)
        if what is not None:
            raise diverged(epoch, plan.steps_per_epoch - 1, what)
        nll = float(nll_sum) / (plan.steps_per_epoch * len(runs))
        row = _epoch_row(runs, epoch, seconds, nll, model, shared, n)
        history.append(row)
        bar.set_postfix(neg_log_joint=f"{row['neg_log_joint']:.4f}", sparsity=f"{row['sparsity']:.3f}")
        if checkpoint is not None:
            checkpoints.save({"chains": [run.state_dict() for run in runs], "shuffle_rng": shuffle.get_state(),
                              "em": None if shared is None else shared.state_dict(),
                              "history": history, "epoch": epoch + 1, "epochs": config.epochs, "burn_in": burn_in,
                              "metadata": config.metadata or {}, "model": model.state_dict()}, checkpoint)
            last_saved = checkpoint
        if config.callback is not None:
            config.callback(row)
    bar.close()
    return _result(model, runs, site_layout, shared, initial_hyper, history, spike_scales)


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
    if bool(saved.get("em")) != em:
        writer, reader = ("sample_sghmc", "em_sghmc") if em else ("em_sghmc", "sample_sghmc")
        raise CheckpointError(path, f"it was written by {writer}, not {reader}; resume with {writer}, {fix}")
    for run, chain_saved in zip(runs, saved["chains"], strict=True):
        try:
            layout = tuple((name, torch.Size(shape)) for name, shape in chain_saved["state"]["layout"])
            if layout != run.state.layout:
                raise RuntimeError(_layout_difference(layout, run.state.layout))
            run.load_state_dict(chain_saved)
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
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


def _start_em(sampler: SGHMC, runs: list[_Chain], site_layout: list, spike_scales: dict[str, float],
              prior: SpikeAndSlab, config: RunConfig) -> _SharedEM:
    """The shared EM state from the prior and the per-site σ₀; each chain's ρ = γ(its initial weights)
    and its adaptive-L2 precision."""
    device = runs[0].state.position.device
    sizes = torch.tensor([shape.numel() for _, shape in site_layout], device=device)
    groups = torch.repeat_interleave(torch.arange(len(site_layout), device=device), sizes)
    spike = torch.tensor([spike_scales[name] for name, _ in site_layout], device=device)
    shared = _SharedEM(prior, spike, groups, config.chains, config)
    for run in runs:
        run.inclusion = shared.mixture().inclusion_probability(run.weights).detach()
        run.state.prior_precision = sampler.site_vector(run.state, 0.0)
        _set_precision(sampler, run, shared)
    return shared


def _set_precision(sampler: SGHMC, run: _Chain, shared: _SharedEM) -> None:
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


def _em_step(sampler: SGHMC, runs: list[_Chain], shared: _SharedEM, rate: float) -> None:
    """An E-step of every chain, then one M-step on the chains' pooled statistics (``rate``: ω)."""
    with torch.no_grad():
        mixture = shared.mixture()
        statistics = []
        for run in runs:
            gamma = mixture.inclusion_probability(run.weights).mul_(run.state.mask[: run.num_sites])
            run.inclusion.lerp_(gamma, rate)
            run.weight_mean.lerp_(run.weights, rate)
            statistics.append(shared.statistics_of(gamma, run.weights))
        pooled = pool_statistics(statistics)
        for key, value in shared.statistics.items():
            value.lerp_(pooled[key].to(value), rate)
        shared.hyper.update(shared.map_of(shared.statistics))
        for run in runs:
            _set_precision(sampler, run, shared)


def _prune(sampler: SGHMC, run: _Chain, sparsity: float) -> None:
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


def _log_prior(model: BayesianNetwork, run: _Chain, shared: _SharedEM | None) -> float:
    """log p(θ) of the chain's active site weights: the model's prior, or the shared spike-and-slab (EM).
    Pruned weights are removed from the model, not held at 0, so they add nothing (as for a guide)."""
    with torch.no_grad():
        log_prob = (model.prior if shared is None else shared.mixture()).log_prob(run.weights)
        return float(log_prob[run.state.mask[: run.num_sites]].sum())


def _record(sampler: SGHMC, run: _Chain, model: BayesianNetwork, shared: _SharedEM | None, k: int,
            n: int, seed: int) -> dict[str, float]:
    """The trace record of a chain after step k (``seed``: of the conditional hyperparameter draw)."""
    state = run.state
    record = {"step": float(k + 1), "step_size": float(sampler.step_size(k)),
              "log_joint": -n * float(state.loss) + _log_prior(model, run, shared),
              "sparsity": 1.0 - float(state.mask[: run.num_sites].sum()) / run.num_sites}
    if shared is not None:
        record.update(_shared_values(shared))
        with torch.no_grad():
            record.update(shared.implied(run.weights, state.mask[: run.num_sites], seed))
    return record


def _shared_values(shared: _SharedEM) -> dict[str, float]:
    """π, σ₁ and the mean over weights of σ₀, as floats."""
    return {"inclusion": float(shared.hyper["inclusion"]), "slab_scale": float(shared.hyper["slab_scale"]),
            "spike_scale": float(shared.spike_per_weight.mean())}


def _epoch_row(runs, epoch, seconds, nll, model, shared, n) -> dict[str, Any]:
    log_prior = sum(_log_prior(model, run, shared) for run in runs) / len(runs)
    row = {"epoch": epoch + 1, "neg_log_joint": nll - log_prior / n, "nll": nll, "log_joint": -n * nll + log_prior,
           "sparsity": sum(1.0 - float(r.state.mask[: r.num_sites].sum()) / r.num_sites for r in runs) / len(runs),
           "step_size": float(runs[0].trace["step_size"][-1]) if runs[0].trace.get("step_size") else None,
           "seconds": seconds}
    if shared is not None:
        row.update(_shared_values(shared))
    return row


def _split_sites(flat: torch.Tensor, site_layout) -> dict[str, torch.Tensor]:
    """A (W,) site vector as site -> tensor of the site's shape."""
    pieces = flat.split([shape.numel() for _, shape in site_layout])
    return {name: piece.reshape(shape).clone() for (name, shape), piece in zip(site_layout, pieces, strict=True)}


def _result(model, runs, site_layout, shared, initial_hyper, history, spike_scales) -> SGHMCResult:
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
    for key in ("step", "inclusion", "slab_scale", "spike_scale", "implied_inclusion", "implied_slab_scale"):
        stats.pop(key, None)
    sample_stats = {"lp": stats.pop("log_joint"), **stats}
    posterior = Posterior.from_samples(model, samples, chains=len(runs), sample_stats=sample_stats,
                                       hyperparameters=hyperparameters)
    traces = {key: torch.tensor([run.trace[key] for run in runs]) for key in runs[0].trace}
    num_sites = runs[0].num_sites
    masks = {name: torch.stack([mask for mask in per_chain]) for name, per_chain in
             _transpose([_split_sites(run.state.mask[:num_sites], site_layout) for run in runs]).items()}
    inclusion = {}
    if shared is not None:
        inclusion = _split_sites(torch.stack([run.inclusion for run in runs]).mean(0), site_layout)
        with torch.no_grad():  # the model's prior: the shared hyperparameters (σ₀: its mean over weights)
            for name, value in _shared_values(shared).items():
                getattr(model.prior, name).fill_(value)
    else:
        for name, value in initial_hyper.items():
            model.prior.get_buffer(name).copy_(value)
    return SGHMCResult(posterior, traces, inclusion, masks, history, dict(spike_scales))


def _transpose(per_chain: list[dict[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    return {name: [chain[name] for chain in per_chain] for name in per_chain[0]}


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
    layout = saved["chains"][0]["state"]["layout"]
    site_layout = [(name, torch.Size(shape)) for name, shape in layout if name in model.sites]
    num_sites = sum(shape.numel() for _, shape in site_layout)
    runs = [SimpleNamespace(state=SimpleNamespace(layout=chain["state"]["layout"], mask=chain["state"]["mask"]),
                            draws=chain["draws"], stats=chain["stats"], trace=chain["trace"],
                            inclusion=chain["inclusion"], num_sites=num_sites) for chain in saved["chains"]]
    shared = None
    if saved.get("em"):
        shared = SimpleNamespace(**saved["em"])
        shared.spike_per_weight = shared.hyper["spike_scale"].repeat_interleave(
            torch.tensor([shape.numel() for _, shape in site_layout]))
    spike_scales = {} if shared is None else dict(zip((name for name, _ in site_layout),
                                                       shared.hyper["spike_scale"].tolist(), strict=True))
    initial = {name: value.detach().clone() for name, value in model.prior.named_buffers()}
    return _result(model, runs, site_layout, shared, initial, saved["history"], spike_scales)


# ε in preconditioned units. Chosen on validation splits (20 % of the training data) of digits, breast
# cancer, wine and 3000 Fashion-MNIST images, 2000 steps per chain, 90 % and 0 % sparsity
# (``benchmarks/em_sghmc.py --part validation``): at 90 % sparsity 3e-4 falls behind (wine 92.6 % against
# 100 %, Fashion 80.3 % against 82.8 %), 3e-3 diverged on the Fashion-MNIST subset without pruning and 1e-2
# at both sparsities; 1e-3 was within 1.2 points of the best step size on every task and never diverged.
DEFAULT_STEP_SIZE = 1e-3


def em_sghmc(
    model: BayesianNetwork,
    data,
    target_sparsity: float = 0.9,
    chains: int = 2,
    samples: int = 32,
    epochs: int = 10,
    burn_in: int | None = None,
    batch_size: int = 128,
    step_size: float | Schedule = DEFAULT_STEP_SIZE,
    friction: float = 0.1,
    temperature: float = 1.0,
    preconditioner: bool = True,
    noise: str = "gaussian",
    em_every: int = 10,
    prune_start: float = 0.2,
    prune_end: float = 0.6,
    prune_steps: int = 4,
    beta_prior: tuple[float, float] = (1.0, 1.0),
    slab_prior: tuple[float, float] = (1.0, 1.0),
    spike_prior: tuple[float, float] | None = None,
    spike_scale: float | str | None = "per-layer",
    spike_fraction: float = 0.02,
    seed: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool | None = None,
    metadata: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> SGHMCResult:
    """Sample a sparse posterior of ``model`` (SpikeAndSlab prior) by SGHMC with EM and pruning.

    Args:
        model: a BayesianNetwork with a ``priors.SpikeAndSlab`` prior (its π and σ₁ are the initial
            values; at the end the prior holds the shared estimates, σ₀ their mean over weights).
        data: training data ((x, y), a TensorDataset or a ``ps.data.Dataset``).
        target_sparsity: s ∈ [0, 1), the fraction of Bayesian weights removed by the ramp (0: none).
        chains: number of chains (run side by side, step by step, sharing the hyperparameters).
        samples: draws kept per chain after burn-in (evenly thinned).
        epochs: passes over the data per chain; burn_in: how many of them are burn-in (default half):
            the preconditioner and the hyperparameters adapt and the pruning ramp runs there, no
            draws are kept; both are frozen after it.
        batch_size, step_size, friction, temperature, preconditioner, noise: SGHMC (``infer.sghmc``);
            ``step_size`` is ε in preconditioned units (about the distance a coordinate drifts per
            step), or a schedule ``step -> ε``. The default was chosen on validation splits of
            digits, breast cancer, wine and a Fashion-MNIST subset (``benchmarks/em_sghmc.py``).
        em_every: steps between E/M-steps (and trace records).
        prune_start, prune_end, prune_steps: the pruning ramp (fractions of the burn-in steps, events).
        beta_prior: (a, b) of π's Beta prior; slab_prior, spike_prior: (α, β) of the inverse-gamma
            priors of σ₁², σ₀² (spike_prior None: σ₀ fixed; otherwise estimated per site).
        spike_scale: σ₀: "per-layer" (default): ``spike_fraction`` × the std of each site's initial
            weights, so the spike lies well below every layer's weights; a number: that σ₀ for every
            site; None: the prior's σ₀. The result's ``spike_scale`` lists the values used.
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
    config = RunConfig(True, target_sparsity, chains, samples, epochs, burn_in, batch_size, step_size, friction,
                       temperature, preconditioner, noise, em_every, prune_start, prune_end, prune_steps,
                       beta_prior or (1.0, 1.0), slab_prior or (1.0, 1.0), spike_prior, spike_scale, spike_fraction,
                       seed, checkpoint, resume, progress, metadata, callback)
    return _run(model, data, config)


def sample_sghmc(
    model: BayesianNetwork,
    data,
    chains: int = 2,
    samples: int = 32,
    epochs: int = 10,
    burn_in: int | None = None,
    batch_size: int = 128,
    step_size: float | Schedule = DEFAULT_STEP_SIZE,
    friction: float = 0.1,
    temperature: float = 1.0,
    preconditioner: bool = True,
    noise: str = "gaussian",
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
    config = RunConfig(False, 0.0, chains, samples, epochs, burn_in, batch_size, step_size, friction, temperature,
                       preconditioner, noise, record_every, 0.2, 0.6, 1, seed=seed, checkpoint=checkpoint,
                       resume=resume, progress=progress, metadata=metadata, callback=callback)
    return _run(model, data, config)


__all__ = ["DEFAULT_STEP_SIZE", "RunConfig", "SGHMCResult", "em_sghmc", "restore_result", "sample_sghmc",
           "site_spike_scales"]
