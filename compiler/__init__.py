"""momentprop: compile a PyTorch model and a Gaussian weight posterior into one moment-propagating graph.

The pipeline, one module per step (``options.Options``: compile's keywords, validated once, stored in the compiled
model)::

    capture.capture          torch.export with a dynamic batch, decomposed to the rules' op set
    posterior.read_posterior the posterior as {parameter name: variance}
    rewrite.MomentInterpreter + rewrite.rewrite
                             every op replaced by its rule from momentprop.passes, traced into the moment graph
    emit.emit_onnx           the moment graph as ONNX with a model card
    runtime.CompiledModel    cm(x), cm.predict(x), cm.to_onnx(path)
    runtime.OnnxRunner       an exported file on ONNX Runtime (CPU or CUDA); conversion.convert: ORT format, fp16, int8
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from typing import TYPE_CHECKING, Mapping, Sequence

from ._version import __version__
from .errors import (
    CalibrationError, CaptureError, InputError, MomentpropError, PersistenceError, PosteriorError, ProviderError,
    UnsupportedOpError,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .conversion import convert
    from .onnx_runner import OnnxRunner, predict_onnx
    from .options import Options
    from .persist import load_posterior, save_posterior
    from .runtime import CompiledModel, load
    from .structures import Dense, FullCovariance, Kron

__all__ = [
    "CalibrationError", "CaptureError", "CompiledModel", "Dense", "FullCovariance", "InputError", "Kron",
    "MomentpropError", "OnnxRunner", "Options", "PersistenceError", "PosteriorError", "ProviderError",
    "UnsupportedOpError", "__version__", "compile", "convert", "eager", "load", "load_posterior", "predict_onnx",
    "save_posterior",
]

# Imported on first use: the compiler's names import torch, and running an exported file (OnnxRunner, predict_onnx,
# convert, the CLI's predict/inspect/convert) needs only onnxruntime, onnx and numpy (`pip install momentprop`);
# onnx alone takes a second to import, numpy a quarter. No module may share a public name (importing a submodule
# sets the package attribute of its name, which would then shadow the function: `convert` lives in conversion.py).
_LAZY = {
    "convert": "conversion", "OnnxRunner": "onnx_runner", "predict_onnx": "onnx_runner",
    "CompiledModel": "runtime", "load": "runtime", "Options": "options", "load_posterior": "persist",
    "save_posterior": "persist", "Dense": "structures", "FullCovariance": "structures", "Kron": "structures",
}


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'momentprop' has no attribute {name!r}")
    value = getattr(_compiler_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def _compiler_module(name: str):
    """``momentprop.<name>``, with a clear error where the compiler's dependencies are not installed."""
    try:
        return importlib.import_module(f".{name}", __name__)
    except ImportError as exc:
        if exc.name not in ("torch", "onnxscript", "safetensors"):
            raise
        raise ImportError(
            f"momentprop's compiler needs {exc.name}, which is not installed: this is the runtime-only install, which "
            "runs exported files (OnnxRunner, predict_onnx, convert and the CLI). Install the compiler with "
            "pip install 'momentprop[compile]'"
        ) from exc


