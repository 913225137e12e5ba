"""Figures of a run: training curves, reliability diagrams, SNR histograms.

Each function returns a ``matplotlib.figure.Figure`` and writes it to ``path`` only when one is given.
The figures are built without pyplot, so this module never touches matplotlib's backend or pyplot's
global figure list: in a script a returned figure is only saved; in Jupyter it shows inline as the
value of a cell or through ``display(fig)``, also in a kernel where pyplot was never imported (its
``_repr_png_`` renders it; IPython's own figure formatter, once pyplot has set it up, takes precedence).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import torch
from matplotlib.figure import Figure


class NotebookFigure(Figure):
    """A ``Figure`` that IPython can display without pyplot: ``_repr_png_`` renders it with Agg into
    PNG bytes (``savefig`` needs no backend), so ``display(fig)`` never prints ``<Figure ...>``."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        return buffer.getvalue()


def _finish(fig: Figure, path: str | os.PathLike | None) -> Figure:
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def training_curve(history: Sequence[Mapping[str, float]], path: str | os.PathLike | None = None) -> Figure:
    """Loss (−ELBO per example), NLL per example and KL (nats) against epoch."""
    epochs = [record["epoch"] for record in history]
    fig = NotebookFigure(figsize=(9, 3.5))
    left, right = fig.subplots(1, 2)
    left.plot(epochs, [r["loss"] for r in history], label="−ELBO / N")
    left.plot(epochs, [r["nll"] for r in history], label="NLL / N")
    left.set_xlabel("epoch")
    left.set_ylabel("nats per example")
    left.legend()
    right.plot(epochs, [r["kl"] for r in history], color="tab:red")
    right.set_xlabel("epoch")
    right.set_ylabel("KL(q ‖ p) (nats)")
    fig.suptitle("training curve", fontsize=10)
    return _finish(fig, path)


def reliability_diagram(bins: Mapping[str, torch.Tensor], path: str | os.PathLike | None = None,
                        title: str = "") -> Figure:
    """Accuracy against confidence per bin (``metrics.reliability`` output), with the diagonal."""
    edges = bins["edges"].tolist()
    centers = [(lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    width = edges[1] - edges[0]
    filled = bins["count"] > 0
    fig = NotebookFigure(figsize=(4, 4))
    ax = fig.subplots()
    ax.bar([c for c, f in zip(centers, filled, strict=True) if f], bins["accuracy"][filled].tolist(),
           width=width, edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title or "reliability diagram", fontsize=9)
    ax.legend(loc="upper left")
    return _finish(fig, path)


def snr_histogram(
    snr: Mapping[str, torch.Tensor],
    path: str | os.PathLike | None = None,
    thresholds: float | Mapping[str, float] | None = None,
    title: str = "",
    labels: Mapping[str, str] | None = None,
) -> Figure:
    """Histogram of the signal-to-noise ratios |μ| / σ of each site (log-x), with the pruning threshold:
    one black line for a single threshold, or one line per site in its colour. ``labels``: site name ->
    legend label (e.g. ``model.layer_labels()``); default the site names."""
    values = {name: ratio.detach().flatten().cpu().clamp_min(1e-6) for name, ratio in snr.items()}
    low = min(float(v.min()) for v in values.values())
    high = max(float(v.max()) for v in values.values())
    bins = torch.logspace(torch.log10(torch.tensor(low)), torch.log10(torch.tensor(high * 1.01)), 61).tolist()
    fig = NotebookFigure(figsize=(7, 4))
    ax = fig.subplots()
    for index, (name, ratio) in enumerate(values.items()):
        color = f"C{index % 10}"
        label = f"{(labels or {}).get(name, name)} ({ratio.numel()} weights)"
        ax.hist(ratio.numpy(), bins=bins, histtype="step", color=color, label=label)
        if isinstance(thresholds, Mapping) and name in thresholds:
            ax.axvline(thresholds[name], color=color, linestyle="--")
    if isinstance(thresholds, int | float):
        ax.axvline(thresholds, color="black", linestyle="--", label=f"threshold {thresholds:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("SNR |μ| / σ")
    ax.set_ylabel("weights")
    ax.set_title(title + ("\n(dashed: per-layer thresholds)" if isinstance(thresholds, Mapping) else ""), fontsize=9)
    ax.legend(fontsize=7)
    return _finish(fig, path)
