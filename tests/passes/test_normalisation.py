"""passes/normalisation.py: batch norm in eval mode, a per-channel affine map with fixed statistics.

Oracle, written out per channel c: y = (x - mu_c) g_c / sqrt(rv_c + eps) + beta_c.
Deterministic gamma: Var y = g^2 v / (rv + eps) (full: the covariance scaled by the per-channel factors).
Random gamma (independent of x, variance s_g): with a = m_x - mu and k = 1/sqrt(rv + eps),
Cov(y_c, y_d) = k_c k_d (m_gc m_gd Sigma_cd + [c == d] s_gc (Sigma_cc + a_c^2)) + [c == d] s_beta_c.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from oracles import (
    Gaussian,
    Source,
    assert_moments_close,
    assert_symmetric_psd,
    compiled_moments,
    monte_carlo,
    random_posterior,
    source_posterior,
)

MODES = ["diag", "full"]


def _randomise(bn: nn.modules.batchnorm._BatchNorm, seed: int, unit_affine: bool = False):
    """Random running statistics (and gamma, beta unless ``unit_affine``), eps not the default."""
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(0.2 + 3 * torch.rand(c, generator=g))
        if not unit_affine:
            bn.weight.copy_(torch.randn(c, generator=g) * 2)
            bn.bias.copy_(torch.randn(c, generator=g))
    return bn.eval()


class BN1d(nn.Module):
    """(batch, C) features from a Source, batch-normalised over C (the covariance dim)."""

    def __init__(self, unit_affine=False):
        super().__init__()
        self.src = Source(4, 6, gain=2.0, seed=51)
        self.bn = _randomise(nn.BatchNorm1d(6, eps=1e-3), seed=52, unit_affine=unit_affine)

    def forward(self, x):
        return self.bn(self.src(x))


def _expected_bn(g: Gaussian, bn, s_gamma=None, s_beta=None, channel_dim=-1) -> Gaussian:
    """Per-channel oracle (see the module docstring); ``channel_dim`` locates C in the mean."""
    shape = [1] * g.mean.dim()
    shape[channel_dim] = -1
    per_channel = lambda t: t.detach().double().reshape(shape)  # noqa: E731
    k = 1.0 / torch.sqrt(per_channel(bn.running_var) + bn.eps)
    mu, gamma, beta = per_channel(bn.running_mean), per_channel(bn.weight), per_channel(bn.bias)
    a = g.mean - mu
    mean = a * k * gamma + beta
    if not g.full:
        var = k**2 * gamma**2 * g.var
        if s_gamma is not None:
            var = var + k**2 * per_channel(s_gamma) * (g.var + a**2)
        if s_beta is not None:
            var = var + per_channel(s_beta)
        return Gaussian(mean, var, False)
    assert channel_dim in (-1, g.mean.dim() - 1) or s_gamma is None
    scale = (k * gamma).expand_as(g.mean)
    cov = scale.unsqueeze(-1) * scale.unsqueeze(-2) * g.var
    extra = torch.zeros_like(g.mean)
    if s_gamma is not None:
        extra = extra + k**2 * per_channel(s_gamma) * (torch.diagonal(g.var, dim1=-2, dim2=-1) + a**2)
    if s_beta is not None:
        extra = extra + per_channel(s_beta)
    return Gaussian(mean, cov + torch.diag_embed(extra), True)


@pytest.mark.parametrize("covariance", MODES)
@pytest.mark.parametrize("case", ["fixed_affine", "unit_affine", "random_gamma_beta"])
def test_batchnorm1d_eval(case, covariance):
    model = BN1d(unit_affine=case == "unit_affine").eval()
    post = source_posterior(model, scale=1e-2, seed=8)
    if case == "random_gamma_beta":
        post.update(random_posterior(model, scale=5e-2, seed=9, names={"bn.weight", "bn.bias"}))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    mean, var = compiled_moments(model, post, x, covariance)
    g = model.src.reference(x, post, "src.", covariance == "full")
    ref = _expected_bn(g, model.bn, post.get("bn.weight"), post.get("bn.bias"))
    assert_moments_close(mean, var, ref)
    torch.testing.assert_close(mean, model(x), rtol=1e-5, atol=1e-5)
    if covariance == "full":
        assert_symmetric_psd(var)


def test_batchnorm_with_random_gamma_matches_monte_carlo():
    """The random-gamma product is exact for independent Gaussians: check it against sampling."""
    model = BN1d().eval()
    post = source_posterior(model, scale=2e-2, seed=8)
    post.update(random_posterior(model, scale=0.2, seed=9, names={"bn.weight", "bn.bias"}))
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(3))
    _, cov = compiled_moments(model, post, x, "full")
    _, mc_var, mc_cov = monte_carlo(model, post, x, n_samples=20_000)
    scale = (mc_var.unsqueeze(-1) * mc_var.unsqueeze(-2)).sqrt()
    assert ((cov.double() - mc_cov).abs() <= 0.05 * scale).all()


class BN2d(nn.Module):
    """(batch, C, H, W): a Source acting on the last dim (W, the covariance dim), batch norm over channels C."""

    def __init__(self):
        super().__init__()
        self.src = Source(5, 4, gain=2.0, seed=53)
        self.bn = _randomise(nn.BatchNorm2d(3), seed=54)

    def forward(self, x):
        return self.bn(self.src(x))


@pytest.mark.parametrize("covariance", MODES)
def test_batchnorm2d_eval_scales_each_channel(covariance):
    """Channels on dim 1, covariance over the last dim: each (c, h) row's covariance is scaled by
    (g_c / sqrt(rv_c + eps))^2."""
    model = BN2d().eval()
    post = source_posterior(model, scale=1e-2, seed=10)
    x = torch.randn(2, 3, 2, 5, generator=torch.Generator().manual_seed(4))
    mean, var = compiled_moments(model, post, x, covariance)
    g = model.src.reference(x, post, "src.", covariance == "full")
    ref = _expected_bn(g, model.bn, channel_dim=1)
    assert_moments_close(mean, var, ref)
    torch.testing.assert_close(mean, model(x), rtol=1e-5, atol=1e-5)
