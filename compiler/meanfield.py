"""Mean-field layer libraries (bayesian-torch): the posterior lives in the model's own layers.

Contract used by ``momentprop.compile``:

* ``meanfield_posterior(model)`` returns ``{name of the mean parameter: variance}`` for every mean-field layer
  (``sigma = softplus(rho)``), or ``{}`` when the model has none;
* ``deterministic_meanfield(model)`` is a context manager under which every mean-field layer computes its
  output from the means only (no sampling), with its usual return structure, so torch.export captures the
  mean path; it restores the layers on exit.

bayesian-torch is optional: its layers are recognised by class and module name, so it is never imported here.
A bayesian-torch layer keeps its posterior in pairs of parameters ``mu_X`` / ``rho_X`` (X = weight, kernel or
bias); its prior (``prior_*_mu``, ``prior_*_sigma``) and noise (``eps_*``) are buffers and are not random.
Convolution layers get their mean path too, so a model using them fails in the compiler with an
UnsupportedOpError naming the convolution op until momentprop has a rule for it.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedOpError

_LIBRARY = "bayesian_torch"
MeanOutput = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.mu_weight, layer.mu_bias)


def _conv(conv: Callable[..., torch.Tensor]) -> MeanOutput:
    def mean_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return conv(x, layer.mu_kernel, layer.mu_bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return mean_output


# {bayesian-torch layer class name: its output with every weight at its posterior mean}
MEAN_OUTPUT: dict[str, MeanOutput] = {
    "LinearReparameterization": _linear,
    "LinearFlipout": _linear,
    "Conv1dReparameterization": _conv(F.conv1d),
    "Conv1dFlipout": _conv(F.conv1d),
    "Conv2dReparameterization": _conv(F.conv2d),
    "Conv2dFlipout": _conv(F.conv2d),
    "Conv3dReparameterization": _conv(F.conv3d),
    "Conv3dFlipout": _conv(F.conv3d),
}


def _mean_field_pairs(layer: nn.Module) -> list[tuple[str, str]]:
    """The layer's own ``(mu_X, rho_X)`` parameter pairs whose mean is not None."""
    own = dict(layer.named_parameters(recurse=False))
    return [(n, "rho_" + n[3:]) for n in own if n.startswith("mu_") and "rho_" + n[3:] in own]


def _library_class(cls: type) -> type | None:
    """The first bayesian-torch class in ``cls``'s MRO (``cls`` itself, or the layer a user class derives from)."""
    return next((c for c in cls.__mro__ if c.__module__.startswith(_LIBRARY + ".")), None)


def _meanfield_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every bayesian-torch layer holding a posterior; raises on ones without a mean path
    (other bayesian-torch layers, or a subclass that overrides forward), which would sample during capture."""
    layers = []
    for name, module in model.named_modules():
        cls, base = type(module), _library_class(type(module))
        if base is None or not _mean_field_pairs(module):
            continue
        if base.__name__ not in MEAN_OUTPUT or cls.forward is not base.forward:
            raise UnsupportedOpError(
                f"mean-field layer '{name or '<root>'}' ({cls.__module__}.{cls.__qualname__}) is not supported; "
                f"momentprop knows the bayesian-torch layers {', '.join(MEAN_OUTPUT)}.\n"
                "What you can do: replace the layer, or convert the model to plain layers and pass the posterior "
                "as a dict {parameter name: variance}."
            )
        layers.append((name, module))
    return layers


@torch.no_grad()
def meanfield_posterior(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{mean parameter name: softplus(rho)**2}`` over the model's mean-field layers; ``{}`` if it has none."""
    return {
        f"{name}.{mu}" if name else mu: F.softplus(getattr(layer, rho).detach()).square()
        for name, layer in _meanfield_layers(model)
        for mu, rho in _mean_field_pairs(layer)
    }


def _deterministic_forward(layer: nn.Module, mean_output: MeanOutput) -> Callable[..., object]:
    """A forward with bayesian-torch's signature and return structure, computed from the means only."""
    def forward(input: torch.Tensor, return_kl: bool = True) -> object:
        out = mean_output(layer, input)
        if return_kl and not getattr(layer, "dnn_to_bnn_flag", False):
            return out, layer.kl_loss()
        return out
    return forward


@contextlib.contextmanager
def deterministic_meanfield(model: nn.Module) -> Iterator[None]:
    """Within the block every mean-field layer of ``model`` outputs its mean path (no sampling); on exit
    (also on error) each layer's own forward is back."""
    _missing = object()
    saved: list[tuple[nn.Module, object]] = []
    try:
        for _, layer in _meanfield_layers(model):
            saved.append((layer, layer.__dict__.get("forward", _missing)))
            layer.forward = _deterministic_forward(layer, MEAN_OUTPUT[_library_class(type(layer)).__name__])
        yield
    finally:
        for layer, forward in reversed(saved):
            if forward is _missing:
                del layer.forward
            else:
                layer.forward = forward
