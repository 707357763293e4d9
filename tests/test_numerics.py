"""Numerics at the extremes: variances are never negative, full covariances are symmetric, and a finite input whose
mean is finite gives a finite variance wherever float32 can hold it (the oracle: the exact linearisation in
float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import momentprop as mp
from exact_oracle import jacobian_covariance


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


@pytest.mark.parametrize("covariance", ["diag", "full"])
@pytest.mark.parametrize("scale", [1e19, 1e21])
def test_huge_inputs_give_the_exact_finite_variance(covariance, scale):
    """Inputs of 1e19-1e21 square past float32's range (3.4e38) while the variance (about 1e32-1e36) fits: the
    compiled variance is finite and equals the float64 linearisation (with one random layer before the ReLU,
    glm is exact in both modes)."""
    model = _mlp()
    posterior = {n: torch.full_like(p, 1e-6) for n, p in model.named_parameters()}
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1)) * scale
    cm = mp.compile(model, posterior, (x[:2],), covariance=covariance, predictive="glm")
    mean, var = cm(x)
    _, exact = jacobian_covariance(model, posterior, x)
    exact = exact if covariance == "full" else torch.diagonal(exact, dim1=-2, dim2=-1)
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()
    torch.testing.assert_close(var.double(), exact, rtol=1e-4, atol=1e-6 * exact.abs().max().item())


def test_layernorm_of_nearly_constant_features_has_no_negative_variance():
    """The LayerNorm rule's variance is a difference of moments; where the exact value is about 0 rounding made it
    slightly negative (down to -6.7e-11): the output variance is clamped at 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1e-4)
    posterior = {n: torch.full_like(p, 1e-8) for n, p in model.named_parameters()}
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(2))
    for covariance in ("diag", "full"):
        _, var = mp.compile(model, posterior, (x[:2],), covariance=covariance)(x)
        variances = var if covariance == "diag" else torch.diagonal(var, dim1=-2, dim2=-1)
        assert variances.min() >= 0


def test_full_covariance_is_exactly_symmetric():
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 7)).eval()
    posterior = {n: torch.full_like(p, 1e-3) for n, p in model.named_parameters()}
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(3))
    _, cov = mp.compile(model, posterior, (x[:2],), covariance="full")(x)
    assert torch.equal(cov, cov.mT)
    assert torch.linalg.eigvalsh(cov.double()).min() >= -1e-6 * cov.abs().max()