def compile(
    model: nn.Module,
    posterior: object = None,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    *,
    covariance: str | None = None,
    likelihood: str | None = None,
    sigma_noise: float | None = None,
    output_covariance: bool = False,
    variance_scale: float = 1.0,
    link: str | None = None,
    input_variance: bool = False,
    dynamic_image_size: bool = False,
    attention: str = "paper",
    predictive: str | None = None,
    activations: str | None = None,
) -> CompiledModel:
    """Compile ``model`` with a Gaussian weight ``posterior`` into a moment graph for the moments of the
    model's first output tensor.

    Args:
        model: any module torch.export can capture; it is not modified.
        posterior: ``{parameter name: variance}``, a flat variance vector over the trainable parameters in
            ``model.parameters()`` order, a float, an ``ivon.IVON`` optimizer, or None for a model built from
            mean-field layers (bayesian-torch), whose posterior is in the layers.
        example_inputs: tensors for one call ``model(*example_inputs)``; dim 0 is the (dynamic) batch.
        covariance: ``"diag"`` (variances) or ``"full"`` (covariance over the last dim, per sample).  Default:
            ``"full"`` where it is cheap (a vector output of at most 128 features, no layer wider than 512, no
            attention; with random convolution kernels only under the GLM with linearised activations and at most
            30,000 outputs x random kernel entries, as LeNet-5's), else ``"diag"``.  Full mode carries convolutions
            exactly (maps over each image's flattened entries, applied as the convolutions themselves).
            ``cm.info.options.automatic`` names the options chosen by default.
        likelihood: ``"classification"`` (probit head), ``"regression"`` (observation noise) or None.
        sigma_noise: regression observation noise standard deviation.
        output_covariance: in diag mode, return the full covariance of the final layer's output.
        variance_scale: multiplies the output (co)variance (the paper's scale factor; ``cm.calibrate`` fits it).
        link: classification head: ``"probit"`` (per logit), ``"pairwise"`` (the probit of each logit difference,
            with the covariance between logits), or laplace-torch's Laplace bridge ``"bridge"`` / ``"bridge_norm"``.
            Default: "pairwise" for two classes with ``predictive="suq"``, "probit" otherwise.
        input_variance: add one elementwise variance input per model input (named ``input_variance``, or
            ``<input name>_variance`` for several inputs), to push a Gaussian over the inputs through the network.
        dynamic_image_size: let image inputs (floating, 3-d to 5-d) take other heights and widths, in torch and in
            the ONNX file, where the model allows it (a fully convolutional network); the image size stays the
            example's where the model, a rule or ONNX export needs it (an adaptive pooling to a grid).  Off by
            default: symbolic image sizes make compiling a CNN several times slower.
        attention: ``"paper"`` (queries and keys deterministic: attention weights from the means) or
            ``"linearised"`` (the softmax linearised, so uncertainty in queries and keys propagates too).
        predictive: ``"suq"`` (the paper's moment matching) or ``"glm"`` (first order in the weights: with
            ``covariance="full"`` exactly laplace-torch's linearised (GLM) predictive for posteriors that are
            block-diagonal across layers; "glm" implies ``attention="linearised"``).  Default: laplace-torch's own
            default, "glm", for a laplace-torch posterior that does not couple layers; "suq" otherwise.
        activations: ``"linearised"`` (the paper: each activation linearised at its input mean, so the mean is the
            plain forward pass) or ``"moment_matched"`` (each activation's Gaussian moments, with its expected
            slope carrying the correlations: bounded variances for saturating activations, a corrected mean; with
            ``predictive="suq"`` only).  Default: "moment_matched" for IVON and mean-field layers (the best measured
            choice there), "linearised" otherwise.
    """
    keywords = dict(
        covariance=covariance, likelihood=likelihood, sigma_noise=sigma_noise, output_covariance=output_covariance,
        variance_scale=variance_scale, link=link, input_variance=input_variance,
        dynamic_image_size=dynamic_image_size, attention=attention,
        predictive=predictive, activations=activations,
    )
    interpreter, program, inputs = _interpreter(model, posterior, example_inputs, keywords)
    from .capture import free_dims
    from .emit import quiet_torch
    from .options import CompiledInfo
    from .rewrite import rewrite
    from .runtime import CompiledModel

    with quiet_torch():
        moment_program = rewrite(interpreter, inputs, images=any(free - {0, 1} for free in free_dims(program)))
    names = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if interpreter.config.input_variance:
        names += ["input_variance"] if len(names) == 1 else [f"{name}_variance" for name in names]
    info = CompiledInfo(interpreter.config, random_parameters=interpreter.random_parameters, input_names=names)
    compiled = CompiledModel(moment_program, info, inputs)
    compiled._recompile = lambda **changes: compile(model, posterior, example_inputs, **{**keywords, **changes})
    return compiled


def eager(
    model: nn.Module, posterior: object = None, example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    **options: object,
) -> nn.Module:
    """The moment computation of :func:`compile`, run eagerly instead of traced into a graph: a module whose
    ``forward(*inputs)`` returns what the compiled model returns.  The same rules, seconds faster to build on large
    graphs (tracing is most of a compile); for checking rules and debugging, not for deployment (no ONNX)."""
    interpreter, _, _ = _interpreter(model, posterior, example_inputs, options)
    return interpreter


