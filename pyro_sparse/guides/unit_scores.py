"""Scores of a guide's units (structured sparsity): how much signal each unit's incoming weights carry.

One function for the two algorithms that rank units: SNR pruning (``SNRPruned.prune(structure="unit")``)
and unit-level sparse-subspace VI (``SparseSubspace(structure="unit")``, which removes the active units
of lowest score at each support update).
"""

from __future__ import annotations

import torch

from .meanfield import MeanField

UNIT_SCORES = ("energy", "mean_snr", "magnitude")


@torch.no_grad()
def unit_scores(guide: MeanField, score: str = "energy") -> dict[str, torch.Tensor]:
    """Unit group name -> the score (size,) of each unit of the group; 0 for a removed unit.

    Over a unit's incoming weights (the rows of its producers' Bayesian weights; a deterministic
    producer is skipped: its units are judged by the Bayesian ones), active weights only:

    - "energy": the group SNR √(Σ μ² / Σ σ²), the SNR of the unit's weight vector as a whole (one
      weight's |μ| / σ for a single weight; a few strong weights outweigh many weak ones);
    - "mean_snr": the mean |μ| / σ of those weights;
    - "magnitude": √(Σ μ²), the L2 norm of the incoming means (no σ).

    The ratios compare units of layers of different fan-in on one scale. Groups without a Bayesian
    producer are left out.
    """
    if score not in UNIT_SCORES:
        raise ValueError(f"unit_score must be one of {UNIT_SCORES}, got {score!r}")
    scores = {}
    sites_of = {info.module_path: name for name, info in guide.site_info.items()
                if getattr(info, "attribute", None) == "weight"}
    for group_name, group in guide.unit_groups().items():
        numerator = denominator = None
        for path in group.producers:
            if path not in sites_of:
                continue
            site = guide.site(sites_of[path])
            loc, scale, _ = site.variational()
            loc, scale = loc.flatten(1), scale.flatten(1)
            active = site.mask.flatten(1).to(loc.dtype)
            if score == "mean_snr":
                top = (loc.abs() / torch.where(active > 0, scale, torch.ones_like(scale))).sum(1)
                bottom = active.sum(1)
            else:
                top = (loc * loc).sum(1)
                bottom = (scale * scale).sum(1) if score == "energy" else None  # magnitude: no denominator
            numerator = top if numerator is None else numerator + top
            if bottom is not None:
                denominator = bottom if denominator is None else denominator + bottom
        if numerator is None:
            continue
        tiny = torch.finfo(numerator.dtype).tiny
        ratio = numerator if denominator is None else numerator / denominator.clamp(min=tiny)
        scores[group_name] = ratio if score == "mean_snr" else ratio.sqrt()
    return scores
