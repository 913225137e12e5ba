"""ArviZ ``InferenceData`` from a ``Posterior`` (the one place that builds it; ArviZ is an optional extra).

Groups (dims ``chain``, ``draw``):

- ``posterior``: the prior hyperparameters per draw where a sampler recorded them ("inclusion" π,
  "slab_scale" σ₁, "spike_scale" σ₀; constant ones are left out) and "weight" (dim ``weight_name``):
  the ``max_weights`` weights of largest |posterior mean| among those non-zero in every draw, named
  like ``"1.weight[3, 5]"``;
- ``sample_stats``: the sampler's per-draw "lp" (log joint of the training data, as the sampler
  recorded it), "sparsity", "step_size"; for a guide, "sparsity" and, given ``train_data``, "lp": the
  log joint of the draw on the training data, log p(y_train | x_train, w) + log p(w) summed over the
  active (non-zero) weights (pruned weights are not part of the model); no "lp" without ``train_data``;
- ``log_likelihood``: "y" (dim ``example``), log p(y_i | x_i, w) per draw on ``data`` (each draw with its
  own deterministic parameters, e.g. a sampled likelihood scale: ``posterior.evaluate_draw``);
- ``observed_data``: "y".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .data import as_tensors

if TYPE_CHECKING:
    from .posterior import Posterior

HYPERPARAMETERS = ("inclusion", "slab_scale", "spike_scale", "unit_inclusion")


def import_arviz():
    """``import arviz``, or an ImportError saying how to install it."""
    try:
        import arviz
    except ImportError as error:
        raise ImportError(
            "ArviZ is needed for posterior diagnostics: pip install pyro-sparse[arviz]"
        ) from error
    return arviz


def _stored_draws(posterior: Posterior, num_draws: int) -> tuple[dict[str, torch.Tensor], int]:
    """name -> (S, ...) draws and the number of chains."""
    if posterior.num_stored is not None:
        if posterior.num_stored == 0:
            raise ValueError("cannot convert an empty posterior to ArviZ: it holds no draws")
        return posterior.samples, posterior.num_chains
    if int(num_draws) != num_draws or num_draws < 1:
        raise ValueError(f"num_draws must be a positive integer, got {num_draws!r}")
    draws = list(posterior.draws(int(num_draws)))
    return {name: torch.stack([draw[name] for draw in draws]) for name in draws[0]}, 1


def _chosen_weights(posterior: Posterior, draws: dict[str, torch.Tensor], max_weights: int
                    ) -> tuple[list[str], torch.Tensor]:
    """The names and (S, K) values of the ``max_weights`` active weights of largest |mean|."""
    candidates = []
    for name in posterior.model.sites:
        values = draws[name].detach().reshape(len(draws[name]), -1).float()
        score = values.mean(0).abs().masked_fill(~(values != 0).all(0), -1.0)  # active in every draw
        top = torch.topk(score, min(max_weights, score.numel()))
        candidates += [(float(s), name, int(i)) for s, i in zip(top.values, top.indices, strict=True) if s >= 0]
    candidates.sort(key=lambda item: -item[0])
    chosen = candidates[:max_weights]
    names, columns = [], []
    for _, name, index in chosen:
        shape = posterior.model.sites[name].shape
        position = ", ".join(str(int(i)) for i in np.unravel_index(index, tuple(shape)))
        names.append(f"{name}[{position}]")
        columns.append(draws[name].reshape(len(draws[name]), -1)[:, index])
    values = torch.stack(columns, 1) if columns else torch.zeros(len(next(iter(draws.values()))), 0)
    return names, values


def _draw_list(draws: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """name -> (S, ...) as a list of S draws name -> (...)."""
    total = len(next(iter(draws.values())))
    return [{name: value[s] for name, value in draws.items()} for s in range(total)]


def _pointwise_log_likelihood(posterior: Posterior, draws: dict[str, torch.Tensor], data, batch_size: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, N) log p(y_i | x_i, draw s) on ``data`` (x, y) and its targets y (N,)."""
    from .posterior import predict_draws

    x, y = as_tensors(data)
    posterior.model.check_batch(x, y)
    return predict_draws(posterior.model, _draw_list(draws), x, y, batch_size).log_likelihood, y


def _log_prior_of_active_weights(posterior: Posterior, draws: dict[str, torch.Tensor]) -> torch.Tensor:
    """(S,): log p(w_s) summed over the weights that are not exactly zero (pruned ones are out of the model)."""
    total = len(next(iter(draws.values())))
    log_prior = torch.zeros(total, dtype=torch.float64)
    with torch.no_grad():
        for name in posterior.model.sites:
            weights = draws[name].float()
            terms = posterior.model.prior.log_prob(weights).masked_fill(weights == 0, 0.0)
            log_prior += terms.reshape(total, -1).sum(1).double().cpu()
    return log_prior


