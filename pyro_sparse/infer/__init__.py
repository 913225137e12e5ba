"""Inference: the fused ELBO and the training loop."""

from .elbo import ElboTerms, negative_elbo
from .svi import History, TrainingState, fit

__all__ = ["ElboTerms", "History", "TrainingState", "fit", "negative_elbo"]
