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
about π and σ₁ is recorded besides the shared values (``SharedEM.implied``): the MAP M-step of that
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

**Unit-level sparsity (``structure="unit"``): a group spike-and-slab.** The incoming weights of each
removable unit k (a neuron of a Linear, an output channel of a convolution, or channels tied by a residual
addition: ``units.unit_groups``; n_k active weights w_kj over all of its Bayesian producers) share one
inclusion variable z_k ~ Bernoulli(π_u): p(w_k) = π_u Π_j N(w_kj; 0, σ₁²) + (1 − π_u) Π_j N(w_kj; 0, σ₀_j²),
σ₀_j the σ₀ of the weight's layer. The weights in no unit (the output layer, whose outputs are the logits)
keep the per-weight spike-and-slab with their own π. Then

- E-step: ρ_k = σ(logit π_u + Σ_j [log N(w_kj; 0, σ₁²) − log N(w_kj; 0, σ₀_j²)])
  (``priors.group_inclusion_probability``), averaged over E-steps as above; every weight of unit k gets
  the adaptive-L2 precision ρ_k/σ₁² + (1 − ρ_k)/σ₀_j²;
- M-step (``priors.group_em_statistics``, ``map_hyperparameters``): π_u = (Σ_k ρ_k + a − 1) / (U + a + b − 2)
  over the U units; π over the free weights as before; one slab,
  σ₁² = (Σ_k ρ_k Σ_j w_kj² + Σ_free γ_j w_j² + 2β) / (Σ_k ρ_k n_k + Σ_free γ_j + 2α + 2); σ₀² per layer as
  before, each weight with its ρ. Removed units count as spike (ρ_k = 0, still among the U), as removed
  weights do. Every statistic is a sum over units and weights, so chains and processes still pool by
  summing. With one weight per unit (n_k = 1) all of this is the per-weight E- and M-step;
- pruning: at each event of the ramp (also with ``target_sparsity=0``), the units whose ρ_k averaged over
  all chains is below 1/2 are removed (the median probability model of Barbieri & Berger, 2004), then
  the units of lowest score Σ_chains ρ_k · rms(w̄ in) · rms(w̄ out) / (its mean over the layer's kept
  units) until a fraction ``target_sparsity`` of the units is gone (rms: root mean squares of the
  averaged incoming weights and of the Bayesian outgoing weights, the readers' columns;
  ``em_units.unit_scores`` compares it with alternatives); every layer keeps at least one unit. As ρ
  per weight, ρ_k saturates at 1 for a unit whose weights lie well above σ₀, whether the data need it or
  not (a 16-unit student of a 3-unit teacher: all 16 ρ_k = 1 after burn-in without the ramp), so the ramp
  does most of the removing. A removed unit takes its incoming weights, its bias, its BatchNorm γ and β
  and the readers' columns with it (exactly zero in the sampler from then on, so its output is exactly
  zero in every draw). Units are removed **alike in every chain** (the decision uses sums over chains):
  all draws share one smaller architecture, which ``sparse.export`` cuts out (``posterior.unit_masks``).
  Since ρ is frozen after burn-in, ρ_k averaged over chains is also its mean over the kept draws:
  ``result.unit_inclusion`` / ``posterior.unit_inclusion`` (0 for removed units).

