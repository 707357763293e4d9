"""Recurrent layers: with every weight random, ``predictive="glm"`` and ``covariance="full"`` give exactly the
first-order covariance ``J S J^T`` (autograd, float64), the weights' noise shared by every time step, and the
paper's diagonal variant is close to Monte Carlo.  The old rules were 1.5x to 5x off on ``nn.GRU`` (its gates
``(h - n) * z + n`` share noise through different paths)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import momentprop as mp
from exact_oracle import jacobian_covariance, median_relative_error, monte_carlo_moments, relative_posterior


class LastStep(nn.Module):
    def __init__(self, cell: type[nn.Module]):
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.mark.slow  # an unrolled recurrence compiles in a few seconds
@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM, nn.RNN])
def test_recurrent_layer_glm_full_is_the_exact_linearisation(cell):
    torch.manual_seed(0)
    model = LastStep(cell).eval()
    g = torch.Generator().manual_seed(1)
    posterior = {n: 1e-3 * (0.5 + torch.rand(p.shape, generator=g)) for n, p in model.named_parameters()}
    x = torch.randn(3, 3, 3, generator=g)
    mean, cov = mp.compile(model, posterior, (x,), covariance="full", predictive="glm")(x)
    out, expected = jacobian_covariance(model, posterior, x)
    torch.testing.assert_close(mean.double(), out.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cov.double(), expected.double(), rtol=1e-4, atol=1e-5 * expected.abs().max().item())


class RandomInputs(nn.Module):
    """A random layer feeds the recurrence: its steps are ``stack([h, tanh(h), h])`` (a ``cat`` and a view that
    moves features into the time axis), so the input noise and both weights meet at every step."""

    def __init__(self, cell: type[nn.Module]):
        super().__init__()
        self.encode = nn.Linear(3, 3)
        self.rnn = cell(3, 4, batch_first=True)

    def forward(self, x):
        h = self.encode(x)
        out, _ = self.rnn(torch.stack([h, torch.tanh(h), h], dim=1))
        return out[:, -1]


@pytest.mark.slow
@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM, nn.RNN])
def test_recurrence_of_random_inputs_glm_full_is_the_exact_linearisation(cell):
    torch.manual_seed(0)
    model = RandomInputs(cell).eval()
    posterior = {n: torch.full_like(p, 1e-3) for n, p in model.named_parameters()}
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    _, cov = mp.compile(model, posterior, (x[:2],), covariance="full", predictive="glm")(x)
    _, expected = jacobian_covariance(model, posterior, x)
    torch.testing.assert_close(cov.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM, nn.RNN])
def test_recurrent_layer_diag_suq_is_close_to_monte_carlo(cell):
    """Five steps, every weight random at a small variance: the diagonal ``suq`` variance within 15% (median) of
    4,000 Monte Carlo forward passes (measured 2026-12-03: GRU 6%, LSTM 14%, RNN 12%; full covariance 1-3%)."""
    torch.manual_seed(0)
    model = LastStep(cell).eval()
    g = torch.Generator().manual_seed(1)
    posterior = relative_posterior(model, 1e-4, g)
    x = torch.randn(6, 5, 3, generator=g)
    _, var = mp.compile(model, posterior, (x,), covariance="diag", predictive="suq")(x)
    _, mc_var, _ = monte_carlo_moments(model, posterior, x, n_samples=4000, seed=0)
    assert median_relative_error(var, mc_var) < 0.15
