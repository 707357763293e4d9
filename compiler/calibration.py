"""Fitting the variance scale of a compiled model: its predictive's NLPD on held-out data, minimised over a log
grid and refined by golden section."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from momentprop.passes import heads

from .errors import CalibrationError
from .options import Options


def pointwise_nlpd(mean: torch.Tensor, var: torch.Tensor, labels: torch.Tensor, options: Options) -> torch.Tensor:
    """The negative log predictive density of each label under the compiled predictive (``options``' likelihood,
    link and observation noise) with latent moments ``mean``, ``var``: one entry per predicted distribution."""
    full = options.returns_covariance
    if options.likelihood == "classification":
        probs = heads.class_probabilities(mean, var, full, options.link)
        picked = probs.gather(-1, labels.long().reshape(*probs.shape[:-1], 1)).squeeze(-1)  # (N, ..., C) outputs
        return -torch.log(picked.clamp_min(1e-12)).reshape(-1)
    target = labels.reshape(mean.shape).to(mean.dtype)
    noise = torch.tensor((options.sigma_noise or 0.0) ** 2, dtype=mean.dtype)
    predictive = heads.add_observation_noise(var, noise, full)
    if full:
        return -torch.distributions.MultivariateNormal(mean, predictive).log_prob(target).reshape(-1)
    log_density = -0.5 * (torch.log(2 * math.pi * predictive) + (target - mean) ** 2 / predictive)
    return -log_density.sum(-1).reshape(-1)


@dataclass(frozen=True)
class Calibration:
    """What ``calibrate`` found: the scale, its validation NLPD, the bound it stopped at (``"lower"``: the MAP,
    scale 0, was best; ``"upper"``: the largest scale tried), the options it chose among (``choose=True``), and
    the best scale found where it was not taken (``declined``: its gain was within the data's noise)."""

    scale: float
    nlpd: float
    at_bound: str | None = None
    chosen: dict | None = None
    declined: dict | None = None

    def to_json(self) -> dict[str, object]:
        return {"scale": self.scale, "nlpd": self.nlpd, "at_bound": self.at_bound, "chosen": self.chosen,
                "declined": self.declined}


def fit_scale(pointwise: Callable[[float], torch.Tensor], current: float, bounds: tuple[float, float]) -> Calibration:
    """The scale with the lowest mean of ``pointwise(scale)`` (the NLPD of each validation point): 0 (the MAP) or a
    scale in ``bounds`` (81-point log grid, then golden section around the best point), taken only where it beats
    ``current`` by more than one standard error of the paired per-point difference.  A scale fitted on a few
    dozen points otherwise follows their noise (on the UCI yacht set, 25 validation points, the fitted scale made
    the test NLPD worse in every seed)."""

    def nlpd(scale: float) -> float:
        return float(pointwise(scale).mean())

    def at(log_scale: float) -> float:
        return nlpd(math.exp(log_scale))

    grid = np.linspace(math.log(bounds[0]), math.log(bounds[1]), 81)
    values = [at(g) for g in grid]
    best = int(np.nanargmin(values)) if not np.isnan(values).all() else 0
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = high - golden * (high - low), low + golden * (high - low)
        low, high = (low, b) if at(a) < at(b) else (a, high)
    fitted = (low + high) / 2
    candidates = [(at(fitted), math.exp(fitted)), (nlpd(current), current), (nlpd(0.0), 0.0)]
    value, scale = min(candidates, key=lambda c: c[0] if math.isfinite(c[0]) else math.inf)
    if not (math.isfinite(value) and math.isfinite(scale)):
        raise CalibrationError(
            "the fitted variance scale is not finite (the NLPD is NaN or infinite for every scale tried); check "
            "that the labels match the model's outputs and that the data holds no NaN"
        )
    declined = None
    kept = pointwise(current)
    if scale != current and bool(torch.isfinite(kept).all()):
        gain = kept - pointwise(scale)
        standard_error = float(gain.std() / math.sqrt(gain.numel())) if gain.numel() > 1 else math.inf
        if float(gain.mean()) <= standard_error:
            declined = {"scale": scale, "nlpd": value, "standard_error": standard_error}
            value, scale = float(kept.mean()), current
    at_bound = "lower" if scale == 0.0 or scale <= bounds[0] * 1.0001 else (
        "upper" if scale >= bounds[1] / 1.0001 else None)
    return Calibration(scale, value, at_bound, declined=declined)


def bound_warning(result: Calibration, bounds: tuple[float, float]) -> str | None:
    """What to tell the user when the fit stopped at a bound, else None."""
    if result.at_bound == "lower":
        return (f"calibrate: the best variance scale is {result.scale:.3g}, at the lower bound (0 is the MAP): on "
                f"this data the predictive's uncertainty does not help (validation NLPD {result.nlpd:.4g}); the "
                "posterior may be too wide (a marglik-tuned Laplace posterior with the paper's predictive often is): "
                "try predictive='glm', activations='moment_matched', or calibrate(data, choose=True)")
    if result.at_bound == "upper":
        return (f"calibrate: the best variance scale is at the upper bound {bounds[1]:.3g}; the posterior is much "
                "too narrow for this data, or the labels do not match the outputs; pass wider bounds to search on")
    return None
