"""Predictive heads applied to the output moments.

* classification, probit approximation: ``p = softmax(mu / sqrt(1 + pi/8 * sigma^2))`` over the last dim;
* regression: ``N(mu, sigma^2 + sigma_noise^2)`` (full: ``Sigma + sigma_noise^2 I``).

The variance scale (the paper's scale factor) multiplies the output (co)variance before any head.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def diagonal(variance_or_cov: Tensor, full: bool) -> Tensor:
    return torch.diagonal(variance_or_cov, dim1=-2, dim2=-1) if full else variance_or_cov


def probit(mean: Tensor, variance: Tensor) -> Tensor:
    """Class probabilities by the probit approximation of the softmax-Gaussian integral."""
    return torch.softmax(mean * torch.rsqrt(1.0 + (math.pi / 8.0) * variance), dim=-1)


def add_observation_noise(variance_or_cov: Tensor, noise_variance: Tensor, full: bool) -> Tensor:
    """Predictive (co)variance of a Gaussian likelihood with noise variance ``noise_variance``."""
    if not full:
        return variance_or_cov + noise_variance
    eye = torch.eye(variance_or_cov.shape[-1], dtype=variance_or_cov.dtype, device=variance_or_cov.device)
    return variance_or_cov + noise_variance * eye
