"""SNRPruned: prune a trained mean-field posterior by the signal-to-noise ratio |μ| / σ of each weight.

After Sharma & Jennings, *Bayesian Neural Networks at Scale: A Performance Analysis and Pruning
Study* (2020; their tool BPrune), with what that tool got wrong put right:

- pruned weights are **removed**: μ = σ = 0 exactly (the mask of the core ``MeanField`` is cleared
  and the stored μ zeroed), so every sample, prediction, KL and gradient treats them as absent.
  BPrune set μ = 0 but left σ = softplus(0) ≈ 0.69, turning pruned weights into pure noise
  (``pruned="noise"`` reproduces that, for comparison only);
- pruning is by an SNR threshold **or** to a target fraction: the threshold is then the SNR
  quantile that removes exactly that fraction, one across all layers (``scope="global"``, the
  default, as in BPrune) or one per layer (``scope="layer"``). One threshold is the better rule:
  it keeps the small layers (first convolution, output layer) nearly dense and prunes the large
  redundant ones hard; pruning every layer by the same fraction loses several points more at
  90-95 % on Fashion-MNIST (benchmarks/README.md);
- the surviving weights can be fine-tuned with ``pyro_sparse.fit`` (masks are buffers: they stay
  put, and they are saved in checkpoints). Deviation from Sharma & Jennings (2020): they evaluate
  the pruned posterior without retraining; fine-tuning is ours, because it recovers most of the
  accuracy lost at 90-95 % (benchmarks/snr_sweep.py). ``PAPER_SETTING`` turns it off;
- pruned weights are removed from the model's prior too (``BayesianNetwork.use_masks``), so the
  ELBO after pruning is that of the smaller model, whichever estimator computes it.

    guide = SNRPruned(model)
    ps.fit(model, guide, data.train, epochs=30)            # dense mean-field VI
    guide.prune(sparsity=0.9)                              # the 90 % lowest-SNR weights removed
    ps.fit(model, guide, data.train, epochs=5)             # fine-tune the survivors

``PAPER_SETTING`` (one threshold on all layers, no fine-tuning) and ``snr_sweep`` compare settings.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch

from ..data import Dataset
from ..model import BayesianNetwork
from ..pyro_model import InitLocFn
from ..validation import check_fraction
from .meanfield import MeanField
from .unit_scores import unit_scores

SCOPES = ("layer", "global")
PRUNED = ("zero", "noise")
STRUCTURES = ("weight", "unit")
UNIT_SCORES = ("energy", "mean_snr")
PAPER_SETTING: dict[str, Any] = {"scope": "global", "finetune_epochs": 0}
"""Sharma & Jennings' setting for ``snr_sweep``: one SNR threshold on all layers, no fine-tuning
(add ``pruned="noise"`` to reproduce their pruned weights as noise as well)."""


def _lowest(values: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask (values' shape) of exactly ``count`` smallest entries of ``values`` (ties: first index)."""
    chosen = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if count > 0:
        order = torch.sort(values.flatten(), stable=True).indices
        chosen[order[:count]] = True
    return chosen.view_as(values)


