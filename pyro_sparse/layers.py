"""How a network's layers get their Bayesian weights during a forward pass.

``substituted_weights``: weight draws are put in place of the layers' stored weights (cheaper
than ``torch.func.functional_call``, which re-walks the whole module tree on every call).

Local reparameterization (LRT) for Linear layers:

With independent Gaussian weights w ~ N(μ, σ²), a linear layer's pre-activation for one example
is Gaussian: N(x·μ, x²·σ²). Sampling it per example (Kingma et al., 2015) instead of sampling one
weight matrix per batch costs one more product and gives lower-variance gradients.

It is exact only when every output row depends on its own weight draw: a Linear layer applied to
a (B, D) batch, one row per example. For any other input, e.g. (B, T, D) (sequence models,
attention), the T positions of one example share one weight draw, so their pre-activations are
correlated; sampling them independently would be a different model. Such calls sample the weights
instead (one draw per batch, as the Pyro model does). Convolutions share one weight draw across
all spatial positions for the same reason and never use LRT (``BayesianNetwork`` refuses it).
A layer called more than once in one forward pass (weights shared between calls) is likewise not
exact under LRT: exclude it with ``local_reparameterization="none"``.

``enable_local_reparameterization(layer)`` switches the class of a (copied) Linear layer to a
subclass that, while ``local_reparameterization(...)`` hands it weight moments, computes that
sample; at all other times it is exactly the original layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

_VARIANCE_FLOOR = 1e-16


class LocalReparameterization:
    """Mixin for nn.Linear subclasses; see the module docstring."""

    _moments: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    _base_class: type

    def __reduce_ex__(self, protocol):
        # The subclass is made at run time, so pickle (torch.save of a whole model) rebuilds the
        # layer from its original class instead of looking the subclass up by name.
        return _rebuild, (self._base_class, self.__getstate__())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moments = self._moments
        if moments is None:
            return super().forward(x)
        if x.dim() != 2:  # rows of one example share a weight draw: LRT would not be exact
            return F.linear(x, _draw(moments, "weight", self.weight), _draw(moments, "bias", self.bias))
        weight_loc, weight_var = moments["weight"]
        bias_loc, bias_var = moments.get("bias", (self.bias, None))
        mean = F.linear(x, weight_loc, bias_loc)
        var = F.linear(x * x, weight_var, bias_var)
        return torch.addcmul(mean, (var + _VARIANCE_FLOOR).sqrt(), torch.randn_like(mean))


def _draw(
    moments: Mapping[str, tuple[torch.Tensor, torch.Tensor]], attribute: str, stored: torch.Tensor | None
) -> torch.Tensor | None:
    """One draw μ + σ ε of ``attribute`` from its (μ, σ²) in ``moments`` (the stored tensor if it has none).

    σ = √σ² with a zero gradient where σ² = 0 (masked weights stay exactly zero, with finite gradients).
    """
    if attribute not in moments:
        return stored
    loc, var = moments[attribute]
    positive = var > 0
    scale = torch.where(positive, var, torch.ones_like(var)).sqrt() * positive
    return torch.addcmul(loc, scale, torch.randn_like(loc))


_subclasses: dict[type, type] = {}


def enable_local_reparameterization(layer: nn.Module) -> bool:
    """Give an ``nn.Linear`` ``layer`` (in place) the local-reparameterization forward; False for other layers."""
    if isinstance(layer, LocalReparameterization):
        return True
    cls = type(layer)
    if not issubclass(cls, nn.Linear):
        return False
    if cls not in _subclasses:
        _subclasses[cls] = type(cls.__name__, (LocalReparameterization, cls), {"_base_class": cls})
    layer.__class__ = _subclasses[cls]
    return True


def _rebuild(base_class: type, state: dict) -> nn.Module:
    layer = base_class.__new__(base_class)
    layer.__setstate__(state)
    enable_local_reparameterization(layer)
    return layer


@contextlib.contextmanager
def substituted_weights(
    layers: Mapping[str, tuple[nn.Module, str]], weights: Mapping[str, torch.Tensor]
) -> Iterator[None]:
    """Within the block, ``layers[name] = (module, attribute)`` holds ``weights[name]``.

    The attribute is a buffer of the module (as ``BayesianNetwork`` makes every Bayesian parameter)
    or one of its parameters; gradients flow from the output to the substituted tensors.
    """
    saved = []
    try:
        for name, value in weights.items():
            module, attribute = layers[name]
            store = module._buffers if attribute in module._buffers else module._parameters
            saved.append((store, attribute, store[attribute]))
            store[attribute] = value
        yield
    finally:
        for store, attribute, original in reversed(saved):
            store[attribute] = original


def substituted_parameters(model: nn.Module, values: Mapping[str, torch.Tensor]) -> contextlib.AbstractContextManager:
    """Within the block, the parameters (or buffers) of ``model`` at the paths of ``values``
    (``"net.0.bias"``, ``"likelihood.log_scale"``) hold those tensors."""
    slots = {}
    for path in values:
        module_path, _, attribute = path.rpartition(".")
        slots[path] = (model.get_submodule(module_path), attribute)
    return substituted_weights(slots, values)


@contextlib.contextmanager
def local_reparameterization(
    layers: Mapping[str, tuple[nn.Module, str]], moments: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> Iterator[None]:
    """Within the block, the layers of the named sites sample their pre-activations.

    Args:
        layers: site name -> (layer, attribute), e.g. "0.weight" -> (Linear, "weight").
        moments: site name -> (mean, variance) tensors of the site's shape.
    """
    if not moments:
        yield
        return
    per_layer: dict[nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, value in moments.items():
        layer, attribute = layers[name]
        per_layer.setdefault(layer, {})[attribute] = value
    try:
        for layer, layer_moments in per_layer.items():
            layer._moments = layer_moments
        yield
    finally:
        for layer in per_layer:
            layer._moments = None
