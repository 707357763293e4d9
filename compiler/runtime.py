"""Step 5: the compiled model: run in torch (``cm(x)``), calibrated, saved, emitted to ONNX (``OnnxRunner`` in
``onnx_runner.py`` runs the file)."""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch.export import ExportedProgram

from ._version import __version__
from .calibration import Calibration, bound_warning, fit_scale, pointwise_nlpd
from .capture import free_dims
from .emit import emit_onnx
from .errors import InputError, MomentpropError
from .inputs import check_input_dtype, dtype_kind
from .options import CompiledInfo
from .persist import load_compiled, save_compiled


class CompiledModel:
    """A model and its posterior compiled into one moment graph.

    ``cm(x)`` returns ``(mean, var)``; ``var`` has the shape of ``mean``, or ``mean.shape + (C,)`` for a
    covariance (``covariance="full"`` or ``output_covariance=True``).

    Inputs: batch, sequence and (where the model allows it) image-size dimensions are free, the others must match the
    example inputs. A floating input of another precision (float64, float16, bfloat16) is cast to the compiled
    dtype (float32 for a float32 model);
    integer or bool values for a floating input raise :class:`InputError` (a cast would hide a wrong array);
    integer inputs (token ids) of another width are cast. ``OnnxRunner`` follows the same rule.
    """

    def __init__(self, program: ExportedProgram, info: CompiledInfo, example_inputs: Sequence[torch.Tensor]):
        self.program = program
        self.info = info
        self.example_inputs = tuple(example_inputs)
        self._module = program.module()
        self._free_dims = free_dims(program)  # per input, the dims that are dynamic (batch, sequence, image size)
        self.calibration: Calibration | None = None  # what calibrate found
        self._recompile = None  # set by mp.compile: the same model and posterior with other options

    covariance = property(lambda self: self.info.covariance)
    likelihood = property(lambda self: self.info.likelihood)
    sigma_noise = property(lambda self: self.info.sigma_noise)
    input_names = property(lambda self: list(self.info.input_names))
    random_parameters = property(lambda self: list(self.info.random_parameters))
    returns_covariance = property(lambda self: self.info.returns_covariance)

    def __repr__(self) -> str:
        options = self.info.options

        def shown(name: str) -> str:
            chosen = " (default for this posterior and graph)" if name in options.automatic else ""
            return f"{name}={getattr(options, name)!r}{chosen}"

        parts = [shown("predictive"), shown("covariance"), shown("activations"), f"likelihood={options.likelihood!r}"]
        if options.likelihood == "classification":
            parts.append(shown("link"))
        parts += [f"variance_scale={self.variance_scale:.4g}", f"random parameters: {len(self.random_parameters)}"]
        return "CompiledModel(" + ", ".join(parts) + ")"

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
        for i, (x, ex, free) in enumerate(zip(inputs, self.example_inputs, self._free_dims)):
            if not isinstance(x, torch.Tensor) or x.dim() != ex.dim() or any(
                    n != e for d, (n, e) in enumerate(zip(x.shape, ex.shape)) if d not in free):
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                compiled_for = ", ".join("batch" if d == 0 else "any" if d in free else str(n)
                                         for d, n in enumerate(ex.shape))
                raise InputError(f"input {i} has shape {got}; the model was compiled for ({compiled_for})")
        inputs = tuple(self._cast(i, x, ex) for i, (x, ex) in enumerate(zip(inputs, self.example_inputs)))
        with torch.no_grad():
            try:
                return tuple(self._module(*inputs))
            except AssertionError as exc:  # a shape the model itself does not take (torch.export's guards)
                if "Guard failed" not in str(exc):
                    raise
                shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
                examples = ", ".join(str(tuple(x.shape)) for x in self.example_inputs)
                raise InputError(f"inputs of shapes {shapes} are not ones the model takes ({exc}); it was compiled "
                                 f"with examples of shapes {examples}") from None

    def _cast(self, index: int, x: torch.Tensor, example: torch.Tensor) -> torch.Tensor:
        if x.dtype == example.dtype:
            return x
        name = self.input_names[index] if index < len(self.input_names) else str(index)
        check_input_dtype(f"input {index} ('{name}')", str(x.dtype), dtype_kind(x.dtype), str(example.dtype),
                          dtype_kind(example.dtype), "the model was compiled for")
        return x.to(example.dtype)

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

    def calibrate(self, data, *, bounds: tuple[float, float] = (1e-4, 1e4), choose: bool = False) -> float:
        """Fit ``variance_scale`` by minimising the NLPD of this model's own predictive on held-out ``data``.

        ``data``: a DataLoader (or any iterable) of ``(*inputs, labels)`` batches, or one ``(X, y)`` pair.
        Latent moments are computed once; the scale is then searched from 0 (the MAP: the uncertainty does not
        help on this data) and on a log grid over ``bounds``, refined by golden section.  The current scale is kept
        unless another one has a lower NLPD on ``data`` by more than one standard error of the per-point
        difference (``cm.calibration.declined`` then records the scale not taken).  Where the best scale is at a
        bound, a warning says so and what to try; ``cm.calibration`` records the result (also in the model card).

        ``choose=True`` also picks, by the same validation NLPD, among the predictives and activation rules
        available for the posterior (``"glm"``; ``"suq"`` linearised; ``"suq"`` moment-matched), each with its
        own fitted scale, and makes this model the winner (``cm.calibration.chosen`` says which, with each
        option's NLPD).  It recompiles the model, so it needs the object ``mp.compile`` returned, not a loaded one.
        Returns the fitted scale, which also goes into the ONNX file.
        """
        if self.likelihood is None:
            raise InputError("calibrate needs a likelihood: compile with likelihood='classification' or 'regression'")
        if not choose:
            result = self._fitted(data, bounds)
        else:
            if self._recompile is None:
                raise InputError("calibrate(choose=True) recompiles the model: call it on the model that "
                                 "mp.compile returned (a loaded model has no PyTorch model to recompile)")
            fits = [(variant._fitted(data, bounds), variant) for variant in self._variants()]
            result, best = min(fits, key=lambda fit: fit[0].nlpd)
            if best is not self:
                self.program, self.info, self._module = best.program, best.info, best._module
            scores = {f"{v.info.options.predictive}/{v.info.options.activations}": round(r.nlpd, 6) for r, v in fits}
            result = dataclasses.replace(result, chosen={
                "predictive": self.info.options.predictive, "activations": self.info.options.activations,
                "nlpd": scores})
        self.program.state_dict["variance_scale"].fill_(result.scale)
        self.info = dataclasses.replace(self.info, options=dataclasses.replace(self.info.options,
                                                                               variance_scale=result.scale))
        self.calibration = result
        message = bound_warning(result, bounds)
        if message:
            warnings.warn(message, UserWarning, stacklevel=2)
        return self.variance_scale

    def _fitted(self, data, bounds: tuple[float, float]) -> Calibration:
        means, variances, labels = self._latent_moments(data)

        def pointwise(scale: float) -> torch.Tensor:
            return pointwise_nlpd(means, variances * scale, labels, self.info.options)

        return fit_scale(pointwise, self.variance_scale, bounds)

    def _variants(self) -> list["CompiledModel"]:
        """This model and its recompilations with the other predictives and activation rules the posterior
        allows (a predictive it refuses, the GLM across coupled layers, is skipped)."""
        options = self.info.options
        variants = [self]
        for predictive, activations in (("glm", "linearised"), ("suq", "linearised"), ("suq", "moment_matched")):
            if (predictive, activations) == (options.predictive, options.activations):
                continue
            try:
                variants.append(self._recompile(predictive=predictive, activations=activations))
            except MomentpropError:
                continue
        return variants

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

    def model_card(self) -> dict[str, object]:
        return {
            "method": "moment propagation: local linearisation of activations, Gaussian moment matching of "
            "linear layers (Li, Klasson, Solin, Trapp, ICLR 2025)",
            "version": __version__,
            **self.info.options.card(),
            "variance_scale": self.variance_scale,  # the graph's own scale: cm.calibrate may have changed it
            **({"calibration": self.calibration.to_json()} if self.calibration is not None else {}),
            "random_parameters": self.random_parameters,
            "outputs": self.info.options.output_names(),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Store the compiled model in one safetensors file (tensors; the graph and settings as JSON metadata)."""
        return save_compiled(self.program, self.info, self.example_inputs, path)

    def to_onnx(self, path: str | os.PathLike) -> Path:
        """Write the moment graph to ``path`` as ONNX (batch size dynamic) and return the path."""
        return emit_onnx(
            self.program,
            self.example_inputs,
            self.input_names,
            self.info.options.output_names(),
            self.model_card(),
            path,
        )


def load(path: str | os.PathLike) -> CompiledModel:
    """Read a compiled model written by ``cm.save(path)``."""
    return CompiledModel(*load_compiled(path))
