"""momentprop: compile a PyTorch model and a Gaussian weight posterior into one moment-propagating graph.

The pipeline, one module per step::

    capture.capture          torch.export with a dynamic batch, decomposed to the rules' op set
    posterior.read_posterior the posterior as {parameter name: variance}
    rewrite.MomentInterpreter + rewrite.rewrite
                             every op replaced by its rule from momentprop.passes, traced into the moment graph
    emit.emit_onnx           the moment graph as ONNX with a model card
    runtime.CompiledModel    cm(x), cm.predict(x), cm.to_onnx(path)
    runtime.OnnxRunner       an exported file on ONNX Runtime (CPU or CUDA); convert.convert: ORT format, fp16, int8
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ._version import __version__
from momentprop.passes.heads import LINKS

from .capture import capture, normalise_example_inputs
from .emit import quiet_torch
from .convert import convert
from .errors import (
    CalibrationError, CaptureError, InputError, MomentpropError, PersistenceError, PosteriorError, ProviderError,
    UnsupportedOpError,
)
from .laplace import couples_layers, is_laplace, likelihood_of
from .meanfield import deterministic_meanfield
from .persist import load_compiled as load
from .persist import load_posterior, save_posterior
from .posterior import Dense, FullCovariance, Kron, read_posterior
from .rewrite import MomentInterpreter, RewriteConfig, rewrite
from .runtime import CompiledInfo, CompiledModel, OnnxRunner, predict_onnx

__all__ = [
    "CalibrationError", "CaptureError", "CompiledModel", "Dense", "FullCovariance", "InputError", "Kron",
    "MomentpropError", "OnnxRunner", "PersistenceError", "PosteriorError", "ProviderError", "UnsupportedOpError",
    "__version__", "compile", "convert", "load", "load_posterior", "predict_onnx", "save_posterior",
]

_COVARIANCES = ("diag", "full")
_LIKELIHOODS = (None, "classification", "regression")
_ATTENTION = ("paper", "linearised")
_PREDICTIVES = ("suq", "glm")


def _check_options(model, covariance, likelihood, sigma_noise, variance_scale, link, attention) -> None:
    if covariance not in _COVARIANCES:
        raise InputError(f"covariance must be one of {_COVARIANCES}, got {covariance!r}")
    if likelihood not in _LIKELIHOODS:
        raise InputError(f"likelihood must be one of {_LIKELIHOODS}, got {likelihood!r}")
    if sigma_noise is not None and (likelihood != "regression" or not sigma_noise >= 0):
        raise InputError("sigma_noise must be a non-negative number and needs likelihood='regression'")
    if not (variance_scale > 0 and variance_scale != float("inf")):
        raise InputError(f"variance_scale must be a positive finite number, got {variance_scale!r}")
    if link not in LINKS or (link != "probit" and likelihood != "classification"):
        raise InputError(f"link must be one of {LINKS} and only applies to likelihood='classification', got {link!r}")
    if attention not in _ATTENTION:
        raise InputError(f"attention must be one of {_ATTENTION}, got {attention!r}")
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def compile(
    model: nn.Module,
    posterior: object = None,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    *,
    covariance: str = "diag",
    likelihood: str | None = None,
    sigma_noise: float | None = None,
    output_covariance: bool = False,
    variance_scale: float = 1.0,
    link: str = "probit",
    input_variance: bool = False,
    attention: str = "paper",
    predictive: str = "suq",
) -> CompiledModel:
    """Compile ``model`` with a Gaussian weight ``posterior`` into a moment graph for the moments of the
    model's first output tensor.

    Args:
        model: any module torch.export can capture; it is not modified.
        posterior: ``{parameter name: variance}``, a flat variance vector over the trainable parameters in
            ``model.parameters()`` order, a float, an ``ivon.IVON`` optimizer, or None for a model built from
            mean-field layers (bayesian-torch), whose posterior is in the layers.
        example_inputs: tensors for one call ``model(*example_inputs)``; dim 0 is the (dynamic) batch.
        covariance: ``"diag"`` (variances) or ``"full"`` (covariance over the last dim, per sample).
        likelihood: ``"classification"`` (probit head), ``"regression"`` (observation noise) or None.
        sigma_noise: regression observation noise standard deviation.
        output_covariance: in diag mode, return the full covariance of the final layer's output.
        variance_scale: multiplies the output (co)variance (the paper's scale factor; ``cm.calibrate`` fits it).
        link: classification head: ``"probit"``, or laplace-torch's Laplace bridge ``"bridge"`` / ``"bridge_norm"``.
        input_variance: add one elementwise variance input per model input (named ``input_variance``, or
            ``<input name>_variance`` for several inputs), to push a Gaussian over the inputs through the network.
        attention: ``"paper"`` (queries and keys deterministic: attention weights from the means) or
            ``"linearised"`` (the softmax linearised, so uncertainty in queries and keys propagates too).
        predictive: ``"suq"`` (the paper's moment matching) or ``"glm"`` (first order in the weights: with
            ``covariance="full"`` exactly laplace-torch's linearised (GLM) predictive for posteriors that are
            block-diagonal across layers; "glm" implies ``attention="linearised"``).
    """
    if is_laplace(posterior):  # laplace-torch knows its likelihood and observation noise
        laplace_likelihood, laplace_sigma = likelihood_of(posterior)
        likelihood = likelihood or laplace_likelihood
        if likelihood == "regression" and sigma_noise is None:
            sigma_noise = laplace_sigma
    _check_options(model, covariance, likelihood, sigma_noise, variance_scale, link, attention)
    if predictive not in _PREDICTIVES:
        raise InputError(f"predictive must be one of {_PREDICTIVES}, got {predictive!r}")
    if predictive == "glm":
        attention = "linearised"  # the GLM predictive linearises everything, attention weights included
        if is_laplace(posterior) and couples_layers(model, posterior):
            raise PosteriorError(
                "predictive='glm' is exact only for posteriors that are block-diagonal across layers, and this full "
                "Laplace posterior couples the layers (moment propagation would drop those covariances); use "
                "hessian_structure='kron' or 'diag', a last-layer posterior, or predictive='suq'"
            )
    inputs = normalise_example_inputs(example_inputs)
    if input_variance and not all(x.is_floating_point() for x in inputs):
        raise InputError("input_variance=True needs floating-point inputs (integer inputs such as token ids carry no variance)")
    variances = read_posterior(model, posterior)
    with quiet_torch():
        with deterministic_meanfield(model):
            program = capture(model, inputs)
        config = RewriteConfig(
            covariance, likelihood, output_covariance and covariance == "diag", link, input_variance, attention,
            predictive,
        )
        interpreter = MomentInterpreter(program, model, variances, config, sigma_noise, variance_scale)
        if input_variance:
            inputs = inputs + tuple(torch.zeros_like(x) for x in inputs)
        moment_program = rewrite(interpreter, inputs)
    names = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if input_variance:
        names += ["input_variance"] if len(names) == 1 else [f"{name}_variance" for name in names]
    info = CompiledInfo(
        covariance=covariance,
        likelihood=likelihood,
        output_covariance=config.output_covariance,
        sigma_noise=sigma_noise,
        random_parameters=interpreter.random_parameters,
        input_names=names,
        link=link,
        input_variance=input_variance,
        attention=attention,
        predictive=predictive,
    )
    return CompiledModel(moment_program, info, inputs)
