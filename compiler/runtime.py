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
from .emit import CARD_PREFIX, emit_onnx, read_model_card
from momentprop.passes import heads

from .errors import CalibrationError, InputError, PersistenceError, ProviderError
from .options import Options


def _kind(dtype: torch.dtype) -> str:
    """numpy's kind letter of a torch dtype: "f" float, "c" complex, "b" bool, "u"/"i" integer."""
    if dtype.is_floating_point:
        return "f"
    if dtype.is_complex:
        return "c"
    if dtype == torch.bool:
        return "b"
    return "u" if dtype == torch.uint8 else "i"


def check_input_dtype(what: str, got: str, got_kind: str, want: str, want_kind: str, expected_by: str) -> None:
    """The input dtype rule of ``cm(x)`` and ``OnnxRunner``: a floating input of another precision (float64,
    float16, bfloat16) is cast to the input's dtype; integer, bool or complex values for a floating input are
    refused, since casting them would hide a wrong array; integer inputs (token ids) take integers (or bool) only,
    cast to their width. Raises :class:`InputError` that names the input and says what to pass."""
    if want_kind == "f":
        ok, advice = got_kind == "f", "pass floating-point values (x.float() in torch, x.astype(np.float32) in numpy)"
    elif want_kind in "iu":
        ok, advice = got_kind in "iub", "pass integer ids"
    else:
        ok, advice = got_kind in "biu", "pass booleans or integers"
    if not ok:
        raise InputError(f"{what} has dtype {got}; {expected_by} {want}: {advice}")


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


