"""Running an exported moment graph with ONNX Runtime: the runner, its providers and the input dtype rule.  Needs
onnxruntime and numpy only; torch tensors are taken where torch is installed."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .card import CARD_PREFIX, read_model_card
from .errors import InputError, PersistenceError, ProviderError
from .inputs import check_input_dtype, dtype_kind, is_torch_tensor


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

    def _check(self, index: int, x) -> np.ndarray:
        """One input, checked against the file's input ``index`` and cast to its dtype (CUDA tensors stay)."""
        spec = self.inputs[index]
        want = np.dtype(_DTYPES.get(spec.type, np.float32))
        if not is_torch_tensor(x):
            x = np.asarray(x)
        expected = [d if isinstance(d, int) else None for d in spec.shape]
        if len(x.shape) != len(expected) or any(
            e is not None and e != n for e, n in zip(expected, x.shape)
        ):
            shown = ", ".join("batch" if i == 0 and e is None else "any" if e is None else str(e)
                              for i, e in enumerate(expected))
            raise InputError(f"input '{spec.name}' has shape {tuple(x.shape)}; the file expects ({shown})")
        on_gpu = is_torch_tensor(x) and x.is_cuda and self.io_binding
        if is_torch_tensor(x) and not on_gpu:
            x = x.detach().cpu().numpy()
        kind = dtype_kind(x.dtype) if on_gpu else np.asarray(x).dtype.kind
        check_input_dtype(f"input '{spec.name}'", str(x.dtype), kind, f"{want.name} ({spec.type})", want.kind,
                          "the file expects")
        if self.nan == "raise" and kind == "f" and x.shape[0]:
            finite = (x.isfinite() if on_gpu else np.isfinite(x)).reshape(len(x), -1).all(-1)
            if not bool(finite.all()):
                rows = np.flatnonzero(~np.asarray(finite.cpu() if on_gpu else finite))
                raise InputError(f"input '{spec.name}' holds NaN or infinite values in rows {rows[:20].tolist()}; "
                                 "clean the data, or use nan='propagate' (those rows then get NaN outputs)")
        if on_gpu:
            return x.detach().to(getattr(sys.modules["torch"], want.name)).contiguous()
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
            if is_torch_tensor(x):  # already on the GPU: bind its memory, no copy
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
