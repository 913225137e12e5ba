"""A fused kernel for the hot path of mean-field VI: softplus, σ² and the closed-form KL.

For every prior that is a mixture of zero-mean Gaussians (``Gaussian``, ``SpikeAndSlab``), the KL
from N(μ, σ²) (or its closed-form bound) is g(μ² + σ²) − log σ for a scalar function g that the
prior supplies with its slope (``Prior.second_moment_kl``). ``SoftplusKL`` computes σ = softplus(ρ),
σ² and Σ KL over the active weights in one autograd node whose backward is written out by hand:

    ∂KL/∂μ = 2 g′(q) μ,   ∂KL/∂σ = 2 g′(q) σ − 1/σ,   ∂σ/∂ρ = sigmoid(ρ),   q = μ² + σ².

``MomentsKL`` is the same node that also hands μ on (as an output), so that the gradient flowing back
into μ from the network and the KL's are summed in its backward instead of in one more pass.

Passes over the weights of a dense site per step (Gaussian prior; "fresh" = a newly allocated tensor,
which on CPU costs page faults on top of the pass, several times the cost of an in-place pass for
megabyte-sized sites): forward clamp (fresh), sigmoid (fresh), exp and log1p in place, log σ (fresh),
its sum, σ² into log σ's buffer, Σ σ², μ·μ: 9 passes, 3 fresh; backward 2 ∂L/∂σ² + 2 g′ ∂L/∂KL
(fresh), × σ, − ∂L/∂KL / σ, × sigmoid, ∂L/∂μ (fresh): 5 passes, 2 fresh, and none to add the two
gradients of μ. The first version of this kernel made 13 passes, 8 fresh, forward and 8, 4 backward
(plus one to add μ's gradients); the autograd formulas about 35 passes and 20 fresh tensors.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

RHO_MIN, RHO_MAX = -15.0, 20.0


class SecondMomentKL(Protocol):
    def second_moment_kl(
        self, loc: torch.Tensor, var: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def _moments_forward(ctx, loc: torch.Tensor, rho: torch.Tensor, mask: torch.Tensor | None, prior: SecondMomentKL):
    """(σ, σ², KL) of ``SoftplusKL``; saves what its backward needs on ``ctx``."""
    clamped = rho.detach().clamp(RHO_MIN, RHO_MAX)
    sigmoid = torch.sigmoid(clamped)
    full_scale = clamped.exp_().log1p_()  # softplus, in the clamp's buffer
    buffer = torch.log(full_scale)
    flat_log_scale = buffer.reshape(-1)
    log_scale_sum = flat_log_scale.sum() if mask is None else torch.dot(flat_log_scale, mask.reshape(-1))
    scale = full_scale if mask is None else full_scale * mask
    var = torch.mul(scale, scale, out=buffer)  # log σ is summed: its buffer takes σ²
    kl_without_entropy, slope = prior.second_moment_kl(loc, var, mask)
    ctx.save_for_backward(loc, scale, full_scale, sigmoid, slope, mask)
    ctx.set_materialize_grads(False)
    return scale, var, kl_without_entropy - log_scale_sum


def _moments_backward(ctx, grad_loc, grad_scale, grad_var, grad_kl) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(∂/∂μ, ∂/∂ρ) of ``SoftplusKL``'s outputs, plus ``grad_loc`` (the gradient reaching μ from elsewhere)."""
    loc, scale, full_scale, sigmoid, slope, mask = ctx.saved_tensors
    if grad_kl is None:
        grad_kl = scale.new_zeros(())
    twice_slope = slope * (2.0 * grad_kl)  # 2 g′(q) ∂L/∂KL: 0-dim (Gaussian) or per weight
    # ∂L/∂σ = σ (2 ∂L/∂σ² + 2 g′ ∂L/∂KL) − ∂L/∂KL / σ + ∂L/∂σ (direct), then × mask, × sigmoid(ρ)
    grad = scale * twice_slope if grad_var is None else torch.add(twice_slope, grad_var, alpha=2.0).mul_(scale)
    grad.addcdiv_(grad_kl.expand_as(full_scale), full_scale, value=-1.0)
    if grad_scale is not None:
        grad.add_(grad_scale)
    if mask is not None:
        grad.mul_(mask)
    grad_mu = loc * twice_slope if grad_loc is None else torch.addcmul(grad_loc, loc, twice_slope)
    return grad_mu, grad.mul_(sigmoid)


