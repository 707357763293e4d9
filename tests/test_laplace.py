"""laplace-torch posteriors: exact against laplace-torch's own GLM predictive where only the last layer is
random, within Monte Carlo error of ``la.sample`` for all-weights posteriors, clear errors otherwise."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import momentprop as mp
from oracles import make_mlp

import laplace  # the test extra installs it; a missing one must fail, not skip

X = torch.randn(96, 5, generator=torch.Generator().manual_seed(0))
Y_CLASS = torch.randint(0, 3, (96,), generator=torch.Generator().manual_seed(1))
Y_REG = torch.randn(96, 2, generator=torch.Generator().manual_seed(2))
X_TEST = torch.randn(7, 5, generator=torch.Generator().manual_seed(3))


def fitted(model, likelihood="classification", **options):
    y = Y_CLASS if likelihood == "classification" else Y_REG
    la = laplace.Laplace(model, likelihood, **options)
    la.fit(DataLoader(TensorDataset(X, y), batch_size=32))
    return la


def glm_latent(la, x):
    mean, cov = la._glm_predictive_distribution(x)
    return mean.detach(), cov.detach()


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_last_layer_equals_the_glm_predictive(structure, covariance):
    model = make_mlp([5, 16, 3], nn.Tanh)
    la = fitted(
        model, subset_of_weights="last_layer", hessian_structure=structure, prior_precision=0.5, temperature=0.7
    )
    cm = mp.compile(model, la, (X_TEST,), covariance=covariance, output_covariance=True)
    mean, cov = cm(X_TEST)
    glm_mean, glm_cov = glm_latent(la, X_TEST)
    assert cm.likelihood == "classification"
    torch.testing.assert_close(mean, glm_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cov, glm_cov, rtol=1e-4, atol=1e-6)


def test_last_layer_regression_takes_noise_from_laplace():
    model = make_mlp([5, 16, 2], nn.ReLU)
    la = fitted(model, "regression", subset_of_weights="last_layer", hessian_structure="kron", sigma_noise=0.3)
    cm = mp.compile(model, la, (X_TEST,), covariance="full")
    assert cm.likelihood == "regression" and cm.sigma_noise == pytest.approx(0.3)
    _, pred_cov = cm.predict(X_TEST)
    _, glm_cov = glm_latent(la, X_TEST)
    torch.testing.assert_close(pred_cov, glm_cov + 0.09 * torch.eye(2), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_subnetwork_inside_the_last_layer_equals_the_glm_predictive(structure):
    model = make_mlp([5, 8, 3], nn.Tanh)
    n_before = sum(p.numel() for p in model[:-1].parameters())
    indices = n_before + torch.tensor([0, 3, 9, 17, 24, 25])  # entries of the last weight and its bias
    la = fitted(model, subset_of_weights="subnetwork", hessian_structure=structure, subnetwork_indices=indices)
    cm = mp.compile(model, la, (X_TEST,), covariance="full")
    mean, cov = cm(X_TEST)
    glm_mean, glm_cov = glm_latent(la, X_TEST)
    torch.testing.assert_close(cov, glm_cov, rtol=1e-4, atol=1e-7)


def laplace_monte_carlo(model, la, x, n_samples=20_000):
    """Moments of model(x) over ``la.sample`` (full covariance over the outputs)."""
    samples = la.sample(n_samples).detach()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in model.named_parameters() if p.requires_grad]
    params, offset = {}, 0
    for name, shape in zip(names, shapes):
        size = torch.Size(shape).numel()
        params[name] = samples[:, offset: offset + size].reshape(-1, *shape)
        offset += size
    outputs = torch.func.vmap(lambda ps: functional_call(model, ps, (x,)))(params)
    centred = outputs - outputs.mean(0)
    return outputs.mean(0), torch.einsum("s...i,s...j->...ij", centred, centred) / (n_samples - 1)


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU])
@pytest.mark.parametrize("structure, damping", [("diag", False), ("kron", False), ("kron", True)])
def test_all_weights_within_ten_percent_of_laplace_samples(activation, structure, damping):
    model = make_mlp([5, 12, 3], activation, seed=4)
    options = {"damping": damping} if structure == "kron" else {}
    la = fitted(model, subset_of_weights="all", hessian_structure=structure, prior_precision=200.0, **options)
    torch.manual_seed(0)
    _, mc_cov = laplace_monte_carlo(model, la, X_TEST)
    _, cov = mp.compile(model, la, (X_TEST,), covariance="full")(X_TEST)
    mc_var, var = torch.diagonal(mc_cov, dim1=-2, dim2=-1), torch.diagonal(cov, dim1=-2, dim2=-1)
    assert ((var - mc_var).abs() / mc_var).max() < 0.10


def test_full_posterior_keeps_per_layer_blocks():
    """All-weights full posterior: the compiled moments equal Monte Carlo over the posterior with its
    cross-layer covariances removed (what is kept: each layer's joint weight-and-bias block)."""
    model = make_mlp([5, 6, 3], nn.Tanh, seed=5)
    la = fitted(model, subset_of_weights="all", hessian_structure="full", prior_precision=100.0)
    cov_full = la.posterior_covariance.detach().double()
    sizes = [p.numel() for p in model.parameters()]
    layer_of = torch.repeat_interleave(torch.tensor([0, 0, 1, 1]), torch.tensor(sizes))
    block_diagonal = cov_full * (layer_of[:, None] == layer_of[None, :])
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20_000, len(layer_of), generator=g, dtype=torch.float64)
    noise = noise @ torch.linalg.cholesky(block_diagonal).T
    samples = la.mean.detach().double() + noise
    reference = copy.deepcopy(model).double()
    params, offset = {}, 0
    for (name, p), size in zip(reference.named_parameters(), sizes):
        params[name] = samples[:, offset: offset + size].reshape(-1, *p.shape)
        offset += size
    outputs = torch.func.vmap(lambda ps: functional_call(reference, ps, (X_TEST.double(),)))(params)
    mc_var = outputs.var(0)
    var = mp.compile(model, la, (X_TEST,), covariance="full")(X_TEST)[1]
    var = torch.diagonal(var, dim1=-2, dim2=-1).double()
    assert ((var - mc_var).abs() / mc_var).max() < 0.10


def test_unfitted_laplace_is_a_clear_error():
    model = make_mlp([5, 8, 3])
    la = laplace.Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    with pytest.raises(mp.PosteriorError, match="not fitted"):
        mp.compile(model, la, (X_TEST,))


def test_laplace_of_another_model_is_a_clear_error():
    la = fitted(make_mlp([5, 8, 3], seed=0), subset_of_weights="all", hessian_structure="diag")
    with pytest.raises(mp.PosteriorError, match="not fitted on this model"):
        mp.compile(make_mlp([5, 8, 3], seed=1), la, (X_TEST,))
