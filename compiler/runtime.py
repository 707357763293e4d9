"""Step 5: run the compiled model, in torch (``cm(x)``) or from its ONNX file (``OnnxRunner``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.export import ExportedProgram

from ._version import __version__
from .emit import emit_onnx, output_names
from .errors import InputError


@dataclass(frozen=True)
class CompiledInfo:
    """What the moment graph does, in JSON-friendly fields (the model card, and what save/load keep)."""

    covariance: str
    likelihood: str | None
    output_covariance: bool
    sigma_noise: float | None
    random_parameters: list[str]
    input_names: list[str]

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
            if not isinstance(x, torch.Tensor) or x.shape[1:] != ex.shape[1:]:
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

    def model_card(self) -> dict[str, object]:
        return {
            "method": "moment propagation: local linearisation of activations, Gaussian moment matching of "
            "linear layers (Li, Klasson, Solin, Trapp, ICLR 2025)",
            "version": __version__,
            "covariance": self.covariance,
            "output_covariance": self.info.output_covariance,
            "likelihood": self.likelihood or "none",
            "sigma_noise": self.sigma_noise,
            "variance_scale": self.variance_scale,
            "random_parameters": self.random_parameters,
            "outputs": output_names(self.likelihood, self.returns_covariance),
        }

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
