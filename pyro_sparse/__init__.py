"""pyro-sparse: sparse Bayesian neural networks in Pyro."""

from . import data, distributions, guides, likelihoods, metrics, nets, priors
from .evaluation import evaluate
from .guides import MeanField
from .infer import History, TrainingState, fit
from .model import BayesianNetwork
from .posterior import Posterior

__version__ = "0.1.0"

__all__ = [
    "BayesianNetwork",
    "History",
    "MeanField",
    "Posterior",
    "TrainingState",
    "data",
    "distributions",
    "evaluate",
    "fit",
    "guides",
    "likelihoods",
    "metrics",
    "nets",
    "priors",
]
