"""Variational families: one masked mean-field Gaussian core and the policies built on it."""

from .meanfield import MeanField, MeanFieldSite
from .snr import PAPER_SETTING, SNRPruned, snr_sweep
from .subspace import SparseSubspace

__all__ = ["MeanField", "MeanFieldSite", "PAPER_SETTING", "SNRPruned", "snr_sweep", "SparseSubspace"]
