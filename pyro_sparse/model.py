"""BayesianNetwork: any ``nn.Module`` as a Pyro model with a prior on (some of) its parameters.

The caller's module is never touched: the network is deep-copied, and every Bayesian parameter
of the copy becomes a buffer holding its initial value (the guides start their means there).
Each Bayesian parameter is a Pyro sample site named after its parameter path ("0.weight",
"features.3.weight", ...); the likelihood observes the targets under
``pyro.plate("data", dataset_size, subsample=...)`` so a minibatch of B is scaled by N / B.

Pruned weights are part of neither the guide nor the model. The masks have one home, the guide
(``MeanField.masks()``); a guide registers itself with its model (``use_masks``: on construction,
and ``fit`` again at its start), and the model reads the current masks at every call: a pruned
coordinate's prior is masked out of the site's log density (``dist.mask``) and its weight is
exactly zero. So ``pyro.infer.Trace_ELBO``, ``TraceMeanField_ELBO`` and ``fit`` estimate one
objective on a pruned guide.
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .layers import (
    LocalReparameterization,
    enable_local_reparameterization,
    local_reparameterization,
    substituted_parameters,
    substituted_weights,
)
from .likelihoods import Categorical, Likelihood
from .priors import Gaussian, Prior
from .pyro_model import TracedSite
from .units import UnitGroup, unit_groups, zeroed_parameters

ParamFilter = Iterable[str] | Callable[[str, nn.Module, nn.Parameter], bool]

_instance_counter = itertools.count()

_LRT_LAYERS: dict[str, tuple[type, ...]] = {
    "auto": (nn.Linear,),
    "linear": (nn.Linear,),
    "none": (),
}
_INEXACT_LRT = {
    "all": "local reparameterization is not exact for convolutions (all spatial positions of an example share one "
           "weight draw, but LRT would sample them independently); convolutions sample weights: use "
           "local_reparameterization=\"auto\"",
}


class MaskSource(Protocol):
    """What a model reads its masks from (a ``MeanField`` guide): site name -> bool mask (True = active),
    and unit group name -> bool keep mask (size,) of the groups with removed units."""

    def masks(self) -> Mapping[str, torch.Tensor]: ...

    def unit_masks(self) -> Mapping[str, torch.Tensor]: ...


class _MaskLink:
    """The model's reference to its mask source. Copying or pickling a model does not copy its guide:
    a copy starts with no masks (register its own guide with ``use_masks``; ``fit`` does)."""

    def __init__(self, source: MaskSource | None = None):
        self.source = source

    def __deepcopy__(self, memo) -> _MaskLink:
        return _MaskLink()

    def __reduce__(self):
        return _MaskLink, ()


@dataclass(frozen=True)
class Site:
    """One Bayesian parameter: its path in the network, shape and owning layer."""

    name: str
    shape: torch.Size
    module_path: str
    attribute: str
    local_reparameterization: bool

    @property
    def numel(self) -> int:
        return self.shape.numel()


def _default_is_bayesian(name: str, module: nn.Module, param: nn.Parameter) -> bool:
    return name.rsplit(".", 1)[-1] == "weight" and isinstance(module, nn.Linear | nn.modules.conv._ConvNd)


def _as_predicate(spec: ParamFilter | None) -> Callable[[str, nn.Module, nn.Parameter], bool] | None:
    if spec is None or callable(spec):
        return spec
    patterns = [spec] if isinstance(spec, str) else list(spec)
    return lambda name, module, param: any(fnmatch.fnmatchcase(name, p) for p in patterns)


class BayesianNetwork(nn.Module):
    """A Pyro model p(y, w | x) = p(w) Π_i p(y_i | f(x_i; w)).

    Args:
        net: any ``nn.Module`` mapping a batch (B, ...) to outputs (B, C) (or (B,) / (B, 1) for
            regression). It is copied, never modified.
        prior: the weight prior (default ``priors.Gaussian(1.0)``).
        likelihood: the observation model (default ``likelihoods.Categorical()``).
        dataset_size: N, the number of training examples (scales minibatch likelihoods by N / B).
        include: which parameters are Bayesian: glob patterns on parameter paths (``"*.weight"``,
            ``"*"``) or a predicate ``f(path, module, parameter) -> bool``. Default: the weights of
            Linear and Conv layers; biases, BatchNorm and everything else stay deterministic.
        exclude: patterns or predicate removing parameters from the Bayesian set.
        name: the prefix of this model's deterministic parameters in Pyro's param store
            (default: unique per instance, so several models can live side by side).
        local_reparameterization: which layers the fused training objective samples
            pre-activations for (per example) instead of weights (once per batch): "auto" (default)
            = "linear" (Linear layers, for their (B, D) inputs; other inputs sample weights, see
            ``layers``), or "none". Convolutions always sample weights: LRT is not exact for them
            (their spatial positions share one weight draw), so "all" is refused. The Pyro model
            itself always samples weights.

    Calling the model, ``model(x, y=None)``, runs it as a Pyro model: x (B, ...), y (B,).
    """

    def __init__(
        self,
        net: nn.Module,
        prior: Prior | None = None,
        likelihood: Likelihood | None = None,
        dataset_size: int | None = None,
        include: ParamFilter | None = None,
        exclude: ParamFilter | None = None,
        name: str | None = None,
        local_reparameterization: str = "auto",
    ):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise ValueError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        if prior is not None and not isinstance(prior, Prior):
            raise ValueError(f"prior must be a pyro_sparse.priors.Prior, got {type(prior).__name__}")
        if likelihood is not None and not isinstance(likelihood, Likelihood):
            raise ValueError(
                f"likelihood must be a pyro_sparse.likelihoods.Likelihood, got {type(likelihood).__name__}"
            )
        if dataset_size is None or int(dataset_size) != dataset_size or dataset_size < 1:
            raise ValueError(f"dataset_size must be a positive integer, got {dataset_size!r}")
        self.net = copy.deepcopy(net)
        self.prior = prior if prior is not None else Gaussian(1.0)
        self.likelihood = likelihood if likelihood is not None else Categorical()
        self.dataset_size = int(dataset_size)
        self.pyro_name = name if name is not None else f"BayesianNetwork{next(_instance_counter)}"
        if local_reparameterization in _INEXACT_LRT:
            raise ValueError(_INEXACT_LRT[local_reparameterization])
        if local_reparameterization not in _LRT_LAYERS:
            raise ValueError(
                f"local_reparameterization must be one of {sorted(_LRT_LAYERS)}, got {local_reparameterization!r}"
            )
        self.sites: dict[str, Site] = self._make_bayesian(
            _as_predicate(include), _as_predicate(exclude), _LRT_LAYERS[local_reparameterization]
        )
        if not self.sites:
            raise ValueError("no Bayesian parameters: include/exclude selected none of the network's parameters")
        self._site_layers = {
            name: (self.net.get_submodule(site.module_path), site.attribute) for name, site in self.sites.items()
        }
        self._mask_link = _MaskLink()
        self._unit_groups: dict[str, UnitGroup] | None = None

    # ----------------------------------------------------------------------------------------
    # Masks of pruned weights (kept by the guide)
    # ----------------------------------------------------------------------------------------
    def use_masks(self, source: MaskSource | None) -> None:
        """Read the masks of pruned weights from ``source`` (a guide of this model) from now on; None: no masks."""
        self._mask_link.source = source

    def site_masks(self) -> dict[str, torch.Tensor]:
        """Site name -> bool mask (the weight's shape, True = active) of the sites with pruned weights."""
        source = self._mask_link.source
        if source is None:
            return {}
        return {name: mask for name, mask in source.masks().items() if name in self.sites and not bool(mask.all())}

    @property
    def mask_source(self) -> MaskSource | None:
        """The guide this model reads its masks from (``use_masks``), or None."""
        return self._mask_link.source

    def unit_masks(self) -> dict[str, torch.Tensor]:
        """Unit group name -> bool keep mask (size,) of the groups with removed units (see ``units``)."""
        source = self._mask_link.source
        return {} if source is None else dict(source.unit_masks())

    def unit_groups(self) -> dict[str, UnitGroup]:
        """The network's removable unit groups (``units.unit_groups``), found once and kept.

        Raises ``UnitAnalysisError`` when the network cannot be traced."""
        if self._unit_groups is None:
            self._unit_groups = unit_groups(self.net)
        return self._unit_groups

    def site_prior(self, name: str, mask: torch.Tensor | None = None) -> dist.TorchDistribution:
        """The prior of site ``name`` (event shape = the weight's), with masked (pruned) coordinates
        contributing 0 to its log density."""
        prior = self.prior.distribution(self.sites[name].shape)
        if mask is None:
            return prior
        return prior.base_dist.mask(mask).to_event(prior.reinterpreted_batch_ndims)

    def _make_bayesian(self, include, exclude, lrt_layers: tuple[type, ...]) -> dict[str, Site]:
        is_bayesian = include or _default_is_bayesian
        modules = dict(self.net.named_modules())
        chosen = []
        for path, param in self.net.named_parameters():
            module_path, _, attribute = path.rpartition(".")
            module = modules[module_path]
            if is_bayesian(path, module, param) and not (exclude and exclude(path, module, param)):
                chosen.append((path, module_path, attribute, module))
        by_module: dict[str, set[str]] = {}
        for _, module_path, attribute, _ in chosen:
            by_module.setdefault(module_path, set()).add(attribute)
        sites = {}
        for path, module_path, attribute, module in chosen:
            value = module._parameters.pop(attribute).detach().clone()
            module.register_buffer(attribute, value)
            lrt = (
                "weight" in by_module[module_path]
                and isinstance(module, lrt_layers)
                and enable_local_reparameterization(module)
            )
            sites[path] = Site(path, value.shape, module_path, attribute, lrt)
        return sites

    # ----------------------------------------------------------------------------------------
    # Deterministic computation
    # ----------------------------------------------------------------------------------------
    def layer_labels(self) -> dict[str, str]:
        """Site name -> a readable label for figures and tables, e.g. ``"0.weight"`` -> ``"conv1"``.

        Weights of an unnamed layer (a ``Sequential`` index) are numbered by kind in network order:
        convolutions ``conv1, conv2, ...``, linear layers ``fc1, fc2, ...``, others by their class
        name; a named module keeps its path (``"layer1.0.conv1"``). Other attributes keep their
        suffix (``"fc1.bias"``).
        """
        counts: dict[str, int] = {}
        module_labels: dict[str, str] = {}
        for name, site in self.sites.items():
            path = site.module_path
            if path not in module_labels:
                if path and not all(part.isdigit() for part in path.split(".")):
                    module_labels[path] = path
                else:
                    module = self._site_layers[name][0]
                    kind = ("conv" if isinstance(module, nn.modules.conv._ConvNd)
                            else "fc" if isinstance(module, nn.Linear) else type(module).__name__.lower())
                    counts[kind] = counts.get(kind, 0) + 1
                    module_labels[path] = f"{kind}{counts[kind]}"
        return {
            name: module_labels[site.module_path] + ("" if site.attribute == "weight" else f".{site.attribute}")
            for name, site in self.sites.items()
        }

    def initial_value(self, name: str) -> torch.Tensor:
        """The network's own initial value of Bayesian parameter ``name``."""
        return self.net.get_buffer(name)

    def latent_sites(self) -> tuple[dict[str, Site | TracedSite], dict[str, torch.Tensor]]:
        """Every latent site of the Pyro model, in the order it samples them, and a starting value for a
        guide (unconstrained space): the Bayesian parameters (``sites``) and the prior's own sites (a
        ``NodeHorseshoe``'s scales, ``Prior.latent_sites``)."""
        return self.prior.latent_sites(self.sites, {name: self.initial_value(name) for name in self.sites})

    def apply(
        self,
        x: torch.Tensor,
        weights: Mapping[str, torch.Tensor] | None = None,
        moments: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """The network's output for ``x`` (B, ...) with the given Bayesian parameters.

        Args:
            weights: values for Bayesian parameters (shared by the whole batch).
            moments: (mean, variance) of parameters of layers with local reparameterization:
                those layers sample their pre-activations N(x·μ, x²·σ²) per example.
        """
        layers = self._site_layers
        unit_masks = self.unit_masks()
        zeroed = {}
        if unit_masks:  # removed units: bias and BatchNorm γ, β zero too, so their output is exactly zero
            zeroed = zeroed_parameters(self.net, self.unit_groups(), unit_masks, skip=frozenset(self.sites))
        with local_reparameterization(layers, moments or {}), substituted_weights(layers, weights or {}), \
                substituted_parameters(self.net, zeroed):
            return self.net(x)

    @property
    def num_weights(self) -> int:
        """Number of Bayesian weights."""
        return sum(site.numel for site in self.sites.values())

    def check_batch(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Raise ValueError when the network cannot take ``x`` or the likelihood cannot observe ``y``.

        The network is probed on up to two examples in eval mode (so BatchNorm and dropout behave
        as in prediction and no running statistics change); every submodule's train/eval mode is
        restored afterwards.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"inputs must be a torch.Tensor, got {type(x).__name__}: convert them with "
                            "torch.as_tensor(x, dtype=torch.float32)")
        if x.dim() == 0:
            raise ValueError("inputs must have a leading batch dimension, got a scalar: pass x of shape (N, ...)")
        if x.numel() == 0:
            raise ValueError("dataset is empty: pass at least one example")
        if not torch.isfinite(x).all():
            raise ValueError("inputs contain NaN or inf: remove or impute those examples")
        output = self._probe(x)
        if y is not None:
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"targets must be a torch.Tensor, got {type(y).__name__}: convert them with "
                                "torch.as_tensor(y)")
            if y.dim() == 0 or len(y) != len(x):
                raise ValueError(f"inputs and targets differ in length: {len(x)} and {len(y) if y.dim() else 0}: "
                                 "give one target per example")
            self.likelihood.check_targets(y, output.shape[-1] if output.dim() > 1 else 1)

    def _compute_dtype(self) -> torch.dtype | None:
        """The floating-point dtype of the network's parameters and buffers (None if it has none)."""
        tensors = itertools.chain(self.net.parameters(), self.net.buffers())
        return next((t.dtype for t in tensors if t.is_floating_point()), None)

    def _probe(self, x: torch.Tensor) -> torch.Tensor:
        """The network's output for the first (up to) two examples of ``x``, computed in eval mode."""
        probe = x[:2].to(next(iter(self.net.buffers())).device)
        modes = [(module, module.training) for module in self.net.modules()]
        try:
            self.net.eval()
            with torch.no_grad():
                return self.net(probe)
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            raise ValueError(self._probe_failure(x, error)) from None
        finally:
            for module, training in modes:
                module.training = training

    def _probe_failure(self, x: torch.Tensor, error: BaseException) -> str:
        """Why the network could not take ``x``: its dtype when that differs, else its shape."""
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        computes = self._compute_dtype()
        if computes is not None and x.dtype != computes:
            fix = {torch.float32: "x.float()", torch.float64: "x.double()", torch.float16: "x.half()",
                   torch.bfloat16: "x.bfloat16()"}.get(computes, f"x.to({computes})")
            return (f"inputs have dtype {x.dtype} but the network computes in {computes}: convert them with {fix} "
                    f"({first_line})")
        return f"wrong input shape: the network cannot take examples of shape {tuple(x.shape[1:])} ({first_line})"

    # ----------------------------------------------------------------------------------------
    # The Pyro model
    # ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Pyro model: samples every Bayesian parameter, then observes y (B,) given x (B, ...).

        Pruned weights (``site_masks``) are exactly zero and out of the log density. Under a
        ``NodeHorseshoe`` prior a site holds the standardized weight β and the network computes with
        τ̃ β, τ̃ drawn at the site's scale sites (``Prior.scale_weight``)."""
        pyro.module(self.pyro_name, self)
        masks = self.site_masks()
        weights = {}
        for name in self.sites:
            mask = masks.get(name)
            weight = pyro.sample(name, self.site_prior(name, mask))
            weights[name] = self.prior.scale_weight(name, weight if mask is None else weight * mask)
        output = self.apply(x, weights)
        batch = torch.arange(x.shape[0], device=x.device)
        with pyro.plate("data", self.dataset_size, subsample=batch):
            pyro.deterministic("output", output, event_dim=output.dim() - 1)
            return self.likelihood.observe(output, y)


__all__ = ["BayesianNetwork", "LocalReparameterization", "Site"]
