"""Variational families: one masked mean-field Gaussian core and the policies built on it."""

from .meanfield import MeanField, MeanFieldSite

__all__ = ["MeanField", "MeanFieldSite"]
