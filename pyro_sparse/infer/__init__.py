"""Inference: the fused ELBO and the training loop."""

from .elbo import ElboTerms, negative_elbo
from .em import SGHMCResult, em_sghmc, sample_sghmc
from .em_kernel import EMSGHMC, EMState, RunConfig
from .sampling_target import sampling_target
from .sghmc import SGHMC, SGHMCState, constant, cyclical_cosine, sghmc
from .svi import History, TrainingState, fit

__all__ = ["ElboTerms", "History", "TrainingState", "fit", "negative_elbo"]
__all__ += ["EMSGHMC", "EMState", "RunConfig", "sampling_target"]
__all__ += ["SGHMC", "SGHMCResult", "SGHMCState", "constant", "cyclical_cosine", "em_sghmc", "sample_sghmc", "sghmc"]
