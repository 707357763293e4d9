"""IVON: the optimizer is the posterior (mean: the model's parameters; variance 1 / (ess (hess + weight_decay)))."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import momentprop as mp
from oracles import make_mlp

import ivon


def trained(model: nn.Module, ess: float = 5_000.0) -> "ivon.IVON":
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 5, generator=g), torch.randint(0, 3, (128,), generator=g)
    optimizer = ivon.IVON(model.parameters(), lr=0.05, ess=ess, hess_init=1.0, beta2=0.99)
    for _ in range(20):
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return optimizer


def test_variance_is_read_from_the_optimizer():
    model = make_mlp([5, 8, 3])
    optimizer = trained(model)
    cm = mp.compile(model, optimizer, (torch.randn(4, 5),))
    group = optimizer.param_groups[0]
    expected = 1.0 / (group["ess"] * (group["hess"] + group["weight_decay"]))
    x = torch.randn(4, 5)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert flat.numel() == expected.numel()
    reference = mp.compile(model, expected, (x,))
    torch.testing.assert_close(cm(x)[1], reference(x)[1])


@pytest.mark.slow
@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU])
def test_moments_match_ivon_sampling(activation):
    model = make_mlp([5, 16, 3], activation, seed=2)
    optimizer = trained(model)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    with torch.no_grad():
        outputs = []
        for _ in range(20_000):
            with optimizer.sampled_params():
                outputs.append(model(x))
        outputs = torch.stack(outputs).double()
    mc_var = outputs.var(0)
    _, cov = mp.compile(model, optimizer, (x,), covariance="full")(x)
    var = torch.diagonal(cov, dim1=-2, dim2=-1).double()
    assert ((var - mc_var).abs() / mc_var).max() < 0.10


def test_optimizer_over_other_parameters_is_a_clear_error():
    optimizer = trained(make_mlp([5, 8, 3], seed=0))
    with pytest.raises(mp.PosteriorError, match="not in this model"):
        mp.compile(make_mlp([5, 8, 3], seed=1), optimizer, (torch.randn(2, 5),))
