"""passes/heads.py: predictive heads on the output moments.

classification: the probit approximation p = softmax(mu / sqrt(1 + pi/8 sigma^2)) over the last dim;
regression: N(mu, sigma^2 + sigma_noise^2) (full: Sigma + sigma_noise^2 I); variance_scale multiplies the latent
(co)variance before either head.  The latent moments are checked against the float64 reference propagation, the
head outputs against the formulas written out here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import momentprop as mp
from oracles import Gaussian, make_mlp, random_posterior, ref_sequential

MODES = ["diag", "full"]


@pytest.fixture(scope="module")
def setup():
    model = make_mlp([6, 12, 5], nn.Tanh, seed=7)
    post = random_posterior(model, scale=0.05, seed=3)  # wide enough that the probit correction is visible
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2)) * 2
    return model, post, x


def _latent(model, post, x, full, scale=1.0) -> Gaussian:
    g = ref_sequential(model, post, Gaussian.constant(x, full))
    return Gaussian(g.mean, scale * g.var, full)


def _probit(mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Written out: exp(k_c mu_c) / sum_j exp(k_j mu_j) with k = (1 + pi var / 8)^(-1/2)."""
    logits = mu / torch.sqrt(1.0 + math.pi * var / 8.0)
    e = torch.exp(logits - logits.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


@pytest.mark.parametrize("variance_scale", [1.0, 3.0])
@pytest.mark.parametrize("covariance", MODES)
def test_classification_probit(setup, covariance, variance_scale):
    model, post, x = setup
    cm = mp.compile(
        model, post, (x,), covariance=covariance, likelihood="classification", variance_scale=variance_scale
    )
    ref = _latent(model, post, x, covariance == "full", variance_scale)
    mean, var = cm(x)
    torch.testing.assert_close(mean.double(), ref.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), ref.var, rtol=1e-4, atol=1e-6 * ref.var.abs().max().item())

    probs = cm.predict(x)
    expected = _probit(ref.mean, ref.variance())
    torch.testing.assert_close(probs.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(x)), rtol=0, atol=1e-5)
    # the correction is not negligible here: the probit probabilities differ from softmax(mean)
    assert (probs.double() - torch.softmax(ref.mean, -1)).abs().max() > 1e-2


def test_classification_with_no_variance_is_softmax(setup):
    model, _, x = setup
    probs = mp.compile(model, 0.0, (x,), likelihood="classification").predict(x)
    torch.testing.assert_close(probs, torch.softmax(model(x), -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variance_scale", [1.0, 2.5])
@pytest.mark.parametrize("covariance", MODES)
def test_regression_adds_observation_noise(setup, covariance, variance_scale):
    model, post, x = setup
    sigma = 0.3
    cm = mp.compile(
        model, post, (x,), covariance=covariance, likelihood="regression", sigma_noise=sigma,
        variance_scale=variance_scale,
    )
    full = covariance == "full"
    ref = _latent(model, post, x, full, variance_scale)
    latent_mean, latent_var = cm(x)
    mean, pred_var = cm.predict(x)
    torch.testing.assert_close(latent_var.double(), ref.var, rtol=1e-4, atol=1e-6 * ref.var.abs().max().item())
    torch.testing.assert_close(mean, latent_mean, rtol=0, atol=0)
    noise = sigma**2 * (torch.eye(5, dtype=torch.float64) if full else torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(pred_var.double(), ref.var + noise, rtol=1e-4, atol=1e-6 * ref.var.abs().max().item())


def test_regression_without_sigma_noise_adds_nothing(setup):
    model, post, x = setup
    cm = mp.compile(model, post, (x,), likelihood="regression")
    latent = cm(x)
    mean, var = cm.predict(x)
    torch.testing.assert_close(var, latent[1], rtol=0, atol=0)