class SNRPruned(MeanField):
    """The masked mean-field guide with SNR pruning (see the module docstring).

    Args: those of ``MeanField`` (model, init_scale, name, init_loc_fn). Train it like ``MeanField`` (``fit``,
    or Pyro's ``SVI``), then ``prune``. A trained ``MeanField``'s state loads into it unchanged:
    ``SNRPruned(model).load_state_dict(mean_field.state_dict())``.
    """

    def __init__(self, model: BayesianNetwork | Callable, init_scale: float | None = None, name: str | None = None,
                 init_loc_fn: InitLocFn | None = None):
        super().__init__(model, init_scale=init_scale, name=name, init_loc_fn=init_loc_fn)
        self.pruned_threshold: float | dict[str, float] | None = None

    # ----------------------------------------------------------------------------------------
    # Signal-to-noise ratios
    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def snr(self) -> dict[str, torch.Tensor]:
        """Site name -> |μ| / σ (the weight's shape); 0 at weights already pruned."""
        ratios = {}
        for name, site in self.named_sites():
            ratio = site.loc.abs() / site.scale()
            ratios[name] = ratio if site.is_dense() else ratio * site.mask
        return ratios

    def _check_trained(self) -> None:
        """A never-trained guide has every σ at its initial value, so SNR would just rank |μ|."""
        first = next(iter(self.sites.values())).rho.flatten()[0]
        if all(bool((site.rho == first).all()) for site in self.sites.values()):
            raise ValueError(
                "the guide was never trained (every σ still has its initial value): fit it before pruning"
            )

    # ----------------------------------------------------------------------------------------
    # Pruning
    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def prune(
        self,
        threshold: float | None = None,
        sparsity: float | None = None,
        scope: str = "global",
        pruned: str = "zero",
        structure: str = "weight",
        unit_score: str = "energy",
    ) -> dict[str, torch.Tensor]:
        """Remove the weights (or whole units) of lowest SNR = |μ| / σ. Exactly one of ``threshold`` / ``sparsity``.

        Args:
            threshold: remove every weight with SNR < threshold (one absolute threshold, all layers).
            sparsity: the fraction in [0, 1) of weights to remove: round(sparsity · n) of the n
                weights of all sites together (``scope="global"``: one SNR threshold across layers,
                the quantile that removes that many) or of each site (``"layer"``); ties are broken
                by position, so the count is exact.
            scope: "global" (default) or "layer" (only matters with ``sparsity``). Global is the
                better default: it keeps small layers (a first convolution, an output layer) nearly
                dense and prunes the large, redundant ones hard; on Fashion-MNIST LeNet-5 at 90-95 %
                per-layer pruning loses several points more (benchmarks/snr_sweep.py).
            pruned: "zero" (default): pruned weights get μ = σ = 0, masked out of the model.
                "noise": BPrune's flaw, for comparison only: μ = 0 and σ = softplus(0) ≈ 0.69, the
                weights stay active (they are noise, not zeros: ``sparsity`` does not count them).
            structure: "weight" (default): single weights; "unit": whole units (neurons, conv channels,
                channels tied by a residual addition together, see ``pyro_sparse.units``), each with its
                incoming weights, bias, BatchNorm channel and the next layers' inputs from it, leaving a
                smaller dense network (``ps.sparse.export``). ``sparsity`` is then the fraction of the
                removable units (the output layer's are never removed; every layer keeps one), and
                ``threshold`` applies to the unit score below.
            unit_score: how units are ranked (``structure="unit"``): "energy" (default), the group SNR
                √(Σ μ² / Σ σ²) over the unit's incoming weights (the SNR of the unit's weight vector as a
                whole: one weight's |μ|/σ for a single weight; a few strong weights outweigh many weak
                ones), or "mean_snr", the mean |μ| / σ of those weights (benchmarks/structured.py
                compares them).

        Pruning only removes: weights pruned before stay pruned. Returns the mask of the weights
        (``structure="weight"``) or units (``"unit"``: group name -> bool (size,)) this call selected
        (True = removed now).
        """
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        if pruned not in PRUNED:
            raise ValueError(f"pruned must be one of {PRUNED}, got {pruned!r}")
        sparsity = _check_rule(threshold, sparsity, scope)
        self._check_trained()
        if structure == "unit":
            return self._prune_units(threshold, sparsity, scope, pruned, unit_score)

        snr = self.snr()
        if threshold is not None:
            selected = {name: ratio < threshold for name, ratio in snr.items()}
            self.pruned_threshold = float(threshold)
        elif scope == "layer":
            selected = {name: _lowest(ratio, round(sparsity * ratio.numel())) for name, ratio in snr.items()}
            self.pruned_threshold = {name: _threshold(snr[name], chosen) for name, chosen in selected.items()}
        else:
            flat = torch.cat([ratio.flatten() for ratio in snr.values()])
            chosen = _lowest(flat, round(sparsity * flat.numel())).split([r.numel() for r in snr.values()])
            selected = {name: part.view_as(snr[name]) for name, part in zip(snr, chosen, strict=True)}
            self.pruned_threshold = _threshold(flat, torch.cat(chosen))
        for name, remove in selected.items():
            site = self.site(name)
            remove &= site.mask  # weights pruned before are not counted again
            site.loc.masked_fill_(remove, 0.0)
            if pruned == "zero":
                site.mask.masked_fill_(remove, False)
            else:
                site.rho.masked_fill_(remove, 0.0)
        return selected

    def unit_scores(self, score: str = "energy") -> dict[str, torch.Tensor]:
        """Unit group name -> the score (size,) of each unit (see ``prune``'s ``unit_score`` and
        ``guides.unit_scores``); 0 for a unit removed before."""
        if score not in UNIT_SCORES:
            raise ValueError(f"unit_score must be one of {UNIT_SCORES}, got {score!r}")
        return unit_scores(self, score)

    def _prune_units(self, threshold: float | None, sparsity: float | None, scope: str, pruned: str,
                     unit_score: str) -> dict[str, torch.Tensor]:
        """``prune(structure="unit")`` after its arguments were checked: see there."""
        if pruned != "zero":
            raise ValueError("pruned='noise' is a weight-level comparison only: use pruned='zero' with "
                             "structure='unit'")
        scores = self.unit_scores(unit_score)
        if not scores:
            raise ValueError("no unit group has a Bayesian producer layer: nothing to prune by unit")
        kept_before = {name: self.unit_keep_mask(name) for name in scores}
        # units removed before rank first (score −1) and stay removed; one unit per layer always stays
        ranked = {name: torch.where(kept_before[name], score, torch.full_like(score, -1.0))
                  for name, score in scores.items()}
        if threshold is not None:
            remove = {name: score < threshold for name, score in ranked.items()}
            self.pruned_threshold = float(threshold)
        elif scope == "layer":
            remove = {name: _lowest(score, round(sparsity * score.numel())) for name, score in ranked.items()}
            self.pruned_threshold = {name: _threshold(scores[name], chosen) for name, chosen in remove.items()}
        else:
            flat = torch.cat(list(ranked.values()))
            chosen = _lowest(flat, round(sparsity * flat.numel())).split([r.numel() for r in ranked.values()])
            remove = {name: part for name, part in zip(ranked, chosen, strict=True)}
            self.pruned_threshold = _threshold(torch.cat(list(scores.values())), torch.cat(chosen))
        selected = {}
        for name, removed in remove.items():
            removed = removed | ~kept_before[name]
            if bool(removed.all()):  # keep the best unit of a layer the rule would empty
                removed[int(ranked[name].argmax())] = False
            selected[name] = removed & kept_before[name]
            if bool(selected[name].any()):
                self.set_unit_mask(name, ~removed)
        for _, site in self.named_sites():
            if not site.is_dense():
                site.loc.mul_(site.mask)
        return selected

    def on_step_end(self, state) -> None:
        """Keep pruned μ at exactly 0 even under an optimizer with leftover momentum or weight decay."""
        with torch.no_grad():
            for _, site in self.named_sites():
                if not site.is_dense():
                    site.loc.mul_(site.mask)

    def layer_sparsity(self) -> list[dict[str, Any]]:
        """One row per site: site, total, active, sparsity (fraction of its weights exactly zero)."""
        rows = []
        for name, site in self.named_sites():
            total, active = site.mask.numel(), int(site.mask.sum())
            rows.append({"site": name, "total": total, "active": active, "sparsity": 1.0 - active / total})
        return rows


