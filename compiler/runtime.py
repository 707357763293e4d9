"""Step 5: run the compiled model, in torch (``cm(x)``) or from its ONNX file (``OnnxRunner``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.export import ExportedProgram

from ._version import __version__
from .capture import is_sequence
from .emit import emit_onnx, output_names
from momentprop.passes import heads

from .errors import CalibrationError, InputError


@dataclass(frozen=True)
class CompiledInfo:
    """What the moment graph does, in JSON-friendly fields (the model card, and what save/load keep)."""

    covariance: str
    likelihood: str | None
    output_covariance: bool
    sigma_noise: float | None
    random_parameters: list[str]
    input_names: list[str]
    link: str = "probit"
    input_variance: bool = False
    attention: str = "paper"
    predictive: str = "suq"

    @property
    def returns_covariance(self) -> bool:
        return self.covariance == "full" or self.output_covariance


class CompiledModel:
    """A model and its posterior compiled into one moment graph.

    ``cm(x)`` returns ``(mean, var)``; ``var`` has the shape of ``mean``, or ``mean.shape + (C,)`` for a
    covariance (``covariance="full"`` or ``output_covariance=True``).
    """

    def __init__(self, program: ExportedProgram, info: CompiledInfo, example_inputs: Sequence[torch.Tensor]):
        self.program = program
        self.info = info
        self.example_inputs = tuple(example_inputs)
        self._module = program.module()

    covariance = property(lambda self: self.info.covariance)
    likelihood = property(lambda self: self.info.likelihood)
    sigma_noise = property(lambda self: self.info.sigma_noise)
    input_names = property(lambda self: list(self.info.input_names))
    random_parameters = property(lambda self: list(self.info.random_parameters))
    returns_covariance = property(lambda self: self.info.returns_covariance)

    @property
    def variance_scale(self) -> float:
        """Multiplies the output (co)variance; a buffer of the moment graph, so it reaches the ONNX file."""
        return float(self.program.state_dict["variance_scale"])

    @property
    def graph(self) -> torch.fx.Graph:
        """The moment graph (ATen ops) that ``cm(x)`` runs and ``to_onnx`` emits."""
        return self.program.graph

    def _run(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.example_inputs):
            raise InputError(f"expected {len(self.example_inputs)} input tensor(s), got {len(inputs)}")
        for i, (x, ex) in enumerate(zip(inputs, self.example_inputs)):
            fixed = 2 if is_sequence(ex) else 1  # batch (and sequence length) are dynamic
            if not isinstance(x, torch.Tensor) or x.shape[fixed:] != ex.shape[fixed:] or x.dim() != ex.dim():
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise InputError(
                    f"input {i} has shape {got}; the model was compiled for (batch, {', '.join(map(str, ex.shape[1:]))})"
                )
        with torch.no_grad():
            return tuple(self._module(*inputs))

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, var = self._run(inputs)[:2]
        return mean, var

    def predict(self, *inputs: torch.Tensor):
        """classification: probit class probabilities; regression: (mean, variance + sigma_noise^2)."""
        outputs = self._run(inputs)
        if self.likelihood is None:
            raise InputError(
                "predict needs a likelihood: compile with likelihood='classification' or 'regression' "
                "(cm(x) gives the latent mean and variance)"
            )
        if self.likelihood == "classification":
            return outputs[2]
        return outputs[0], outputs[2]

    def calibrate(self, data, *, bounds: tuple[float, float] = (1e-4, 1e4)) -> float:
        """Fit ``variance_scale`` by minimising the NLPD of this model's own predictive on held-out ``data``.

        ``data``: a DataLoader (or any iterable) of ``(*inputs, labels)`` batches, or one ``(X, y)`` pair.
        Latent moments are computed once; the scale is then searched on a log grid over ``bounds`` and refined
        by golden section.  The current scale is kept unless another one has a lower NLPD on ``data``.
        Returns the fitted scale, which also goes into the ONNX file.
        """
        if self.likelihood is None:
            raise InputError("calibrate needs a likelihood: compile with likelihood='classification' or 'regression'")
        means, variances, labels = self._latent_moments(data)
        current = self.variance_scale

        def nlpd(log_scale: float) -> float:
            return self._nlpd(means, variances * math.exp(log_scale), labels)

        grid = np.linspace(math.log(bounds[0]), math.log(bounds[1]), 81)
        values = [nlpd(g) for g in grid]
        best = int(np.nanargmin(values)) if not np.isnan(values).all() else 0
        low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
        golden = (math.sqrt(5) - 1) / 2
        for _ in range(40):
            a, b = high - golden * (high - low), low + golden * (high - low)
            low, high = (low, b) if nlpd(a) < nlpd(b) else (a, high)
        fitted = (low + high) / 2
        candidates = [(nlpd(fitted), fitted), (nlpd(math.log(current)), math.log(current))]
        value, log_scale = min(candidates, key=lambda c: c[0] if math.isfinite(c[0]) else math.inf)
        if not (math.isfinite(value) and math.isfinite(log_scale)):
            raise CalibrationError(
                "the fitted variance scale is not finite (the NLPD is NaN or infinite for every scale tried); check "
                "that the labels match the model's outputs and that the data holds no NaN"
            )
        self.program.state_dict["variance_scale"].fill_(math.exp(log_scale))
        return self.variance_scale

    def _latent_moments(self, data) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, (co)variance at variance_scale 1, and labels over all of ``data``."""
        batches = [data] if isinstance(data, (tuple, list)) and len(data) == len(self.example_inputs) + 1 else data
        means, variances, labels = [], [], []
        for batch in batches:
            *inputs, y = batch
            mean, var = self(*inputs)
            means.append(mean)
            variances.append(var / self.variance_scale)
            labels.append(torch.as_tensor(y))
        if not means:
            raise InputError("calibrate got no data: pass a DataLoader of (inputs, labels) batches or an (X, y) pair")
        return torch.cat(means), torch.cat(variances), torch.cat(labels)

    def _nlpd(self, mean: torch.Tensor, var: torch.Tensor, labels: torch.Tensor) -> float:
        """Mean negative log predictive density of ``labels`` under this model's predictive."""
        full = self.returns_covariance
        if self.likelihood == "classification":
            probs = heads.class_probabilities(mean, var, full, self.info.link)
            picked = probs.gather(-1, labels.long().reshape(-1, 1)).squeeze(-1)
            return float(-torch.log(picked.clamp_min(1e-12)).mean())
        target = labels.reshape(mean.shape).to(mean.dtype)
        noise = torch.tensor((self.sigma_noise or 0.0) ** 2, dtype=mean.dtype)
        predictive = heads.add_observation_noise(var, noise, full)
        if full:
            log_density = torch.distributions.MultivariateNormal(mean, predictive).log_prob(target)
            return float(-log_density.mean())
        log_density = -0.5 * (torch.log(2 * math.pi * predictive) + (target - mean) ** 2 / predictive)
        return float(-log_density.sum(-1).mean())

    def model_card(self) -> dict[str, object]:
        return {
            "method": "moment propagation: local linearisation of activations, Gaussian moment matching of "
            "linear layers (Li, Klasson, Solin, Trapp, ICLR 2025)",
            "version": __version__,
            "covariance": self.covariance,
            "output_covariance": self.info.output_covariance,
            "likelihood": self.likelihood or "none",
            "link": self.info.link,
            "input_variance": self.info.input_variance,
            "attention": self.info.attention,
            "predictive": self.info.predictive,
            "sigma_noise": self.sigma_noise,
            "variance_scale": self.variance_scale,
            "random_parameters": self.random_parameters,
            "outputs": output_names(self.likelihood, self.returns_covariance),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Store the compiled model in one safetensors file (tensors; the graph and settings as JSON metadata)."""
        from .persist import save_compiled  # persist builds CompiledModel objects itself

        return save_compiled(self, path)

    def to_onnx(self, path: str | os.PathLike) -> Path:
        """Write the moment graph to ``path`` as ONNX (batch size dynamic) and return the path."""
        return emit_onnx(
            self.program,
            self.example_inputs,
            self.input_names,
            output_names(self.likelihood, self.returns_covariance),
            self.model_card(),
            path,
        )


class OnnxRunner:
    """Runs a momentprop ONNX file with ONNX Runtime; returns a dict of named numpy outputs."""

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *inputs) -> dict[str, np.ndarray]:
        feeds = {name: np.asarray(x.detach().numpy() if isinstance(x, torch.Tensor) else x) for name, x in zip(self.input_names, inputs)}
        return dict(zip(self.output_names, self.session.run(None, feeds)))