class SoftplusKL(torch.autograd.Function):
    """(μ, ρ, mask, prior) -> (σ, σ², KL): σ = softplus(ρ), masked; KL summed over active weights.

    Shapes: μ (already zero where masked), ρ and mask (float 0/1, or None when dense) share the
    weight's shape; outputs σ, σ² likewise (zero where masked), KL 0-dim. The gradient treats the
    clamp of ρ to [−15, 20] as the identity (values outside do not occur in practice).
    """

    @staticmethod
    def forward(ctx, loc: torch.Tensor, rho: torch.Tensor, mask: torch.Tensor | None, prior: SecondMomentKL):
        return _moments_forward(ctx, loc, rho, mask, prior)

    @staticmethod
    def backward(ctx, grad_scale, grad_var, grad_kl):
        return (*_moments_backward(ctx, None, grad_scale, grad_var, grad_kl), None, None)


class MomentsKL(torch.autograd.Function):
    """(μ, ρ, mask, prior) -> (μ, σ, σ², KL): ``SoftplusKL`` that also returns μ (a view of the input) for
    use downstream; the gradient reaching that output is added to the KL's in the same backward pass."""

    @staticmethod
    def forward(ctx, loc: torch.Tensor, rho: torch.Tensor, mask: torch.Tensor | None, prior: SecondMomentKL):
        return (loc.view_as(loc), *_moments_forward(ctx, loc, rho, mask, prior))

    @staticmethod
    def backward(ctx, grad_loc, grad_scale, grad_var, grad_kl):
        return (*_moments_backward(ctx, grad_loc, grad_scale, grad_var, grad_kl), None, None)


def softplus_kl(
    loc: torch.Tensor, rho: torch.Tensor, mask: torch.Tensor | None, prior: SecondMomentKL
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """See ``MomentsKL``: returns (μ to use downstream, σ, σ², Σ KL)."""
    return MomentsKL.apply(loc, rho, mask, prior)


def _softplus_and_sigmoid(rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softplus(ρ), sigmoid(ρ)) for ρ clamped to [−15, 20], accurate to float precision.

    ATen's vectorised exp and log are several times faster on CPU than its log1p (which
    ``F.softplus`` uses), so log1p(u) is computed as log(1 + u) · u / ((1 + u) − 1) (Goldberg's
    trick: the factor undoes the rounding of 1 + u; the clamp keeps 1 + u > 1).
    """
    exp = rho.detach().clamp(RHO_MIN, RHO_MAX).exp_()
    one_plus_exp = exp + 1.0
    scale = one_plus_exp.log().mul_(exp / (one_plus_exp - 1.0))
    return scale, exp.div_(one_plus_exp)


class Softplus(torch.autograd.Function):
    """σ = softplus(ρ) (see ``_softplus_and_sigmoid``) with dσ/dρ = sigmoid(ρ)."""

    @staticmethod
    def forward(ctx, rho: torch.Tensor) -> torch.Tensor:
        scale, sigmoid = _softplus_and_sigmoid(rho)
        ctx.save_for_backward(sigmoid)
        return scale

    @staticmethod
    def backward(ctx, grad_scale: torch.Tensor) -> torch.Tensor:
        (sigmoid,) = ctx.saved_tensors
        return grad_scale * sigmoid


def softplus(rho: torch.Tensor) -> torch.Tensor:
    """σ = log(1 + exp(ρ)), ρ clamped to [−15, 20] (σ ∈ [3e−7, 20]); fast on CPU, exact to float."""
    return Softplus.apply(rho)


def inverse_softplus(value: float) -> float:
    """ρ such that softplus(ρ) = value (> 0)."""
    return value + math.log(-math.expm1(-value))
