"""The options of :func:`momentprop.compile`, validated in one place and stored once.

``compile`` builds one frozen :class:`Options` from its keywords; the compiled model (``cm.info.options``), its
model card, the ONNX metadata and the saved file all read the options from there.  Validation raises
:class:`InputError` naming the option and saying what to pass; a few combinations are normalised on the way
(``output_covariance`` only applies in diag mode; ``predictive="glm"`` linearises the attention softmax too).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

import numpy as np
import torch

from momentprop.passes.heads import LINKS

from .errors import InputError

COVARIANCES = ("diag", "full")
LIKELIHOODS = (None, "classification", "regression")
ATTENTION = ("paper", "linearised")
PREDICTIVES = ("suq", "glm")
ACTIVATIONS = ("linearised", "moment_matched")
# the options chosen from the posterior and the graph when not given
AUTOMATIC = ("covariance", "predictive", "activations", "link")

# full covariance by default only where it is cheap: a vector output of at most this many features, no layer wider
# than this (a parameter's first dim: a layer's outputs, a vocabulary), and no attention (a per-token covariance
# over a transformer's width).  Measured on ReLU MLPs at batch 256 (ONNX Runtime, 2 threads): full costs 2.1-3.0x
# diag at widths 128-1024, 2.4x (2.8 ms against 1.1 ms) at 784-256-256-10
FULL_OUTPUT_LIMIT = 128
FULL_WIDTH_LIMIT = 512


def default_predictive(source: str, couples_layers: bool, activations: str | None) -> str:
    """laplace-torch's own default predictive (the GLM) for its posteriors (``source="laplace"``), where it applies
    (not across coupled layers, not with moment-matched activations); the paper's ("suq") for the others."""
    glm = source == "laplace" and not couples_layers and activations != "moment_matched"
    return "glm" if glm else "suq"


def default_activations(source: str, predictive: str) -> str:
    """Moment-matched activations for a variational posterior as trained (``source="variational"``: IVON,
    mean-field layers), where they were the best compiled predictive on every tabular set of the evaluation suite;
    the paper's linearisation otherwise (the GLM linearises by definition; plain variances keep the paper's rule,
    whose mean is the plain forward pass)."""
    return "moment_matched" if source == "variational" and predictive == "suq" else "linearised"


# with random convolution kernels, full mode carries each image's map from every kernel entry to the outputs (the
# exact GLM): by default only under the GLM with linearised activations and where outputs x random kernel entries is
# at most this.  Measured at batch 32, ONNX Runtime, 2 threads: LeNet-5 (10 x 2,550) full 21.6 ms against diag's
# 2.9 ms (full by default); the task-5 ResNet (10 x 6,984) 90 ms against 3.5 ms (diag by default); under suq the
# second-order terms multiply the graph (the ResNet's export took 200 s)
FULL_CONVOLUTION_LIMIT = 30_000


def default_covariance(output_shape, widest_layer: int, attention: bool, random_kernel_entries: int = 0,
                       exact_glm: bool = False) -> str:
    """``"full"`` where it is cheap (see ``FULL_OUTPUT_LIMIT`` and ``FULL_CONVOLUTION_LIMIT``), ``"diag"``
    otherwise."""
    small_output = len(output_shape) == 2 and isinstance(output_shape[-1], int) and (
        output_shape[-1] <= FULL_OUTPUT_LIMIT)
    if not (small_output and widest_layer <= FULL_WIDTH_LIMIT and not attention):
        return "diag"
    if random_kernel_entries and not (exact_glm and output_shape[-1] * random_kernel_entries <= FULL_CONVOLUTION_LIMIT):
        return "diag"
    return "full"


def default_link(likelihood: str | None, predictive: str, output_shape) -> str:
    """The pairwise probit for two classes under the paper's predictive: the binary prediction depends only on the
    logit difference, whose variance the per-logit probit misses (on ionosphere with IVON, NLPD 0.27 against the
    per-logit probit's 0.34 and MC-1000's 0.29).  The per-logit probit otherwise: laplace-torch's own link for its
    GLM (so ``cm.predict`` equals ``la(x)``), and measured better than the pairwise form with 3 and 10 classes
    (wine 0.037 against 0.043, digits 0.089 against 0.091, IVON)."""
    binary = len(output_shape) >= 1 and isinstance(output_shape[-1], int) and output_shape[-1] == 2
    return "pairwise" if likelihood == "classification" and predictive == "suq" and binary else "probit"