def build(
    posterior: Posterior,
    data=None,
    var_names: Sequence[str] | None = None,
    max_weights: int = 16,
    num_draws: int = 100,
    batch_size: int = 1024,
    train_data=None,
):
    """The InferenceData of ``posterior`` (see the module docstring and ``Posterior.to_arviz``)."""
    az = import_arviz()
    if int(max_weights) != max_weights or max_weights < 0:
        raise ValueError(f"max_weights must be an integer >= 0, got {max_weights!r}")
    draws, chains = _stored_draws(posterior, num_draws)
    total = len(next(iter(draws.values())))
    per_chain = total // chains

    def shaped(values: torch.Tensor | np.ndarray) -> np.ndarray:
        array = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        return array.reshape(chains, per_chain, *array.shape[1:])

    variables: dict[str, np.ndarray] = {}
    for name in HYPERPARAMETERS:
        values = posterior.hyperparameters.get(name)
        if values is not None and float(values.max() - values.min()) > 0:
            variables[name] = values.detach().cpu().double().numpy().reshape(chains, per_chain)
    names, weights = _chosen_weights(posterior, draws, int(max_weights))
    if names:
        variables["weight"] = shaped(weights)
    if var_names is not None:
        unknown = set(var_names) - {*HYPERPARAMETERS, "weight"}
        if unknown:
            raise ValueError(f"var_names: unknown variables {sorted(unknown)}; choose from "
                             f"{[*HYPERPARAMETERS, 'weight']}")
        variables = {name: value for name, value in variables.items() if name in var_names}
    if not variables:
        raise ValueError("nothing to put in the posterior group: no varying hyperparameters and no weights chosen")

    stats = {name: value.detach().cpu().double().numpy().reshape(chains, per_chain)
             for name, value in posterior.sample_stats.items()}
    if "sparsity" not in stats:
        zeros = sum((draws[name].reshape(total, -1) == 0).sum(1) for name in posterior.model.sites)
        stats["sparsity"] = shaped(zeros.double() / posterior.model.num_weights)

    groups: dict[str, Any] = {}
    if data is not None:
        pointwise, y = _pointwise_log_likelihood(posterior, draws, getattr(data, "test", data), batch_size)
        groups["log_likelihood"] = {"y": shaped(pointwise)}
        groups["observed_data"] = {"y": y.cpu().numpy()}
    if "lp" not in stats and train_data is not None:
        on_train, _ = _pointwise_log_likelihood(posterior, draws, getattr(train_data, "train", train_data), batch_size)
        stats["lp"] = shaped(on_train.double().sum(1) + _log_prior_of_active_weights(posterior, draws))
    return az.from_dict(
        posterior=variables,
        sample_stats=stats,
        coords={"weight_name": names},
        dims={"weight": ["weight_name"], "y": ["example"]},
        **groups,
    )


def from_pyro_draws(model, draws: dict[str, torch.Tensor], *model_args: Any, **model_kwargs: Any):
    """The InferenceData of draws of any Pyro model's latent sites (e.g. SGHMC chains of a ``PyroPotential``).

    Args:
        model: a Pyro model, called as ``model(*model_args, **model_kwargs)`` with its observed data.
        draws: site name -> (chains, draws, *site shape) values in the model's (constrained) space.
        model_args, model_kwargs: the data to score, e.g. ``(x, y)``.

    Returns an ``arviz.InferenceData`` with ``posterior`` (every site of ``draws``), ``log_likelihood``
    (every observed site: log p(y_i | ·) per draw and observed element, from the model conditioned on the
    draw) and ``observed_data``; R-hat, ESS and LOO (``az.loo``) work on it as on any ArviZ object.
    """
    if not draws:
        raise ValueError("draws is empty: pass site name -> (chains, draws, ...) tensors")
    chains, per_chain = next(iter(draws.values())).shape[:2]
    for name, value in draws.items():
        if tuple(value.shape[:2]) != (chains, per_chain):
            raise ValueError(f"draws[{name!r}] has shape {tuple(value.shape)}: every site needs the same (chains, "
                             f"draws) = ({chains}, {per_chain}) leading dimensions")
    from .pyro_posterior import PyroPosterior

    flat = {name: value.reshape(chains * per_chain, *value.shape[2:]) for name, value in draws.items()}
    return pyro_inference_data(PyroPosterior(model, flat, chains), model_args, model_kwargs)


def pyro_inference_data(posterior, model_args: tuple, model_kwargs: dict[str, Any]):
    """The InferenceData of a ``PyroPosterior`` (``PyroPosterior.to_arviz``): posterior, the (S, ...)
    draws and the (chains, draws) hyperparameters as (chains, S / chains, ...); log_likelihood and
    observed_data: every observed site of the model called with ``(*model_args, **model_kwargs)`` and
    conditioned on each draw; sample_stats."""
    az = import_arviz()
    chains = posterior.chains
    per_chain = posterior.num_samples // chains
    pointwise = posterior.pointwise_log_likelihood(*model_args, **model_kwargs)
    first = next(posterior.observed_sites(*model_args, **model_kwargs))
    observed = {name: site["value"].detach().cpu().numpy() for name, site in first.items()}

    def shaped(value: torch.Tensor | np.ndarray) -> np.ndarray:
        array = value.detach().cpu().double().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        return array.reshape(chains, per_chain, *array.shape[1:])

    variables = {name: shaped(value) for name, value in posterior.samples.items()}
    variables.update({name: shaped(value.reshape(-1)) for name, value in posterior.hyperparameters.items()})
    log_likelihood = {name: shaped(values) for name, values in pointwise.items()}
    stats = {name: shaped(value.reshape(-1)) for name, value in posterior.sample_stats.items()}
    return az.from_dict(posterior=variables, log_likelihood=log_likelihood, observed_data=observed,
                        **({"sample_stats": stats} if stats else {}))


def diagnostics(idata) -> dict[str, float]:
    """``r_hat_max`` and ``ess_bulk_min`` over every posterior variable (NaN-free where defined)."""
    az = import_arviz()
    summary = az.summary(idata, kind="diagnostics")
    r_hat = summary["r_hat"].dropna()
    ess = summary["ess_bulk"].dropna()
    return {"r_hat_max": float(r_hat.max()) if len(r_hat) else float("nan"),
            "ess_bulk_min": float(ess.min()) if len(ess) else float("nan")}
