"""Fitting the variance scale of a compiled model: its predictive's NLPD on held-out data, minimised over a log
grid and refined by golden section."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from momentprop.passes import heads

from .errors import CalibrationError
from .options import Options


def predictive_nlpd(mean: torch.Tensor, var: torch.Tensor, labels: torch.Tensor, options: Options) -> float:
    """Mean negative log predictive density of ``labels`` under the compiled predictive (``options``' likelihood,
    link and observation noise) with latent moments ``mean``, ``var``."""
    full = options.returns_covariance
    if options.likelihood == "classification":
        probs = heads.class_probabilities(mean, var, full, options.link)
        picked = probs.gather(-1, labels.long().reshape(*probs.shape[:-1], 1)).squeeze(-1)  # (N, ..., C) outputs
        return float(-torch.log(picked.clamp_min(1e-12)).mean())
    target = labels.reshape(mean.shape).to(mean.dtype)
    noise = torch.tensor((options.sigma_noise or 0.0) ** 2, dtype=mean.dtype)
    predictive = heads.add_observation_noise(var, noise, full)
    if full:
        log_density = torch.distributions.MultivariateNormal(mean, predictive).log_prob(target)
        return float(-log_density.mean())
    log_density = -0.5 * (torch.log(2 * math.pi * predictive) + (target - mean) ** 2 / predictive)
    return float(-log_density.sum(-1).mean())


def fit_scale(nlpd: Callable[[float], float], current: float, bounds: tuple[float, float]) -> float:
    """The scale in ``bounds`` with the lowest ``nlpd(scale)`` (81-point log grid, then golden section around the
    best point), or ``current`` where that is no better."""

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
    candidates = [(at(fitted), fitted), (at(math.log(current)), math.log(current))]
    value, log_scale = min(candidates, key=lambda c: c[0] if math.isfinite(c[0]) else math.inf)
    if not (math.isfinite(value) and math.isfinite(log_scale)):
        raise CalibrationError(
            "the fitted variance scale is not finite (the NLPD is NaN or infinite for every scale tried); check "
            "that the labels match the model's outputs and that the data holds no NaN"
        )
    return math.exp(log_scale)