Deviations from Deng et al. (2019), whose spike-and-slab is per weight: the inclusion variable is per unit
(a group prior, as in structured spike-and-slab regression), because removing single weights does not make
a network faster on CPUs or GPUs, and removing units does; and units are removed alike in all chains,
although the units of different chains are not aligned (a network's units can be permuted): a unit one
chain uses may go because the others do not, and the pruning ramp, spread over burn-in, lets that chain
move the work to the units left before any draw is kept.

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

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import checkpoint as checkpoints
from ..batches import TensorBatches, batch_source
from ..distributed import broadcast_, check_same, current_world, gather_objects, sum_
from ..errors import CheckpointError, TrainingDiverged
from ..model import BayesianNetwork
from ..posterior import Posterior
from ..validation import check_seed
from .em_kernel import (
    EMSGHMC,
    Chain,
    Diverged,
    RunConfig,
    SGHMCResult,
    sghmc_result,
    site_spike_scales,
)
from .sampling_target import sampling_target
from .sghmc import Schedule, first_non_finite


def _run(model: BayesianNetwork | Callable, data, config: RunConfig) -> SGHMCResult:
    """Shuffle the data by epoch, step ``EMSGHMC`` through the plan, record, checkpoint and report."""
    config.check()
    base_seed = check_seed(config.seed)
    base_seed = int(torch.randint(2**62, ()).item()) if base_seed is None else base_seed
    source = batch_source(data, config.batch_size)
    n = source.dataset_size
    whole = isinstance(model, BayesianNetwork) and isinstance(source, TensorBatches)  # check every example
    target = sampling_target(model, config.em, *((source.x, source.y) if whole else source.example), dataset_size=n)
    source.to(target.device)
    world = current_world(target.device)  # under torchrun: the chains are dealt out to the processes
    if world.active:
        settings = {key: getattr(value, "__qualname__", None) or str(value) if callable(value) else value
                    for key, value in vars(config).items() if key not in ("callback", "progress", "metadata")}
        check_same("em_sghmc's settings", {**settings, "checkpoint": str(config.checkpoint), "n": n}, world)
        base_seed = gather_objects(base_seed, world)[0]
        if isinstance(model, torch.nn.Module):  # every process starts from process 0's model (chain 0, σ₀)
            broadcast_([*model.parameters(), *model.buffers()], world)
    kernel = EMSGHMC(target, config, dataset_size=n, steps_per_epoch=source.steps_per_epoch, world=world)
    plan = kernel.plan
    state = kernel.init(base_seed)
    shuffle = torch.Generator().manual_seed(base_seed)
    history: list[dict[str, Any]] = []
    start_epoch, seconds, last_saved = 0, 0.0, None
    checkpoint = config.checkpoint
    if config.resume and Path(checkpoint).is_file():
        saved = checkpoints.load(checkpoint, map_location=target.device)
        _load_chains(state.chains, saved, checkpoint, config.em, config.chains)
        if state.shared is not None:
            _check_structure(saved["em"], config.structure, checkpoint)
            state.shared.load_state_dict(saved["em"])
        shuffle.set_state(saved["shuffle_rng"])
        process_rng = saved.get("process_rng") or []
        if len(process_rng) == world.size:  # a DataLoader shuffles with torch's global RNG
            torch.set_rng_state(process_rng[world.rank])
        elif saved.get("torch_rng") is not None:
            torch.set_rng_state(saved["torch_rng"])
        source.load_shuffle_state(saved.get("loader_rng") or {})
        history, start_epoch, last_saved = saved["history"], saved["epoch"], checkpoint
        seconds = history[-1]["seconds"] if history else 0.0
        state.step = start_epoch * plan.steps_per_epoch

    def diverged(epoch: int, step: int, what: str) -> TrainingDiverged:
        kernel.restore_prior()  # leave the model's prior as it was given, not NaN
        return TrainingDiverged(f"epoch {epoch + 1}, step {step + 1}", what, "step_size", last_saved)

    bar = tqdm(range(start_epoch, config.epochs), initial=start_epoch, total=config.epochs,
               disable=not config.progress, desc="em-sghmc")
    target.train()
    for epoch in bar:
        started = time.perf_counter()
        # each chain its own order of the data, drawn for every chain in chain order (as in one process)
        orders = [source.epoch(shuffle) for _ in range(config.chains)]
        per_chain = [orders[run.index] for run in state.chains]
        nll_sum = torch.zeros((), device=target.device)
        for step, batches in enumerate(zip(*per_chain, strict=True)):
            try:
                kernel.step(state, list(batches))
            except Diverged as error:
                raise diverged(epoch, step, str(error)) from None
            for run in state.chains:
                nll_sum += run.state.loss
        seconds += time.perf_counter() - started
        what = kernel.first_problem(_what_is_not_finite_at_epoch_end(state.chains, nll_sum))
        if what is not None:
            raise diverged(epoch, plan.steps_per_epoch - 1, what)
        sum_(nll_sum, world)
        row = kernel.history_row(state, epoch, seconds, float(nll_sum) / (plan.steps_per_epoch * config.chains))
        history.append(row)
        bar.set_postfix(neg_log_joint=f"{row['neg_log_joint']:.4f}", sparsity=f"{row['sparsity']:.3f}")
        if checkpoint is not None:
            chains = [getattr(chain, "saved", None) or chain.state_dict() for chain in kernel.all_chains(state)]
            process_rng = gather_objects(torch.get_rng_state(), world)
        if checkpoint is not None and world.is_main:
            checkpoints.save({"chains": chains,
                              "shuffle_rng": shuffle.get_state(), "torch_rng": torch.get_rng_state(),
                              "process_rng": process_rng, "world_size": world.size,
                              "loader_rng": source.shuffle_state(),
                              "em": None if state.shared is None else state.shared.state_dict(),
                              "history": history, "epoch": epoch + 1, "epochs": config.epochs,
                              "burn_in": kernel.burn_in, "metadata": config.metadata or {},
                              "model": target.state_dict()}, checkpoint)
            last_saved = checkpoint
        if config.callback is not None:
            config.callback(row)
    bar.close()
    return kernel.result(state, history)


def _what_is_not_finite_at_epoch_end(runs: list[Chain], nll_sum: torch.Tensor) -> str | None:
    """None when every tensor a checkpoint would hold (draws are checked as they are kept) is finite."""
    for c, run in enumerate(runs):
        saved = {key: value for key, value in run.state_dict().items() if key != "draws"}
        bad = first_non_finite(saved)
        if bad is not None:
            return f"{bad} of chain {c + 1} is not finite"
    if not bool(torch.isfinite(nll_sum)):
        return f"the epoch's summed minibatch loss is {float(nll_sum)}"
    return None


def _load_chains(runs: list[Chain], saved: dict[str, Any], path: str | os.PathLike, em: bool, chains: int) -> None:
    """Restore each of this process's chains (by its ``index``) from a checkpoint of a run of ``chains`` chains,
    or a ``CheckpointError`` if it belongs to another run."""
    fix = "or start a new checkpoint"
    if "chains" not in saved:
        raise CheckpointError(path, f"it was not written by em_sghmc or sample_sghmc; resume one of their runs, {fix}")
    count = len(saved["chains"])
    if count != chains:
        raise CheckpointError(path, f"it holds {count} chains, this run asks for {chains}; resume with "
                                    f"chains={count}, {fix}")
    if bool(saved.get("em")) != em:
        writer, reader = ("sample_sghmc", "em_sghmc") if em else ("em_sghmc", "sample_sghmc")
        raise CheckpointError(path, f"it was written by {writer}, not {reader}; resume with {writer}, {fix}")
    for run in runs:
        chain_saved = saved["chains"][run.index]
        try:
            layout = tuple((name, torch.Size(shape)) for name, shape in chain_saved["state"]["layout"])
            if layout != run.state.layout:
                raise RuntimeError(_layout_difference(layout, run.state.layout))
            run.load_state_dict(chain_saved)
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
            first_line = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise CheckpointError(path, f"it was written for another model or guide ({first_line}); resume with "
                                        f"the same model, {fix}") from error


def _check_structure(saved_em: dict[str, Any], structure: str, path: str | os.PathLike) -> None:
    """A ``CheckpointError`` unless the checkpoint's EM state is of a run of this ``structure``."""
    written = "unit" if "unit_keep" in saved_em else "weight"
    if written != structure:
        raise CheckpointError(path, f"it was written by a run with structure={written!r}, this one asks for "
                                    f"structure={structure!r}; resume with structure={written!r}, or start a new "
                                    "checkpoint")


def _layout_difference(saved: tuple, current: tuple) -> str:
    """The first parameter whose name or shape differs between two layouts, in words."""
    for (saved_name, saved_shape), (name, shape) in zip(saved, current, strict=False):
        if saved_name != name:
            return f"parameter {saved_name!r} there, {name!r} here"
        if saved_shape != shape:
            return f"{name!r} has shape {tuple(saved_shape)} there, {tuple(shape)} here"
    return f"{len(saved)} parameters there, {len(current)} here"


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
                            inclusion=chain["inclusion"], unit_inclusion=chain.get("unit_inclusion"),
                            num_sites=num_sites) for chain in saved["chains"]]
    shared = None
    if saved.get("em"):
        shared = SimpleNamespace(**saved["em"])
        shared.spike_per_weight = shared.hyper["spike_scale"].repeat_interleave(
            torch.tensor([shape.numel() for _, shape in site_layout]))
    spike_scales = {} if shared is None else dict(zip((name for name, _ in site_layout),
                                                       shared.hyper["spike_scale"].tolist(), strict=True))
    initial = {name: value.detach().clone() for name, value in model.prior.named_buffers()}

    def make_posterior(samples: dict[str, torch.Tensor], chains: int, **stats: Any) -> Posterior:
        return Posterior.from_samples(model, samples, chains=chains, **stats)

    return sghmc_result(make_posterior, model.prior, runs, site_layout, shared, initial, saved["history"],
                        spike_scales)


