"""How a network's layers get their Bayesian weights during a forward pass.

``substituted_weights``: weight draws are put in place of the layers' stored weights (cheaper
than ``torch.func.functional_call``, which re-walks the whole module tree on every call).

Local reparameterization for Linear and convolutional layers:

With independent Gaussian weights w ~ N(μ, σ²), a linear layer's pre-activation for one example
is Gaussian: N(x·μ, x²·σ²). Sampling it per example (Kingma et al., 2015) instead of sampling one
weight matrix per batch costs one more product and gives lower-variance gradients.

``enable_local_reparameterization(layer)`` switches the class of a (copied) layer to a subclass
that, while ``local_reparameterization(...)`` hands it weight moments, computes that sample; at
all other times it is exactly the original layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

_VARIANCE_FLOOR = 1e-16


class LocalReparameterization:
    """Mixin for nn.Linear / nn.ConvNd subclasses; see the module docstring."""

    _moments: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    _base_class: type

    def __reduce_ex__(self, protocol):
        # The subclass is made at run time, so pickle (torch.save of a whole model) rebuilds the
        # layer from its original class instead of looking the subclass up by name.
        return _rebuild, (self._base_class, self.__getstate__())

    def _product(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self, nn.Linear):
            return F.linear(x, weight, bias)
        return self._conv_forward(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moments = self._moments
        if moments is None:
            return super().forward(x)
        weight_loc, weight_var = moments["weight"]
        bias_loc, bias_var = moments.get("bias", (self.bias, None))
        mean = self._product(x, weight_loc, bias_loc)
        var = self._product(x * x, weight_var, bias_var)
        return torch.addcmul(mean, (var + _VARIANCE_FLOOR).sqrt(), torch.randn_like(mean))


_subclasses: dict[type, type] = {}


def enable_local_reparameterization(layer: nn.Module) -> bool:
    """Give ``layer`` (in place) the local-reparameterization forward; False if it has none."""
    if isinstance(layer, LocalReparameterization):
        return True
    cls = type(layer)
    if not issubclass(cls, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
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
