"""The predictive methods compared on one posterior, and how each is timed and its memory measured.

Every method is a *predictor*: ``predict(x) -> Prediction`` on a batch of inputs.  Classification predictions are
class probabilities ``(N, C)``, or ``(N, T, C)`` for a sequence model (a prediction per position); regression
predictions are ``{"mean", "var"}`` of a Gaussian (observation noise included) or, for Monte Carlo,
``{"samples"}`` (the latent function at each weight sample; the predictive is their mixture with the observation
noise).

Timing and memory (:func:`measure`): the first call on the test set records the peak extra resident memory
(``VmHWM`` after minus ``VmRSS`` before, high-water mark reset and ``malloc_trim`` just before; Linux only), and
gives the prediction.  When that call took under ``MIN_TIMED_S``, the predictor is called again up to
``REPEATS`` times and the median is used; slow predictors (seconds) are timed by their first call.  All methods run
in PyTorch on the same thread count, so their times compare; the time includes weight sampling for Monte Carlo and
the Jacobians for the GLM.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.func import functional_call

from .posteriors import Posterior

MC_SAMPLES = (10, 100, 1000)
REFERENCE_SAMPLES = 10_000  # Monte Carlo reference for the latent variance
MIN_TIMED_S = 2.0
REPEATS = 3
GLM_MEMORY_LIMIT = 6 * 2**30  # bytes of Jacobian per laplace-torch call we allow (points x outputs x params x 4)
SAMPLE_CHUNK_FLOATS = 2**26  # samples x params drawn at once (256 MiB of float32)

Prediction = np.ndarray | dict


# --------------------------------------------------------------------------------------------------- measurement

try:
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # pragma: no cover - not glibc
    _malloc_trim = None


def _status_kib() -> dict[str, int] | None:
    try:
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if v.strip().endswith("kB")}
    except OSError:  # pragma: no cover - not Linux
        return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:  # pragma: no cover
        return False


@dataclass
class Measured:
    prediction: Prediction
    ms_per_1000: float
    peak_mib: float | None
    calls: int


def measure(predict: Callable[[torch.Tensor], Prediction], x: torch.Tensor, points: int | None = None) -> Measured:
    """Prediction on ``x``, wall time per 1,000 points (median over calls) and peak extra RSS of the first call.
    ``points``: how many predictions ``x`` holds (default ``len(x)``; a sequence model: every token)."""
    if _malloc_trim is not None:
        _malloc_trim(0)
    status = _status_kib() if _reset_peak() else None
    t0 = time.perf_counter()
    prediction = predict(x)
    times = [time.perf_counter() - t0]
    after = _status_kib() if status is not None else None
    peak = None if status is None or after is None else max(0.0, (after["VmHWM"] - status["VmRSS"]) / 1024)
    while sum(times) < MIN_TIMED_S and len(times) <= REPEATS:
        t0 = time.perf_counter()
        predict(x)
        times.append(time.perf_counter() - t0)
    timed = times[1:] if len(times) > 1 else times
    return Measured(prediction, float(np.median(timed)) * 1e3 * 1000 / (points or len(x)), peak, len(times))


# ----------------------------------------------------------------------------------------------------- predictors

def _finish(likelihood: str, out: torch.Tensor, sigma: float | None) -> Prediction:
    if likelihood == "classification":
        return torch.softmax(out, -1).numpy()
    return {"mean": out.numpy(), "var": np.full(out.shape, sigma**2)}


def map_predictor(post: Posterior) -> Callable[[torch.Tensor], Prediction]:
    """The plain network at the posterior mean."""
    def predict(x):
        with torch.no_grad():
            return _finish(post.likelihood, post.model(x), post.sigma_noise)
    return predict


class SampledForward:
    """The network evaluated at weight samples: ``(S, P)`` flat samples -> ``(S, N, ...)`` outputs (vmap over a
    functional call, or with ``vectorised=False`` a loop of functional calls: Hugging Face attention under vmap ran
    9x slower than the loop)."""

    def __init__(self, post: Posterior, vectorised: bool = True):
        self.model = post.plain_model if post.plain_model is not None else post.model
        params = dict(self.model.named_parameters())
        self.names = post.names
        self.shapes = [params[n].shape for n in self.names]
        self.sizes = [params[n].numel() for n in self.names]
        self.fixed = {n: p.detach() for n, p in params.items() if n not in self.names}
        self.n_params = sum(self.sizes)
        self.vectorised = vectorised
        self._forward = torch.func.vmap(lambda p, x: functional_call(self.model, p, (x,)), in_dims=(0, None))

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        k = len(flat)
        draws = {n: t.reshape(k, *s) for n, t, s in zip(self.names, flat.split(self.sizes, dim=1), self.shapes)}
        with torch.no_grad():
            if not self.vectorised:
                return torch.stack([functional_call(self.model, {**self.fixed, **{n: d[i] for n, d in draws.items()}},
                                                    (x,)) for i in range(k)])
            draws.update({n: v.expand(k, *v.shape) for n, v in self.fixed.items()})
            return self._forward(draws, x)

    def over_samples(self, post: Posterior, x: torch.Tensor, samples: int, seed: int):
        """The outputs at ``samples`` draws from the posterior's own sampler (seeded), one chunk at a time."""
        g = torch.Generator().manual_seed(seed)
        chunk, done = self.chunk(x), 0
        while done < samples:
            k = min(chunk, samples - done)
            yield self(post.sample(k, g), x)
            done += k

    def chunk(self, x: torch.Tensor) -> int:
        """Samples per chunk: keep the drawn weights and the hidden activations (every position of every point,
        at the widest layer or the output width) at about 256 MiB each."""
        with torch.no_grad():
            out = self.model(x[:1])
        positions, outputs = out[0].numel() // out.shape[-1], out.shape[-1]
        width = max(p.shape[0] for p in self.model.parameters() if p.dim() == 2)
        per_sample = max(self.n_params, len(x) * positions * max(width, outputs))
        return max(1, min(1000, SAMPLE_CHUNK_FLOATS // per_sample))


def mc_predictor(post: Posterior, samples: int, seed: int, vectorised: bool = True
                 ) -> Callable[[torch.Tensor], Prediction]:
    """Monte Carlo over the weight posterior: ``samples`` draws from the posterior's own sampler (drawn inside
    each call, same seed each call); the average softmax, or the latent samples for the regression mixture."""
    fwd = SampledForward(post, vectorised)

    def predict(x):
        outs = fwd.over_samples(post, x, samples, seed)
        if post.likelihood == "classification":
            return (sum(torch.softmax(out, -1).sum(0) for out in outs) / samples).numpy()
        return {"samples": torch.cat(list(outs)).numpy()}

    return predict


def glm_fits(post: Posterior, chunk: int, outputs: int) -> tuple[bool, str]:
    """Whether laplace-torch's GLM predictive fits the memory budget: it builds the full Jacobian (points x outputs
    x parameters; ``outputs`` per point: a sequence model has one output row per position), and kron multiplies
    it by the eigenbases (about twice that)."""
    n_params = sum(p.numel() for p in post.model.parameters() if p.requires_grad)
    need = chunk * outputs * n_params * 4 * (2 if post.name.endswith("kron") else 1)
    if need > GLM_MEMORY_LIMIT:
        return False, (f"needs ~{need / 2**30:.1f} GiB of Jacobian per call on {chunk} input(s) ({outputs:,} outputs "
                       f"per input x {n_params:,} random parameters; > {GLM_MEMORY_LIMIT / 2**30:.0f} GiB allowed)")
    return True, ""


def _laplace_view(post: Posterior, x: torch.Tensor) -> torch.Tensor:
    """The inputs as laplace-torch sees them: ``post.laplace_input(x)`` where the posterior sets one (a sequence
    model: one row per position), else ``x``."""
    to_points = getattr(post, "laplace_input", None)
    return x if to_points is None else to_points(x)


def _per_input(out: torch.Tensor, rows: int) -> torch.Tensor:
    """laplace-torch's per-point outputs back to one row per input (``(rows, positions, ...)``) where it saw
    several points per input."""
    return out if len(out) == rows else out.reshape(rows, len(out) // rows, *out.shape[1:])


def glm_predictor(post: Posterior, chunk: int) -> Callable[[torch.Tensor], Prediction]:
    """laplace-torch's linearised (GLM) predictive, probit link for classification, in chunks of ``chunk``
    points; for regression N(f_mu, f_var + sigma_noise^2) from ``la(x, pred_type="glm")``."""
    la = post.laplace

    def predict(x):
        parts = []
        for i in range(0, len(x), chunk):
            xi = x[i:i + chunk]
            if post.likelihood == "classification":
                probs = la(_laplace_view(post, xi), pred_type="glm", link_approx="probit").detach()
                parts.append(_per_input(probs, len(xi)))
            else:
                f_mu, f_var = la(xi, pred_type="glm")
                parts.append(torch.cat([f_mu.detach(), f_var.detach().reshape(len(xi), -1)], -1))
        out = torch.cat(parts)
        if post.likelihood == "classification":
            return out.numpy()
        return {"mean": out[:, :1].numpy(), "var": (out[:, 1:2] + post.sigma_noise**2).numpy()}

    return predict


def glm_latent_variance(post: Posterior, x: torch.Tensor, chunk: int) -> np.ndarray:
    """Diagonal of laplace-torch's GLM latent covariance (``la._glm_predictive_distribution``)."""
    parts = []
    for i in range(0, len(x), chunk):
        _, f_var = post.laplace._glm_predictive_distribution(_laplace_view(post, x[i:i + chunk]))
        parts.append(_per_input(f_var.detach().diagonal(dim1=-2, dim2=-1), len(x[i:i + chunk])))
    return torch.cat(parts).numpy()


def compile_posterior(post: Posterior, x_example: torch.Tensor, **options):
    """``mp.compile`` of the posterior with ``options`` (none: the defaults for the posterior)."""
    import momentprop as mp

    if post.likelihood == "regression":
        options["sigma_noise"] = post.sigma_noise
    return mp.compile(post.model, post.compile_source, example_inputs=(x_example,), likelihood=post.likelihood,
                      **options)


def compiled_predictor(cm, likelihood: str, chunk: int | None = None) -> Callable[[torch.Tensor], Prediction]:
    """The compiled moment graph (PyTorch runtime, ``cm.predict``): probit probabilities, or the Gaussian
    predictive (latent variance + observation noise); ``chunk`` points per call (None: all at once)."""
    def predict(x):
        if chunk is not None and len(x) > chunk:
            parts = [predict(x[i:i + chunk]) for i in range(0, len(x), chunk)]
            if likelihood == "classification":
                return np.concatenate(parts)
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        out = cm.predict(x)
        if likelihood == "classification":
            return _per_input(out, len(x)).numpy()
        mean, var = out
        var = var.diagonal(dim1=-2, dim2=-1) if var.dim() == mean.dim() + 1 else var
        return {"mean": mean.numpy(), "var": var.numpy()}
    return predict


def compiled_latent_variance(cm, x: torch.Tensor, chunk: int | None = None) -> np.ndarray:
    """Latent variance at variance scale 1 (the diagonal in full mode), ``chunk`` points per call."""
    if chunk is not None and len(x) > chunk:
        return np.concatenate([compiled_latent_variance(cm, x[i:i + chunk]) for i in range(0, len(x), chunk)])
    _, var = cm(x)
    if cm.returns_covariance:
        var = var.diagonal(dim1=-2, dim2=-1)
    return _per_input(var / cm.variance_scale, len(x)).numpy()


def mc_latent_variance(post: Posterior, x: torch.Tensor, samples: int, seed: int, vectorised: bool = True
                       ) -> np.ndarray:
    """Latent (pre-softmax) variance per output from ``samples`` weight samples (float64 accumulation)."""
    s1 = s2 = 0.0
    for out in SampledForward(post, vectorised).over_samples(post, x, samples, seed):
        out = out.double()
        s1, s2 = s1 + out.sum(0), s2 + (out**2).sum(0)
    mean = s1 / samples
    return ((s2 - samples * mean**2) / (samples - 1)).numpy()


def is_finite_prediction(p: Prediction) -> bool:
    if isinstance(p, dict):
        return all(np.isfinite(v).all() for v in p.values())
    return bool(np.isfinite(p).all())