# ε in preconditioned units. Chosen on validation splits (20 % of the training data) of digits, breast
# cancer, wine and 3000 Fashion-MNIST images, 2000 steps per chain, 90 % and 0 % sparsity
# (``benchmarks/em_sghmc.py --part validation``): at 90 % sparsity 3e-4 falls behind (wine 92.6 % against
# 100 %, Fashion 80.3 % against 82.8 %), 3e-3 diverged on the Fashion-MNIST subset without pruning and 1e-2
# at both sparsities; 1e-3 was within 1.2 points of the best step size on every task and never diverged.
DEFAULT_STEP_SIZE = 1e-3


def em_sghmc(
    model: BayesianNetwork | Callable,
    data,
    target_sparsity: float = 0.9,
    structure: str = "weight",
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
    spike_scale: float | str | None = "auto",
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
            values; at the end the prior holds the shared estimates, σ₀ their mean over weights); or
            any Pyro model ``model(x, y)`` with continuous latent sites, some drawn from one
            ``priors.SpikeAndSlab`` object (``pyro.sample("w", prior.distribution((p,)))`` or a
            ``PyroSample`` of it): EM acts on those sites and that object receives the estimates; the
            other sites (e.g. a noise scale) and a ``PyroModule``'s parameters are sampled under their
            own priors (parameters: flat), the observed sites scaled by N / B (``pyro_model.PyroPotential``).
            Its draws come back as a ``PyroPosterior`` in the model's (constrained) space.
        data: training data ((x, y), a TensorDataset or a ``ps.data.Dataset``: in memory, each chain
            shuffled by the run's generator), or a ``torch.utils.data.DataLoader`` of (x, y) batches
            (streamed; each chain takes its own pass over the loader per epoch; ``batch_size`` is then
            the loader's; ``batches.LoaderBatches``).
        target_sparsity: s ∈ [0, 1), the fraction of Bayesian weights removed by the ramp (0: none); with
            ``structure="unit"``, the fraction of the network's removable units.
        structure: "weight" (default): one inclusion variable per weight, pruning removes weights;
            "unit": a group spike-and-slab, one inclusion variable per unit (a neuron of a Linear, a channel
            of a convolution; ``units.unit_groups``) shared by its incoming weights, the weights in no unit
            (the output layer) keep their own; pruning removes whole units, the same in every chain, so
            ``sparse.export`` of the posterior is a smaller dense network (see the module docstring). Needs
            a BayesianNetwork.
        chains: number of chains (run side by side, step by step, sharing the hyperparameters).
        samples: draws kept per chain after burn-in (evenly thinned).
        epochs: passes over the data per chain; burn_in: how many of them are burn-in (default half):
            the preconditioner and the hyperparameters adapt and the pruning ramp runs there, no
            draws are kept; both are frozen after it. At the default step size a weight moves about
            10⁻³ per step: a small data set (a few hundred examples, a few steps per epoch) needs
            enough epochs for about 2,000 steps per chain (``benchmarks/README.md``, ``pyro_models.py``).
        batch_size, step_size, friction, temperature, preconditioner, noise: SGHMC (``infer.sghmc``);
            ``step_size`` is ε in preconditioned units (about the distance a coordinate drifts per
            step), or a schedule ``step -> ε``. The default was chosen on validation splits of
            digits, breast cancer, wine and a Fashion-MNIST subset (``benchmarks/em_sghmc.py``).
        em_every: steps between E/M-steps (and trace records).
        prune_start, prune_end, prune_steps: the pruning ramp (fractions of the burn-in steps, events).
        beta_prior: (a, b) of π's Beta prior; slab_prior, spike_prior: (α, β) of the inverse-gamma
            priors of σ₁², σ₀² (spike_prior None: σ₀ fixed; otherwise estimated per site).
        spike_scale: σ₀: "per-layer": ``spike_fraction`` × the std of each site's initial weights, so
            the spike lies well below every layer's weights; a number: that σ₀ for every site; None:
            the prior's σ₀; "auto" (default): "per-layer" for a BayesianNetwork (PyTorch's
            initialisation sets each layer's scale), the prior's σ₀ for a Pyro model (its initial
            values are prior draws, and its author chose σ₀). The result's ``spike_scale`` lists the
            values used.
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
                       seed, checkpoint, resume, progress, metadata, callback, structure)
    return _run(model, data, config)


def sample_sghmc(
    model: BayesianNetwork | Callable,
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