def _interpreter(model: nn.Module, posterior: object, example_inputs, keywords: dict) -> tuple:
    """The checks, capture and posterior of :func:`compile`: (the moment interpreter, the captured program, the
    example inputs the moment graph is traced with)."""
    _compiler_module("emit")  # the clear error where torch is missing
    import torch
    from torch import nn

    from .capture import capture, normalise_example_inputs
    from .emit import quiet_torch
    from .laplace import is_laplace
    from .meanfield import deterministic_meanfield
    from .options import (
        AUTOMATIC, Options, default_activations, default_covariance, default_link, default_predictive,
    )
    from .posterior import couples_layers, is_ivon, likelihood_of, read_posterior
    from .prepass import has_attention, output_shape, random_kernel_entries
    from .rewrite import MomentInterpreter

    unknown = sorted(set(keywords) - {f.name for f in dataclasses.fields(Options)} | ({"automatic"} & set(keywords)))
    if unknown:
        raise InputError(f"unknown option(s) {unknown}; the options are those of momentprop.compile")
    likelihood, sigma_noise = keywords.get("likelihood"), keywords.get("sigma_noise")
    fitted_likelihood, fitted_sigma = likelihood_of(posterior)  # laplace-torch knows both
    likelihood = likelihood or fitted_likelihood
    if likelihood == "regression" and sigma_noise is None:
        sigma_noise = fitted_sigma
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    automatic = tuple(name for name in AUTOMATIC if keywords.get(name) is None and (
        name != "link" or likelihood == "classification"))
    source = "laplace" if is_laplace(posterior) else "variational" if posterior is None or is_ivon(posterior) else (
        "variances")
    if "predictive" in automatic:
        keywords["predictive"] = default_predictive(source, couples_layers(model, posterior),
                                                    keywords.get("activations"))
    if "activations" in automatic:
        keywords["activations"] = default_activations(source, keywords["predictive"])
    # chosen from the graph after capture
    provisional = {"covariance": keywords.get("covariance") or "diag", "link": keywords.get("link") or "probit"}
    options = Options(**{**keywords, **provisional, "likelihood": likelihood, "sigma_noise": sigma_noise,
                         "automatic": automatic})
    if options.variance_scale == 0:
        raise InputError("variance_scale must be a positive finite number, got 0 (that is the plain model's MAP "
                         "prediction; cm.calibrate chooses 0 itself where the data says so)")
    if options.predictive == "glm":
        if couples_layers(model, posterior):
            raise PosteriorError(
                "predictive='glm' is exact only for posteriors that are block-diagonal across layers, and this full "
                "Laplace posterior couples the layers (moment propagation would drop those covariances); use "
                "hessian_structure='kron' or 'diag', a last-layer posterior, or predictive='suq'"
            )
    if isinstance(posterior, Mapping) and not posterior and not options.input_variance:
        raise PosteriorError(
            "the posterior is empty ({}): nothing would be random and every variance would be 0; give "
            "{parameter name: variance} for the parameters that should be random (a float for all of them), or "
            "compile with input_variance=True to propagate only a Gaussian over the inputs"
        )
    if any(m.training for m in model.modules()):
        warnings.warn(
            f"{type(model).__name__} is in train mode; momentprop compiles it in eval mode (dropout off, batch norm "
            "with its running statistics), as it will predict. The model's own train/eval flags are left as they "
            "are; call model.eval() before compiling to silence this warning",
            UserWarning,
            stacklevel=3,
        )
    inputs = normalise_example_inputs(example_inputs)
    if options.input_variance and not all(x.is_floating_point() for x in inputs):
        raise InputError(
            "input_variance=True needs floating-point inputs (integer inputs such as token ids carry no variance)"
        )
    variances = read_posterior(model, posterior)
    with quiet_torch():
        with deterministic_meanfield(model):
            program = capture(model, inputs, images=options.dynamic_image_size)
        if "covariance" in automatic:
            widest = max((p.shape[0] for p in model.parameters() if p.dim()), default=1)
            kernels = random_kernel_entries(program, variances)
            options = dataclasses.replace(options, covariance=default_covariance(
                output_shape(program.graph), widest, has_attention(program.graph), kernels,
                options.predictive == "glm" and options.activations == "linearised"))
        if "link" in automatic:
            options = dataclasses.replace(options, link=default_link(
                options.likelihood, options.predictive, output_shape(program.graph)))
        interpreter = MomentInterpreter(program, model, variances, options)
        if options.input_variance:
            inputs = inputs + tuple(torch.zeros_like(x) for x in inputs)
    return interpreter, program, inputs
