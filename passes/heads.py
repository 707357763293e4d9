"""Predictive heads applied to the output moments.

* classification, probit approximation: ``p = softmax(mu / sqrt(1 + pi/8 * sigma^2))`` over the last dim;
  the pairwise probit (``pairwise_probit``), which uses the variance of each logit difference; or the Laplace
  bridge (``laplace_bridge``);
* regression: ``N(mu, sigma^2 + sigma_noise^2)`` (full: ``Sigma + sigma_noise^2 I``).

The variance scale (the paper's scale factor) multiplies the output (co)variance before any head.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .moment import Moment, diagonal_matrix


def diagonal(variance_or_cov: Tensor, full: bool) -> Tensor:
    return torch.diagonal(variance_or_cov, dim1=-2, dim2=-1) if full else variance_or_cov


def symmetric(cov: Tensor) -> Tensor:
    """``(C + C^T) / 2``: a covariance formed as a sum of products is symmetric only up to rounding."""
    return 0.5 * (cov + cov.mT)


def probit(mean: Tensor, variance: Tensor) -> Tensor:
    """Class probabilities by the probit approximation of the softmax-Gaussian integral."""
    return torch.softmax(mean * torch.rsqrt(1.0 + (math.pi / 8.0) * variance), dim=-1)


def pairwise_probit(mean: Tensor, cov: Tensor) -> Tensor:
    """Class probabilities from the logit differences (Lu, Ie & Sha 2020, "Mean-field approximation to
    Gaussian-softmax integral with application to uncertainty estimation"): ``softmax_k(z) = 1 / sum_j
    exp(-(z_k - z_j))``, and each difference gets the probit scaling of its own variance ``S_kk + S_jj - 2 S_kj``:
    ``p_k ∝ 1 / sum_j exp(-(mu_k - mu_j) / sqrt(1 + pi/8 * var(z_k - z_j)))``, normalised.  With two classes this
    is MacKay's probit approximation of the logistic-Gaussian integral of the logit difference; the per-logit
    probit scales each logit by its own variance and misses the correlation between them, which decides the
    binary prediction."""
    variance = torch.diagonal(cov, dim1=-2, dim2=-1)
    difference_variance = (variance.unsqueeze(-1) + variance.unsqueeze(-2) - 2.0 * cov).clamp_min(0.0)
    difference = mean.unsqueeze(-1) - mean.unsqueeze(-2)
    scaled = difference * torch.rsqrt(1.0 + (math.pi / 8.0) * difference_variance)
    unnormalised = torch.exp(-torch.logsumexp(-scaled, dim=-1))
    return unnormalised / unnormalised.sum(-1, keepdim=True)


def add_observation_noise(variance_or_cov: Tensor, noise_variance: Tensor, full: bool) -> Tensor:
    """Predictive (co)variance of a Gaussian likelihood with noise variance ``noise_variance``."""
    if not full:
        return variance_or_cov + noise_variance
    eye = torch.eye(variance_or_cov.shape[-1], dtype=variance_or_cov.dtype, device=variance_or_cov.device)
    return variance_or_cov + noise_variance * eye


def laplace_bridge(mean: Tensor, cov: Tensor, normalise: bool = False) -> Tensor:
    """Class probabilities by the Laplace bridge (a Dirichlet matched to the softmax-Gaussian), computed as
    laplace-torch's ``link_approx="bridge"`` / ``"bridge_norm"`` does: first the zero-mean correction of the
    logit Gaussian (``cov`` over the classes), then ``alpha_k = (1 - 2/K + e^{mu_k} / K^2 sum_l e^{-mu_l}) /
    Sigma_kk`` and ``p = alpha / sum(alpha)``; ``normalise`` rescales the variances to mean sqrt(K/2) first."""
    total = cov.sum(dim=(-2, -1)).unsqueeze(-1)
    row = cov.sum(-1)
    mean = mean - row * mean.sum(-1, keepdim=True) / total
    cov = cov - row.unsqueeze(-1) * cov.sum(-2).unsqueeze(-2) / total.unsqueeze(-1)
    variance = torch.diagonal(cov, dim1=-2, dim2=-1)
    classes = mean.shape[-1]
    if normalise:
        scale = variance.mean(-1, keepdim=True) / math.sqrt(classes / 2)
        mean = mean / scale.sqrt()
        variance = variance / scale
    sum_exp = torch.exp(-mean).sum(-1, keepdim=True)
    alpha = (1.0 - 2.0 / classes + torch.exp(mean) / classes**2 * sum_exp) / variance
    return torch.nan_to_num(alpha / alpha.sum(-1, keepdim=True), nan=1.0)


LINKS = ("probit", "pairwise", "bridge", "bridge_norm")


def class_probabilities(mean: Tensor, variance_or_cov: Tensor, full: bool, link: str = "probit") -> Tensor:
    """The classification head: probit on the variances, the pairwise probit or the Laplace bridge on the
    covariance (diag mode: its diagonal)."""
    if link == "probit":
        return probit(mean, diagonal(variance_or_cov, full))
    cov = variance_or_cov if full else diagonal_matrix(variance_or_cov)
    if link == "pairwise":
        return pairwise_probit(mean, cov)
    return laplace_bridge(mean, cov, normalise=link == "bridge_norm")


def outputs(value: object, full: bool, variance_scale: Tensor, likelihood: str | None, link: str = "probit",
            noise_variance: Tensor | None = None) -> tuple[Tensor, ...]:
    """The compiled model's outputs from the output value (a moment, or a tensor where nothing was random):
    ``(mean, (co)variance)``, then the class probabilities or the regression predictive (co)variance.  A rounding
    residue is removed first: variances are clamped at 0, covariances symmetrised."""
    if isinstance(value, Moment):
        mean, var = value.mean, symmetric(value.covariance()) if full else value.variance().clamp_min(0.0)
    else:
        mean = value
        var = value.new_zeros(*value.shape, value.shape[-1]) if full else torch.zeros_like(value)
    var = var * variance_scale
    if likelihood == "classification":
        return mean, var, class_probabilities(mean, var, full, link)
    if likelihood == "regression":
        return mean, var, add_observation_noise(var, noise_variance, full)
    return mean, var