def _check_rule(threshold: float | None, sparsity: float | None, scope: str) -> float | None:
    """Check ``prune``'s rule (exactly one of threshold / sparsity, a known scope); returns the sparsity."""
    if (threshold is None) == (sparsity is None):
        raise ValueError("give exactly one of threshold= and sparsity=")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if threshold is not None:
        bad = not isinstance(threshold, int | float) or isinstance(threshold, bool)
        if bad or not math.isfinite(threshold) or threshold < 0:
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
        return None
    return check_fraction("sparsity", sparsity)


def _threshold(snr: torch.Tensor, removed: torch.Tensor) -> float:
    """The SNR threshold a target-fraction pruning amounts to: the largest SNR removed (0 if none)."""
    return float(snr[removed].max()) if bool(removed.any()) else 0.0


def snr_sweep(
    model: BayesianNetwork,
    guide: SNRPruned,
    data: Dataset,
    sparsities: list[float] | tuple[float, ...],
    scope: str = "global",
    finetune_epochs: int = 0,
    pruned: str = "zero",
    num_samples: int = 32,
    seed: int = 0,
    **fit_kwargs: Any,
) -> list[dict[str, Any]]:
    """Prune copies of a trained ``guide`` to each target sparsity, fine-tune, evaluate on ``data.test``.

    Args:
        model, guide: the trained BayesianNetwork and its SNRPruned guide (neither is modified).
        data: a ``ps.data.Dataset``: fine-tuning uses ``data.train``, evaluation ``data.test``.
        sparsities: target fractions in [0, 1).
        scope, pruned: passed to ``SNRPruned.prune``; ``**PAPER_SETTING`` gives BPrune's setting.
        finetune_epochs: epochs of ``fit`` on the pruned copy (0 = none).
        num_samples: posterior draws for the predictive metrics.
        seed: seeds fine-tuning and the evaluation draws (the same for every row).
        fit_kwargs: more ``fit`` arguments for fine-tuning (lr, batch_size, ...).

    Returns one row per target: target_sparsity, sparsity (achieved: fraction exactly zero),
    pruned_fraction (weights selected; differs from sparsity for ``pruned="noise"``), scope,
    finetune_epochs, pruned, accuracy, nll, ece, brier, mean_sample_accuracy, active_weights,
    inference_flops.
    """
    from ..evaluation import evaluate
    from ..infer.svi import fit

    if not isinstance(guide, SNRPruned):
        raise ValueError(f"guide must be an SNRPruned guide, got {type(guide).__name__}")
    if int(finetune_epochs) != finetune_epochs or finetune_epochs < 0:
        raise ValueError(f"finetune_epochs must be an integer >= 0, got {finetune_epochs!r}")
    targets = [check_fraction("sparsity", s) for s in sparsities]
    progress = fit_kwargs.pop("progress", False)
    rows = []
    for target in targets:
        pruned_model, pruned_guide = copy.deepcopy(model), copy.deepcopy(guide)
        selected = pruned_guide.prune(sparsity=target, scope=scope, pruned=pruned)
        removed = sum(int(mask.sum()) for mask in selected.values())
        if finetune_epochs:
            fit(pruned_model, pruned_guide, data.train, epochs=int(finetune_epochs), seed=seed,
                progress=progress, **fit_kwargs)
        torch.manual_seed(seed)
        results = evaluate(pruned_model, pruned_guide, data.test, num_samples=num_samples)
        rows.append({
            "target_sparsity": target, "sparsity": results["sparsity"],
            "pruned_fraction": removed / pruned_guide.num_weights, "scope": scope,
            "finetune_epochs": int(finetune_epochs), "pruned": pruned,
            **{key: results[key] for key in ("accuracy", "nll", "ece", "brier", "mean_sample_accuracy",
                                             "active_weights", "inference_flops")},
        })
    return rows
