"""laplace-torch posteriors, read through its public properties (``posterior_variance``,
``posterior_precision``, ``posterior_covariance``), so prior precision, temperature and observation noise
mean exactly what they mean in laplace-torch's own predictive.

* diag → a variance per parameter;
* kron → per weight a Kronecker structure (eigenbases and the eigenvalue matrix ``D``; laplace-torch's own
  ``damping`` flag of the posterior precision decides how the prior is added), per bias its dense covariance;
* full (and a full subnetwork) → per layer the joint block of its weight and bias; the cross-covariances between
  layers are dropped (moment propagation treats layers as independent); a last-layer posterior is one block,
  so it is kept whole;
* subnetwork → the same, with zero variance outside the subnetwork.

laplace-torch is an optional dependency: nothing here imports it unless a Laplace object is passed.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import PosteriorError
from .structures import Dense, FullCovariance, Kron, Posterior, split_flat


def is_laplace(obj: object) -> bool:
    return type(obj).__module__.split(".")[0] == "laplace" and hasattr(obj, "posterior_precision")


def likelihood_of(la) -> tuple[str, float | None]:
    """laplace-torch's likelihood and, for regression, its observation noise std."""
    likelihood = str(getattr(la.likelihood, "value", la.likelihood))
    sigma = float(la.sigma_noise) if likelihood == "regression" else None
    return likelihood, sigma


def _parameters(model: nn.Module, la) -> list[tuple[str, torch.Tensor]]:
    """The model's parameters the posterior is over, named as in ``model.named_parameters()``, in laplace order."""
    if hasattr(la.model, "_last_layer_name"):
        name = la.model._last_layer_name
        modules = dict(model.named_modules())
        if name not in modules:
            raise PosteriorError(
                f"the last-layer Laplace posterior is over module '{name}', which this model does not have; "
                "pass the model the Laplace object was fitted on"
            )
        return [(f"{name}.{n}" if name else n, p) for n, p in modules[name].named_parameters()]
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _check(model: nn.Module, la, params: list[tuple[str, torch.Tensor]]) -> None:
    if getattr(la, "n_data", 0) == 0 or getattr(la, "mean", None) is None:
        raise PosteriorError("the Laplace object is not fitted yet: call la.fit(train_loader) before compiling")
    flat = torch.cat([p.detach().flatten() for _, p in params]) if params else torch.zeros(0)
    mean = torch.as_tensor(la.mean).detach().flatten()
    if flat.shape != mean.shape or not torch.allclose(flat.to(mean), mean, rtol=1e-5, atol=1e-7):
        raise PosteriorError(
            f"the Laplace posterior (mean of {mean.numel()} parameters) was not fitted on this model's current "
            f"parameters ({flat.numel()} selected): pass the model the Laplace object was fitted on, unchanged "
            "since la.fit"
        )


def _subnetwork_indices(la) -> torch.Tensor | None:
    """Subnetwork indices into the flat parameter vector, or None for a posterior over all of it."""
    indices = getattr(getattr(la, "backend", None), "subnetwork_indices", None)
    if indices is None or getattr(la, "n_params_subnet", None) is None:
        return None
    return torch.as_tensor(indices).long()


def _diag(la, params) -> Posterior:
    variance = la.posterior_variance.detach()
    indices = _subnetwork_indices(la)
    if indices is not None:
        variance = torch.zeros(sum(p.numel() for _, p in params), dtype=variance.dtype).index_put((indices,), variance)
    return split_flat(variance, params)


def _kron(la, params) -> Posterior:
    precision = la.posterior_precision
    result: Posterior = {}
    blocks = zip(precision.eigenvectors, precision.eigenvalues, precision.deltas)
    for (name, p), (vectors, values, delta) in zip(params, blocks):
        if len(values) == 1:
            q = vectors[0]
            cov = q @ torch.diag(1.0 / (values[0] + delta)) @ q.T
            result[name] = FullCovariance(cov) if p.dim() == 1 else torch.diagonal(cov).reshape(p.shape)
            continue
        (q_out, q_in), (l_out, l_in) = vectors, values
        if precision.damping:
            root = torch.sqrt(delta)
            d = 1.0 / torch.outer(l_out + root, l_in + root)
        else:
            d = 1.0 / (torch.outer(l_out, l_in) + delta)
        result[name] = Kron(q_out.detach(), q_in.detach(), d.detach())  # a matrix or a convolution kernel
    return result


def _dense(la, params) -> Posterior:
    cov = la.posterior_covariance.detach()
    total = sum(p.numel() for _, p in params)
    indices = _subnetwork_indices(la)
    # position of each parameter entry in ``cov`` (-1: outside the subnetwork, deterministic)
    position = torch.arange(total) if indices is None else torch.full((total,), -1, dtype=torch.long)
    if indices is not None:
        position[indices] = torch.arange(len(indices))
    offsets, offset = {}, 0
    for name, p in params:
        offsets[name] = offset
        offset += p.numel()

    def block(index: torch.Tensor) -> torch.Tensor:
        """The covariance of the parameter entries ``index`` (scattered from the subnetwork covariance)."""
        local = position[index]
        rows = (local >= 0).nonzero().flatten()
        out = torch.zeros(len(index), len(index), dtype=cov.dtype)
        out[rows.unsqueeze(1), rows] = cov[local[rows].unsqueeze(1), local[rows]]
        return out

    result: Posterior = {}
    shapes = dict(params)
    for name, p in params:
        if name in result:
            continue
        start = offsets[name]
        bias_name = name[: -len("weight")] + "bias" if name.endswith("weight") else None
        if p.dim() == 2 and bias_name in shapes and shapes[bias_name].shape == p.shape[:1]:
            out, n_in = p.shape
            w_index = start + torch.arange(out * n_in).reshape(out, n_in)
            b_index = offsets[bias_name] + torch.arange(out).unsqueeze(1)
            index = torch.cat([w_index, b_index], dim=1).flatten()
            result[name] = Dense(block(index).reshape(out, n_in + 1, out, n_in + 1), with_bias=True)
            result[bias_name] = FullCovariance(block(b_index.flatten()))
        elif p.dim() == 2:
            out, n_in = p.shape
            index = start + torch.arange(p.numel())
            result[name] = Dense(block(index).reshape(out, n_in, out, n_in), with_bias=False)
        elif p.dim() == 1:
            result[name] = FullCovariance(block(start + torch.arange(p.numel())))
        else:
            result[name] = torch.diagonal(block(start + torch.arange(p.numel()))).reshape(p.shape)
    return result


def couples_layers(model: nn.Module, la) -> bool:
    """A full posterior over the parameters of more than one module (its cross-layer covariances matter)."""
    if not type(la).__name__.startswith("Full"):
        return False
    modules = {name.rsplit(".", 1)[0] if "." in name else "" for name, _ in _parameters(model, la)}
    return len(modules) > 1


def read_laplace(model: nn.Module, la) -> Posterior:
    """The posterior of a fitted laplace-torch object over ``model``'s parameters."""
    params = _parameters(model, la)
    _check(model, la, params)
    kind = type(la).__name__
    if kind.startswith("Diag"):
        return _diag(la, params)
    if kind.startswith("Kron"):
        return _kron(la, params)
    if kind.startswith("Full"):
        return _dense(la, params)
    raise PosteriorError(
        f"{kind} is not supported: momentprop reads laplace-torch's diag, kron and full posteriors (all weights, "
        "last layer, subnetwork). A low-rank posterior needs laplace-torch's asdl backend from git; convert it "
        "to a dense posterior_covariance and pass that as a full Laplace, or use hessian_structure='kron'"
    )