class CompiledModel:
    """A model and its posterior compiled into one moment graph.

    ``cm(x)`` returns ``(mean, var)``; ``var`` has the shape of ``mean``, or ``mean.shape + (C,)`` for a
    covariance (``covariance="full"`` or ``output_covariance=True``).

    Inputs: batch (and sequence) dimensions are free, the others must match the example inputs. A floating input of
    another precision (float64, float16, bfloat16) is cast to the compiled dtype (float32 for a float32 model);
    integer or bool values for a floating input raise :class:`InputError` (a cast would hide a wrong array);
    integer inputs (token ids) of another width are cast. ``OnnxRunner`` follows the same rule.
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
                compiled_for = ", ".join(map(str, ex.shape[1:]))
                raise InputError(f"input {i} has shape {got}; the model was compiled for (batch, {compiled_for})")
        inputs = tuple(self._cast(i, x, ex) for i, (x, ex) in enumerate(zip(inputs, self.example_inputs)))
        with torch.no_grad():
            return tuple(self._module(*inputs))

    def _cast(self, index: int, x: torch.Tensor, example: torch.Tensor) -> torch.Tensor:
        if x.dtype == example.dtype:
            return x
        name = self.input_names[index] if index < len(self.input_names) else str(index)
        check_input_dtype(f"input {index} ('{name}')", str(x.dtype), _kind(x.dtype), str(example.dtype),
                          _kind(example.dtype), "the model was compiled for")
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
            picked = probs.gather(-1, labels.long().reshape(*probs.shape[:-1], 1)).squeeze(-1)  # (N, ..., C) outputs
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
            **self.info.options.card(),
            "variance_scale": self.variance_scale,  # the graph's own scale: cm.calibrate may have changed it
            "random_parameters": self.random_parameters,
            "outputs": self.info.options.output_names(),
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
            self.info.options.output_names(),
            self.model_card(),
            path,
        )


PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}


def _provider_list(provider: str | Sequence[str]) -> list[str]:
    """"cpu" / "cuda" (or ONNX Runtime provider names) → the provider list for a session, checked to be available."""
    import onnxruntime as ort

    if isinstance(provider, str):
        if provider.lower() not in PROVIDERS:
            raise InputError(f"provider must be one of {tuple(PROVIDERS)} (or a list of ONNX Runtime provider names), "
                             f"got {provider!r}")
        names = [PROVIDERS[provider.lower()]] + (["CPUExecutionProvider"] if provider.lower() == "cuda" else [])
    else:
        names = list(provider)
    available = ort.get_available_providers()
    missing = [n for n in names if n not in available]
    if missing:
        hint = ("install onnxruntime-gpu instead of onnxruntime (pip uninstall -y onnxruntime && pip install "
                "onnxruntime-gpu; it needs a CUDA and cuDNN matching its release) on a machine with an NVIDIA GPU, "
                "or use provider='cpu'") if "CUDAExecutionProvider" in missing else "use provider='cpu'"
        raise ProviderError(f"ONNX Runtime {ort.__version__} here has no {', '.join(missing)} (available: "
                            f"{', '.join(available)}); {hint}")
    return names


class OnnxRunner:
    """Loads a momentprop ONNX (or ORT-format) file into ONNX Runtime; ``runner(x)`` returns a dict of named numpy
    outputs (``"mean"``, ``"variance"`` or ``"covariance"``, ``"probs"`` / ``"predictive_variance"``).

    Args:
        path: a file written by ``cm.to_onnx`` or ``momentprop convert`` (``.onnx`` or ``.ort``).
        provider: ``"cpu"``, ``"cuda"`` (needs onnxruntime-gpu and a CUDA device; a clear :class:`ProviderError`
            otherwise), or a list of ONNX Runtime provider names.
        threads: intra-op threads (None: ONNX Runtime's default, one per core).
        optimization: graph optimisation level, one of ``"disable"``, ``"basic"``, ``"extended"``, ``"all"``.
        io_binding: run through ONNX Runtime's IO binding (inputs copied to the device once, outputs allocated
            there; CUDA tensors from torch are bound without a copy). Default: on for CUDA, off for CPU.
        nan: ``"propagate"`` (default: a NaN or infinite input gives NaN/inf outputs in the rows it is in, the
            other rows are unaffected) or ``"raise"`` (an :class:`InputError` naming the rows).
        require_card: refuse files without momentprop's model card (files momentprop did not write).

    Inputs may be numpy arrays or torch tensors; batch (and sequence) dimensions are free, the others must match
    the file. Dtypes follow the rule of ``cm(x)`` (:func:`check_input_dtype`): floating inputs of another precision
    are cast to a floating input's dtype, integer and bool values for a floating input are refused with an
    :class:`InputError`; integer inputs (token ids) take integers only.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        provider: str | Sequence[str] = "cpu",
        threads: int | None = None,
        *,
        optimization: str = "all",
        io_binding: bool | None = None,
        nan: str = "propagate",
        require_card: bool = True,
    ):
        import onnxruntime as ort

        if optimization not in OPTIMIZATION_LEVELS:
            raise InputError(f"optimization must be one of {OPTIMIZATION_LEVELS}, got {optimization!r}")
        if nan not in ("propagate", "raise"):
            raise InputError(f"nan must be 'propagate' or 'raise', got {nan!r}")
        providers = _provider_list(provider)
        self.path = Path(path)
        if not self.path.is_file():
            raise PersistenceError(f"{self.path}: no such file; pass the path of a file written by cm.to_onnx(path)")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        level = {"disable": "ORT_DISABLE_ALL"}.get(optimization, f"ORT_ENABLE_{optimization.upper()}")
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        options.log_severity_level = 3  # warnings about unused initializers etc. are not the user's business
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # ONNX Runtime raises its own pybind classes (InvalidProtobuf, Fail, ...)
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PersistenceError(
                f"{self.path}: ONNX Runtime cannot load it as an ONNX or ORT-format model ({message}); pass a file "
                "written by cm.to_onnx(path) or `momentprop convert`"
            ) from exc
        self.model_card = read_model_card(self.session.get_modelmeta().custom_metadata_map)
        if require_card and "version" not in self.model_card:
            raise PersistenceError(
                f"{self.path}: this ONNX file has no momentprop model card (metadata keys '{CARD_PREFIX}*'), so "
                "momentprop did not write it and cannot say what its outputs mean; export with cm.to_onnx(path), "
                "or pass require_card=False to run it anyway"
            )
        if "CUDAExecutionProvider" in providers and "CUDAExecutionProvider" not in self.session.get_providers():
            raise ProviderError(
                "onnxruntime-gpu is installed but could not start CUDA (ONNX Runtime fell back to the CPU): check that "
                "an NVIDIA GPU is visible and that the CUDA and cuDNN libraries match this onnxruntime-gpu release"
            )
        self.providers = self.session.get_providers()
        self.io_binding = ("CUDAExecutionProvider" in self.providers) if io_binding is None else io_binding
        self.nan = nan
        self.inputs = self.session.get_inputs()
        self.input_names = [i.name for i in self.inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def precision(self) -> str:
        """"fp32", or the precision ``momentprop convert`` gave the file ("fp16", "int8", "int8-mean")."""
        return str(self.model_card.get("precision", "fp32"))

    def _check(self, index: int, x) -> np.ndarray | torch.Tensor:
        """One input, checked against the file's input ``index`` and cast to its dtype (CUDA tensors stay)."""
        spec = self.inputs[index]
        want = np.dtype(_DTYPES.get(spec.type, np.float32))
        if not isinstance(x, torch.Tensor):
            x = np.asarray(x)
        expected = [d if isinstance(d, int) else None for d in spec.shape]
        if len(x.shape) != len(expected) or any(
            e is not None and e != n for e, n in zip(expected, x.shape)
        ):
            shown = ", ".join("batch" if i == 0 and e is None else "any" if e is None else str(e)
                              for i, e in enumerate(expected))
            raise InputError(f"input '{spec.name}' has shape {tuple(x.shape)}; the file expects ({shown})")
        on_gpu = isinstance(x, torch.Tensor) and x.is_cuda and self.io_binding
        if isinstance(x, torch.Tensor) and not on_gpu:
            x = x.detach().cpu().numpy()
        kind = _kind(x.dtype) if on_gpu else np.asarray(x).dtype.kind
        check_input_dtype(f"input '{spec.name}'", str(x.dtype), kind, f"{want.name} ({spec.type})", want.kind,
                          "the file expects")
        if self.nan == "raise" and kind == "f" and x.shape[0]:
            finite = (torch.isfinite(x) if on_gpu else np.isfinite(x)).reshape(len(x), -1).all(-1)
            if not bool(finite.all()):
                rows = np.flatnonzero(~np.asarray(finite.cpu() if on_gpu else finite))
                raise InputError(f"input '{spec.name}' holds NaN or infinite values in rows {rows[:20].tolist()}; "
                                 "clean the data, or use nan='propagate' (those rows then get NaN outputs)")
        if on_gpu:
            return x.detach().to(getattr(torch, want.name)).contiguous()
        return np.ascontiguousarray(x, dtype=want)

    def __call__(self, *inputs) -> dict[str, np.ndarray]:
        if len(inputs) != len(self.input_names):
            raise InputError(f"the file takes {len(self.input_names)} input(s) {self.input_names}, got {len(inputs)}")
        feeds = {name: self._check(i, x) for i, (name, x) in enumerate(zip(self.input_names, inputs))}
        if not self.io_binding:
            return dict(zip(self.output_names, self.session.run(None, feeds)))
        device = "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"
        binding = self.session.io_binding()
        for name, x in feeds.items():
            if isinstance(x, torch.Tensor):  # already on the GPU: bind its memory, no copy
                binding.bind_input(name, "cuda", x.device.index or 0, getattr(np, str(x.dtype).split(".")[-1]),
                                   tuple(x.shape), x.data_ptr())
            else:
                binding.bind_cpu_input(name, x)
        for name in self.output_names:
            binding.bind_output(name, device)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))


def predict_onnx(
    path: str | os.PathLike, *inputs, provider: str | Sequence[str] = "cpu", **options
) -> dict[str, np.ndarray]:
    """Load ``path`` and run it once: ``OnnxRunner(path, provider, **options)(*inputs)``."""
    return OnnxRunner(path, provider, **options)(*inputs)
