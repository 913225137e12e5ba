"""Observation models p(y | f(x; w)): Categorical for classification, Gaussian for regression.

A likelihood is an ``nn.Module`` so that learned noise is an ordinary (deterministic) parameter
of the model. ``observe`` is the Pyro side (a sample site inside the data plate); ``log_prob`` is
the same density as a plain tensor, for the fused training objective.
"""

from __future__ import annotations

import math
import numbers

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn


def classification_shape_error(shape: tuple[int, ...], floating: bool) -> str:
    """The message for classification targets that are not of shape (N,), with the fix for the usual cases."""
    if len(shape) == 2 and shape[1] == 1:
        fix = "use y.squeeze(1)"
    elif len(shape) == 2 and floating:
        fix = "for one-hot or probability targets use y.argmax(1)"
    else:
        fix = "pass one class index per example"
    shown = "(N, 1)" if len(shape) == 2 and shape[1] == 1 else str(shape)
    return f"classification targets must have shape (N,) of class indices, got {shown}: {fix}"


def regression_shape_error(shape: tuple[int, ...]) -> str:
    """The message for regression targets that are not of shape (N,)."""
    fix = "use y.squeeze(1)" if len(shape) == 2 and shape[1] == 1 else "pass one target value per example"
    shown = "(N, 1)" if len(shape) == 2 and shape[1] == 1 else str(shape)
    return f"regression targets must have shape (N,), got {shown}: {fix}"


class Likelihood(nn.Module):
    """Base class. ``output`` is the network's output for a batch, shape (B, ...)."""

    task: str = "classification"

    def distribution(self, output: torch.Tensor) -> dist.TorchDistribution:
        """p(y | output) with batch shape (B,)."""
        raise NotImplementedError

    def log_prob(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log p(y_i | output_i), shape (B,)."""
        return self.distribution(output).log_prob(y)

    def observe(self, output: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The Pyro observation site ``obs``; call inside the data plate."""
        return pyro.sample("obs", self.distribution(output), obs=y)

    def check_targets(self, y: torch.Tensor, output_size: int) -> None:
        """Raise ValueError if ``y`` cannot be observed under this likelihood."""


class Categorical(Likelihood):
    """y ~ Categorical(softmax(output)); output shape (B, C), y int64 (B,) in [0, C)."""

    task = "classification"

    def distribution(self, output: torch.Tensor) -> dist.TorchDistribution:
        return dist.Categorical(logits=output)

    def log_prob(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(output, y, reduction="none")

    def check_targets(self, y: torch.Tensor, output_size: int) -> None:
        if y.dim() != 1:
            raise ValueError(classification_shape_error(tuple(y.shape), y.dtype.is_floating_point))
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise ValueError(
                f"labels must be integers (class indices), got dtype {y.dtype}: convert them with y.long()"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= output_size):
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            fix = (
                "class indices start at 0" if bad < 0
                else f"the network has {output_size} outputs, one per class: build it with one output per class"
            )
            raise ValueError(f"labels must lie in [0, {output_size}); found {bad}: {fix}")


class Gaussian(Likelihood):
    """y ~ N(output, scale²), homoscedastic.

    Args:
        scale: the noise standard deviation (> 0); the initial value when ``learn_scale``.
        learn_scale: learn the noise scale as a deterministic parameter (stored as its log).

    The network's output has shape (B,) or (B, 1); y has shape (B,) (``check_targets`` refuses
    (B, 1) targets, which would broadcast against (B,) means into a (B, B) density).
    """

    task = "regression"

    def __init__(self, scale: float = 0.1, learn_scale: bool = False):
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"Gaussian likelihood: scale must be a finite number > 0, got {scale!r}")
        log_scale = torch.tensor(math.log(scale))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    @staticmethod
    def _mean(output: torch.Tensor) -> torch.Tensor:
        return output.squeeze(-1) if output.dim() > 1 and output.shape[-1] == 1 else output

    def distribution(self, output: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(self._mean(output), self.scale)

    def log_prob(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = (y - self._mean(output)) / self.scale
        return -0.5 * z * z - self.log_scale - 0.5 * math.log(2 * math.pi)

    def check_targets(self, y: torch.Tensor, output_size: int) -> None:
        if output_size != 1:
            raise ValueError(
                f"the Gaussian likelihood models one output per example, but the network gives {output_size}: "
                "give the network's last layer a single output"
            )
        if y.dim() != 1:
            raise ValueError(regression_shape_error(tuple(y.shape)))
        if not y.dtype.is_floating_point:
            raise ValueError(
                f"regression targets must be floating point, got dtype {y.dtype}: convert them with y.float()"
            )
        if not torch.isfinite(y).all():
            raise ValueError("regression targets contain NaN or inf")
