"""Write the page's model: a 1-D regression toy with a diagonal Laplace posterior, compiled with momentprop.

    python web/make_toy_model.py            # writes web/toy_regression.onnx and web/toy_data.json

A 1-32-32-1 tanh MLP is fitted to noisy sin(x) on two clusters, x in [-4, -1.5] and [1, 3.5]; the posterior is a
diagonal Laplace approximation (prior precision 10, generalised Gauss-Newton diagonal written out with torch.func,
observation noise 0.1), compiled with predictive="glm" (first order in the weights); the paper's "suq" rule
gives wider, flatter bands for this posterior. Training runs on one thread (about a second).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

import momentprop as mp

HERE = Path(__file__).resolve().parent
SIGMA_NOISE = 0.1
PRIOR_PRECISION = 10.0


def toy_data(seed: int = 0, n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.cat(
        [torch.empty(n // 2).uniform_(-4, -1.5, generator=g), torch.empty(n // 2).uniform_(1, 3.5, generator=g)]
    )
    y = torch.sin(x) + SIGMA_NOISE * torch.randn(n, generator=g)
    return x[:, None], y[:, None]


def diagonal_laplace(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Posterior variances 1 / (prior precision + diag GGN), GGN = sum_n J_n^2 / sigma^2 for a Gaussian likelihood."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xi):
        return torch.func.functional_call(model, p, (xi[None],)).squeeze()

    jac = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(params, x)
    return {k: 1.0 / (PRIOR_PRECISION + (j**2).sum(0) / SIGMA_NOISE**2) for k, j in jac.items()}


def build(seed: int = 0, steps: int = 1500) -> tuple[mp.CompiledModel, torch.Tensor, torch.Tensor]:
    """Train the MLP, fit the posterior, compile (likelihood='regression'); returns (compiled, x, y)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny full-batch problem: more threads only contend
    try:
        return _build(seed, steps)
    finally:
        torch.set_num_threads(threads)


def _build(seed: int, steps: int) -> tuple[mp.CompiledModel, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    x, y = toy_data(seed)
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        optimizer.step()
    model.eval()
    posterior = diagonal_laplace(model, x)
    compiled = mp.compile(model, posterior, (x[:2],), likelihood="regression", sigma_noise=SIGMA_NOISE,
                          predictive="glm", covariance="diag")  # one output: variances, which the page reads
    return compiled, x, y


def write(folder: str | Path = HERE, name: str = "toy_regression.onnx") -> Path:
    """Write the ONNX file and the training points (toy_data.json, drawn by the page) to ``folder``."""
    folder = Path(folder)
    compiled, x, y = build()
    path = compiled.to_onnx(folder / name)
    (folder / "toy_data.json").write_text(json.dumps({"x": x.squeeze(1).tolist(), "y": y.squeeze(1).tolist()}))
    return path


if __name__ == "__main__":
    print(f"wrote {write(sys.argv[1] if len(sys.argv) > 1 else HERE)}")
