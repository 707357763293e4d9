"""Step 2: read the posterior and attach it to the model's parameters.

Accepted forms (Gaussians centred on the model's current parameters):

* ``{parameter name: variance tensor of the parameter's shape}`` (names as in ``model.named_parameters()``,
  tied aliases accepted), where an entry may also be a structured block (``Kron``, ``Dense``,
  ``FullCovariance`` below);
* a flat vector over the parameters that require grad, in ``model.parameters()`` order, each tensor
  row-major (laplace-torch's ``posterior_variance`` convention);
* a float: that variance for every parameter that requires grad;
* an ``ivon.IVON`` optimizer: variance ``1 / (ess * (hess + weight_decay))`` per parameter;
* a fitted laplace-torch object (``laplace.py``): diag, Kronecker-factored or full, any subset of weights;
* None, for a model of mean-field layers (``meanfield.py``).

Parameters without a variance are deterministic.  The user's tensors are copied, never modified.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from . import laplace
from .errors import PosteriorError
from .meanfield import meanfield_posterior
from .structures import Dense, FullCovariance, Kron, ParameterPosterior, Posterior, split_flat





def canonical_names(model: nn.Module) -> dict[str, str]:
    """Map every name a parameter is reachable under (tied aliases too) to its first name."""
    first_name: dict[int, str] = {}
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names[name] = first_name.setdefault(id(p), name)
    return names


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _check_variance(name: str, variance: torch.Tensor) -> None:
    if not torch.isfinite(variance).all():
        raise PosteriorError(f"the variance of '{name}' contains NaN or infinite values; variances must be finite")
    if (variance < 0).any():
        raise PosteriorError(
            f"the variance of '{name}' has negative entries (min {variance.min().item():.3g}); "
            "pass variances (squared standard deviations), which are >= 0"
        )


def _from_mapping(model: nn.Module, posterior: Mapping) -> Posterior:
    names = canonical_names(model)
    params = dict(model.named_parameters())
    result: Posterior = {}
    for key, variance in posterior.items():
        if key not in names:
            close = [n for n in params if n.endswith(str(key).split(".")[-1])][:5]
            raise PosteriorError(
                f"posterior key '{key}' names no parameter of {type(model).__name__}; "
                f"use names from model.named_parameters() (similar: {close or list(params)[:5]})"
            )
        name = names[key]
        if isinstance(variance, (Kron, Dense, FullCovariance)):
            result[name] = _check_structure(key, variance, params[name])
            continue
        variance = _as_variance_tensor(key, variance)
        if variance.shape != params[name].shape:
            raise PosteriorError(
                f"the variance for '{key}' has shape {tuple(variance.shape)} but the parameter has shape "
                f"{tuple(params[name].shape)}; give one variance per parameter entry"
            )
        result[name] = variance
    return result


def _as_variance_tensor(key: object, variance: object) -> torch.Tensor:
    """A posterior dict entry as a real-valued tensor, or a PosteriorError naming ``key``."""
    advice = (
        "give a tensor of variances of the parameter's shape (or a Kron / Dense / FullCovariance block), or leave "
        "the key out to keep that parameter deterministic"
    )
    if variance is None or isinstance(variance, (str, bytes)):
        raise PosteriorError(f"the posterior entry '{key}' is {type(variance).__name__} {variance!r}; {advice}")
    try:
        tensor = torch.as_tensor(variance).detach()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise PosteriorError(
            f"the posterior entry '{key}' ({type(variance).__name__}) is not a tensor of numbers ({exc}); {advice}"
        ) from exc
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise PosteriorError(
            f"the variance for '{key}' has dtype {tensor.dtype}; variances are real numbers >= 0: {advice}"
        )
    return tensor


def _check_structure(key: str, spec: ParameterPosterior, param: torch.Tensor) -> ParameterPosterior:
    """Check the shapes of a structured parameter posterior against its parameter."""
    expected = spec.expected_shapes(param)
    for field, shape in expected.items():
        tensor = getattr(spec, field)
        if tuple(tensor.shape) != shape:
            raise PosteriorError(
                f"the {type(spec).__name__} posterior of '{key}' has {field} of shape {tuple(tensor.shape)}; a "
                f"parameter of shape {tuple(param.shape)} needs {shape}"
            )
        if not torch.isfinite(tensor).all():
            raise PosteriorError(f"the {type(spec).__name__} posterior of '{key}' has NaN or infinite entries")
    return spec


def _from_flat(model: nn.Module, flat: torch.Tensor) -> Posterior:
    trainable = _trainable(model)
    expected = sum(p.numel() for _, p in trainable)
    if flat.dim() != 1 or flat.numel() != expected:
        raise PosteriorError(
            f"a flat posterior variance must be a vector with one entry per trainable parameter entry "
            f"({expected} for {len(trainable)} tensors that require grad, in model.parameters() order); "
            f"got shape {tuple(flat.shape)}"
        )
    return split_flat(flat, trainable)


def _from_ivon(model: nn.Module, optimizer) -> Posterior:
    by_id = {id(p): n for n, p in model.named_parameters()}
    result = {}
    for group in optimizer.param_groups:
        if "hess" not in group:
            raise PosteriorError("the IVON optimizer has no Hessian estimate yet; train with it before compiling")
        if any(id(p) not in by_id for p in group["params"]):
            raise PosteriorError(
                "the IVON optimizer holds parameters that are not in this model; pass the optimizer that "
                "trained this model"
            )
        variance = 1.0 / (group["ess"] * (group["hess"] + group["weight_decay"]))
        result.update(split_flat(variance, [(by_id[id(p)], p) for p in group["params"]]))
    return result


def is_ivon(posterior: object) -> bool:
    return type(posterior).__name__ == "IVON" and hasattr(posterior, "param_groups")


def read_posterior(model: nn.Module, posterior: object) -> Posterior:
    """Normalise any accepted posterior form to ``{canonical parameter name: variance or structure}``."""
    if posterior is None:
        result = meanfield_posterior(model)
        if not result:
            raise PosteriorError(
                "no posterior given and the model has no mean-field layers; pass a posterior: a dict "
                "{parameter name: variance}, a flat variance vector, a float, a fitted laplace-torch object or an "
                "ivon.IVON optimizer"
            )
    elif isinstance(posterior, bool):
        raise PosteriorError("the posterior must be a dict, a flat tensor, a float or an ivon.IVON optimizer")
    elif isinstance(posterior, (int, float)):
        result = {n: torch.full_like(p, float(posterior)) for n, p in _trainable(model)}
    elif isinstance(posterior, Mapping):
        result = _from_mapping(model, posterior)
    elif isinstance(posterior, torch.Tensor):
        result = _from_flat(model, posterior.detach())
    elif is_ivon(posterior):
        result = _from_ivon(model, posterior)
    elif laplace.is_laplace(posterior):
        result = laplace.read_laplace(model, posterior)
    else:
        raise PosteriorError(
            f"cannot read a posterior from {type(posterior).__name__}; pass a dict {{parameter name: variance}}, "
            "a flat variance vector in model.parameters() order, a float, or an ivon.IVON optimizer"
        )
    for name, variance in result.items():
        if isinstance(variance, torch.Tensor):
            _check_variance(name, variance)
    return {
        n: v.detach().to(v.dtype if v.is_floating_point() else torch.float32).clone()
        if isinstance(v, torch.Tensor) else v
        for n, v in result.items()
    }


def likelihood_of(posterior: object) -> tuple[str | None, float | None]:
    """The likelihood and observation noise the posterior was fitted with, where it knows them (laplace-torch);
    else (None, None)."""
    return laplace.likelihood_of(posterior) if laplace.is_laplace(posterior) else (None, None)


def couples_layers(model: nn.Module, posterior: object) -> bool:
    """Whether the posterior has covariances between layers (a full laplace-torch posterior over several)."""
    return laplace.is_laplace(posterior) and laplace.couples_layers(model, posterior)