def number(name: str, value: object) -> float:
    """``value`` as a float, or an InputError saying that ``name`` needs a number (a string such as "0.1" is not)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InputError(
            f"{name} must be a number, got {type(value).__name__} {value!r}; pass a float such as {name}=0.1"
        )
    return float(value)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


@dataclass(frozen=True)
class Options:
    """What the moment graph computes (the keywords of :func:`momentprop.compile`, see there).

    Fields hold the normalised values: ``output_covariance`` is False in full mode (the output is a covariance
    anyway), ``attention`` is ``"linearised"`` with ``predictive="glm"``, numbers are floats.  ``variance_scale`` is
    the scale at compile time; ``cm.calibrate`` changes the compiled model's own scale (a buffer of its graph).
    """

    covariance: str = "diag"
    likelihood: str | None = None
    sigma_noise: float | None = None
    output_covariance: bool = False
    variance_scale: float = 1.0
    link: str = "probit"
    input_variance: bool = False
    dynamic_image_size: bool = False
    attention: str = "paper"
    predictive: str = "suq"
    activations: str = "linearised"
    automatic: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.covariance not in COVARIANCES:
            raise InputError(f"covariance must be one of {COVARIANCES}, got {self.covariance!r}")
        if self.likelihood not in LIKELIHOODS:
            raise InputError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        sigma_noise = None if self.sigma_noise is None else number("sigma_noise", self.sigma_noise)
        if sigma_noise is not None and (self.likelihood != "regression" or not sigma_noise >= 0):
            raise InputError("sigma_noise must be a non-negative number and needs likelihood='regression'")
        variance_scale = number("variance_scale", self.variance_scale)
        if not (variance_scale >= 0 and variance_scale != float("inf")):  # 0: the MAP (calibrate may choose it)
            raise InputError(f"variance_scale must be a positive finite number, got {self.variance_scale!r}")
        if self.link not in LINKS or (self.link != "probit" and self.likelihood != "classification"):
            raise InputError(
                f"link must be one of {LINKS} and only applies to likelihood='classification', got {self.link!r}"
            )
        if self.attention not in ATTENTION:
            raise InputError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.predictive not in PREDICTIVES:
            raise InputError(f"predictive must be one of {PREDICTIVES}, got {self.predictive!r}")
        if self.activations not in ACTIVATIONS:
            raise InputError(f"activations must be one of {ACTIVATIONS}, got {self.activations!r}")
        if self.activations == "moment_matched" and self.predictive == "glm":
            raise InputError(
                "activations='moment_matched' does not apply to predictive='glm', which linearises every op by "
                "definition; use predictive='suq' with moment-matched activations, or activations='linearised'"
            )
        automatic = tuple(self.automatic)
        if not set(automatic) <= set(AUTOMATIC):
            raise InputError(f"automatic names options chosen by default, a subset of {AUTOMATIC}, got {automatic}")
        normalised = {
            "automatic": automatic,
            "sigma_noise": sigma_noise,
            "variance_scale": variance_scale,
            "output_covariance": _flag("output_covariance", self.output_covariance) and self.covariance == "diag",
            "input_variance": _flag("input_variance", self.input_variance),
            "dynamic_image_size": _flag("dynamic_image_size", self.dynamic_image_size),
            # the GLM predictive linearises everything, the attention weights included
            "attention": "linearised" if self.predictive == "glm" else self.attention,
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    @property
    def returns_covariance(self) -> bool:
        """Whether the second output is a covariance over the last dim (rather than variances)."""
        return self.covariance == "full" or self.output_covariance

    def output_names(self) -> list[str]:
        """The names of the moment graph's outputs (and of the ONNX file's)."""
        names = ["mean", "covariance" if self.returns_covariance else "variance"]
        if self.likelihood == "classification":
            names.append("probs")
        elif self.likelihood == "regression":
            names.append("predictive_covariance" if self.returns_covariance else "predictive_variance")
        return names

    def card(self) -> dict[str, object]:
        """The options' entries of the model card (JSON values)."""
        return {
            "covariance": self.covariance,
            "output_covariance": self.output_covariance,
            "likelihood": self.likelihood or "none",
            "link": self.link,
            "input_variance": self.input_variance,
            "dynamic_image_size": self.dynamic_image_size,
            "attention": self.attention,
            "predictive": self.predictive,
            "activations": self.activations,
            "chosen_by_default": list(self.automatic),
            "sigma_noise": self.sigma_noise,
        }

    def to_json(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class CompiledInfo:
    """What the moment graph does: the compile options (stored once, here), the random parameters and the input
    names. The model card and the saved file are made from it."""

    options: Options
    random_parameters: list[str]
    input_names: list[str]

    covariance = property(lambda self: self.options.covariance)
    likelihood = property(lambda self: self.options.likelihood)
    output_covariance = property(lambda self: self.options.output_covariance)
    sigma_noise = property(lambda self: self.options.sigma_noise)
    link = property(lambda self: self.options.link)
    input_variance = property(lambda self: self.options.input_variance)
    attention = property(lambda self: self.options.attention)
    predictive = property(lambda self: self.options.predictive)
    activations = property(lambda self: self.options.activations)
    returns_covariance = property(lambda self: self.options.returns_covariance)

    def to_json(self) -> dict[str, object]:
        """One flat JSON object: the options' fields, ``random_parameters`` and ``input_names``."""
        return {**self.options.to_json(), "random_parameters": list(self.random_parameters),
                "input_names": list(self.input_names)}

    @classmethod
    def from_json(cls, fields: dict[str, object]) -> "CompiledInfo":
        fields = dict(fields)
        rest = {"random_parameters": fields.pop("random_parameters"), "input_names": fields.pop("input_names")}
        return cls(Options(**fields), **rest)
