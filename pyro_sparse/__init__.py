"""pyro-sparse: sparse Bayesian neural networks in Pyro."""

from . import (
    batches,
    data,
    distributions,
    errors,
    guides,
    likelihoods,
    loaders,
    metrics,
    nets,
    plots,
    priors,
    pyro_model,
    sparse,
    units,
)
from .evaluation import evaluate
from .guides import MeanField, SNRPruned, SparseSubspace
from .infer import History, TrainingState, fit
from .infer.em import em_sghmc, sample_sghmc
from .model import BayesianNetwork
from .posterior import Posterior
from .pyro_posterior import PyroPosterior

__version__ = "0.1.0"

__all__ = [
    "BayesianNetwork",
    "History",
    "MeanField",
    "Posterior",
    "PyroPosterior",
    "SNRPruned",
    "SparseSubspace",
    "TrainingState",
    "batches",
    "data",
    "distributions",
    "em_sghmc",
    "errors",
    "evaluate",
    "fit",
    "guides",
    "likelihoods",
    "loaders",
    "metrics",
    "nets",
    "plots",
    "priors",
    "pyro_model",
    "sample_sghmc",
    "sparse",
    "units",
]
