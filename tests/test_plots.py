"""Figures: returned as matplotlib Figures with labelled axes, saved only when asked, and the
library never changes matplotlib's backend (or inline plots in Jupyter would disappear)."""

from __future__ import annotations

import subprocess
import sys

import torch
from matplotlib.figure import Figure

from pyro_sparse import metrics, plots


def test_importing_the_package_leaves_the_backend_alone():
    code = ("import matplotlib; matplotlib.use('svg'); import pyro_sparse, pyro_sparse.plots, pyro_sparse.cli; "
            "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _labels(fig: Figure) -> list[tuple[str, str]]:
    return [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]


def test_figures_are_returned_labelled_and_saved_only_with_a_path(tmp_path):
    history = [{"epoch": e, "loss": 3.0 / e, "nll": 2.0 / e, "kl": 100.0 - e} for e in range(1, 6)]
    probs = torch.softmax(torch.randn(200, 4, generator=torch.Generator().manual_seed(0)), -1)
    labels = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(1))
    snr = {"fc1.weight": torch.rand(30, 20) * 5, "fc2.weight": torch.rand(10, 30) * 5}
    figures = {
        "curve": plots.training_curve(history),
        "reliability": plots.reliability_diagram(metrics.reliability(probs, labels)),
        "snr": plots.snr_histogram(snr, thresholds=1.0),
    }
    assert not list(tmp_path.iterdir())
    for name, fig in figures.items():
        assert isinstance(fig, Figure)
        assert all(x and y for x, y in _labels(fig)), (name, _labels(fig))
    path = tmp_path / "curve.png"
    plots.training_curve(history, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_figure_shows_in_a_notebook_kernel_where_pyplot_was_never_imported():
    """IPython displays an object through its ``_repr_png_`` when no formatter for its type is registered
    (pyplot registers one for Figure only once it is imported): the figure must render itself."""
    code = (
        "import sys, pyro_sparse.plots as plots\n"
        "from IPython.core.formatters import PNGFormatter\n"
        "fig = plots.training_curve([{'epoch': 1, 'loss': 2.0, 'nll': 1.0, 'kl': 3.0}, "
        "{'epoch': 2, 'loss': 1.5, 'nll': 0.9, 'kl': 2.0}])\n"
        "png = PNGFormatter()(fig)\n"
        "assert png is not None and png[:8] == b'\\x89PNG\\r\\n\\x1a\\n', png\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
