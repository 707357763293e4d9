"""passes/elementwise.py: add, sub, mul, div, pow, where, neg, with constants and with random operands.

A random operand comes from ``oracles.Source``: exactly Gaussian, with correlated features, so the full mode
is exercised on a non-diagonal covariance.  Oracles: the linearisation of the whole function of one random
operand (derivative by autograd; exact for affine maps), the exact product variance of independent operands,
and Monte Carlo over the weight posterior.
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
    ref_elementwise,
    ref_linear,
    source_posterior,
)

MODES = ["diag", "full"]
C = 6


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# Functions of one random operand ``a`` and a constant tensor ``c`` (entries bounded away from 0).
UNARY = {
    "add_const": lambda a, c: a + c,
    "sub_const": lambda a, c: a - c,
    "const_sub": lambda a, c: c - a,
    "scalar_rsub": lambda a, c: 2.0 - a,
    "mul_const": lambda a, c: a * c,
    "mul_scalar": lambda a, c: -3.0 * a,
    "div_const": lambda a, c: a / c,
    "const_div": lambda a, c: c / a,  # linearised: -c / m^2
    "neg": lambda a, c: -a,
    "pow": lambda a, c: a**3,
    "same_root_add": lambda a, c: a + a,  # 2a: variance 4v, not 2v
    "same_root_sub": lambda a, c: a - a,  # exactly zero
    "same_root_mul": lambda a, c: a * a,  # linearised: (2m)^2 v
    "where": lambda a, c: torch.where(a > 0.3, a, 0.25 * a),
}


class Unary(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        # offset keeps the means away from 0 so that c / a is well conditioned
        self.src = Source(4, C, gain=1.0, offset=2.0, seed=11)
        self.register_buffer("c", torch.tensor([1.5, -2.0, 0.7, 3.0, -0.9, 1.2]))

    def forward(self, x):
        return self.fn(self.src(x), self.c)


@pytest.mark.parametrize("covariance", [pytest.param("diag", marks=pytest.mark.slow), "full"])  # fast loop: full
@pytest.mark.parametrize("name", list(UNARY))
def test_one_random_operand(name, covariance):
    """Exact for affine maps (c^2 var, var/c^2, var unchanged), linearised otherwise: f'(m)^2 v or J Sigma J.
    Operands of one root are combined by the chain rule (a + a = 2a; a - a = 0)."""
    model = Unary(UNARY[name]).eval()
    post = source_posterior(model, scale=1e-2)
    x = _x(5, 4)
    mean, var = compiled_moments(model, post, x, covariance)
    g = model.src.reference(x, post, "src.", covariance == "full")
    ref = ref_elementwise(g, lambda t: UNARY[name](t, model.c.double()))
    assert_moments_close(mean, var, ref)
    torch.testing.assert_close(mean, model(x), rtol=1e-6, atol=1e-6)
    if name == "same_root_sub":
        assert (var == 0).all()


def _independent(op, ga: Gaussian, gb: Gaussian) -> Gaussian:
    """Reference moments of ``op(a, b)`` for independent Gaussian ``a``, ``b`` (written out per op)."""
    ma, mb, full = ga.mean, gb.mean, ga.full

    def outer(u):  # u u^T over the last dim (full) or u^2 (diag)
        return u.unsqueeze(-1) * u.unsqueeze(-2) if full else u * u

    if op == "add":
        return Gaussian(ma + mb, ga.var + gb.var, full)
    if op == "sub_scaled":  # 2a - 3b, written torch.sub(2a, b, alpha=3)
        return Gaussian(2 * ma - 3 * mb, 4 * ga.var + 9 * gb.var, full)
    if op == "mul":  # exact: m_a^2 v_b + m_b^2 v_a + v_a v_b  (full: Hadamard products)
        return Gaussian(ma * mb, outer(ma) * gb.var + outer(mb) * ga.var + ga.var * gb.var, full)
    if op == "div":  # linearised: d/da = 1/m_b, d/db = -m_a/m_b^2
        return Gaussian(ma / mb, outer(1 / mb) * ga.var + outer(-ma / mb**2) * gb.var, full)
    raise ValueError(op)


class Binary(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op
        self.src_a = Source(4, C, gain=1.5, seed=21)
        self.src_b = Source(4, C, gain=1.0, offset=3.0, seed=22)  # means ~3: a well-conditioned divisor

    def forward(self, x):
        a, b = self.src_a(x), self.src_b(x)
        if self.op == "add":
            return a + b
        if self.op == "sub_scaled":
            return torch.sub(2 * a, b, alpha=3.0)
        if self.op == "mul":
            return a * b
        if self.op == "div":
            return a / b
        # b's first feature broadcast over the features of a: perfectly correlated copies of one random scalar
        if self.op == "add_broadcast":
            return a + b[..., :1]
        if self.op == "mul_broadcast":
            return a * b[..., :1]
        raise ValueError(self.op)


@pytest.mark.parametrize("covariance", MODES)
@pytest.mark.parametrize("op", ["add", "sub_scaled", "mul", "div", "add_broadcast", "mul_broadcast"])
def test_two_independent_random_operands(op, covariance):
    """Independent operands: (co)variances add (scaled by the coefficients); the product has the exact variance
    m_a^2 v_b + m_b^2 v_a + v_a v_b (full: m_a m_a^T o Sigma_b + m_b m_b^T o Sigma_a + Sigma_a o Sigma_b);
    the quotient is linearised.  A (..., 1) operand broadcast over the features is one scalar copied, so in full
    mode it contributes to every covariance entry."""
    model = Binary(op).eval()
    post = source_posterior(model, scale=2e-2, seed=3)
    x = _x(5, 4)
    full = covariance == "full"
    mean, var = compiled_moments(model, post, x, covariance)
    ga, gb = model.src_a.reference(x, post, "src_a.", full), model.src_b.reference(x, post, "src_b.", full)
    if op.endswith("_broadcast"):
        gb = Gaussian(gb.mean[..., :1], gb.var[..., :1, :1] if full else gb.var[..., :1], full)
    ref = _independent(op.removesuffix("_broadcast"), ga, gb)
    assert_moments_close(mean, var, ref)
    torch.testing.assert_close(mean, model(x), rtol=1e-6, atol=1e-6)
    if full:
        assert_symmetric_psd(var)


@pytest.mark.parametrize("covariance", MODES)
def test_product_of_independent_gaussians_matches_monte_carlo(covariance):
    """The product of two independent Gaussians has exactly the variance the mul rule claims; the posterior is
    wide enough that the v_a v_b term matters (a linearised product, without it, fails the same check)."""
    model = Binary("mul").eval()
    post = source_posterior(model, scale=0.5, seed=4)
    x = _x(4, 4, seed=2)
    mean, var = compiled_moments(model, post, x, covariance)
    _, mc_var, mc_cov = monte_carlo(model, post, x, n_samples=20_000)
    if covariance == "diag":
        torch.testing.assert_close(var.double(), mc_var, rtol=0.05, atol=0)
    else:
        scale = (mc_var.unsqueeze(-1) * mc_var.unsqueeze(-2)).sqrt()
        assert ((var.double() - mc_cov).abs() <= 0.05 * scale).all()
    ga = model.src_a.reference(x, post, "src_a.", False)
    gb = model.src_b.reference(x, post, "src_b.", False)
    linearised = ga.mean**2 * gb.var + gb.mean**2 * ga.var
    assert ((linearised - mc_var).abs() > 0.05 * mc_var).any(), "the check cannot tell exact from linearised"


class Residual(nn.Module):
    """``y + F(y)``: F a deterministic linear layer and tanh, or a Bayesian linear layer."""

    def __init__(self, bayesian_branch: bool):
        super().__init__()
        self.src = Source(4, C, gain=1.0, seed=31)
        torch.manual_seed(32)
        self.branch = nn.Linear(C, C)
        self.bayesian_branch = bayesian_branch

    def forward(self, x):
        y = self.src(x)
        return y + (self.branch(y) if self.bayesian_branch else torch.tanh(self.branch(y)))


@pytest.mark.parametrize("covariance", MODES)
@pytest.mark.parametrize("bayesian_branch", [False, True])
def test_residual_adds_variances(bayesian_branch, covariance):
    """The paper's residual rule: x + F(x) with the two terms taken as independent, so (co)variances add.  In
    full mode F is a function of x instead, and the sum is linearised as one function:
    ``Cov = (I + J_F) Sigma (I + J_F)^T`` with ``J_F = diag(tanh'(W m + b)) W``; a Bayesian branch ``W x + b``
    adds its weight noise ``diag(E[x^2] S^T + s_b)`` (independent of x) to ``(I + M) Sigma (I + M)^T``."""
    model = Residual(bayesian_branch).eval()
    post = source_posterior(model, scale=1e-2, seed=5)
    if bayesian_branch:
        post.update({"branch.weight": torch.full((C, C), 3e-3), "branch.bias": torch.full((C,), 1e-3)})
    x = _x(5, 4)
    full = covariance == "full"
    g = model.src.reference(x, post, "src.", full)
    f = ref_linear(g, model.branch.weight, model.branch.bias, post.get("branch.weight"), post.get("branch.bias"))
    if not bayesian_branch:
        f = ref_elementwise(f, torch.tanh)
    ref = Gaussian(g.mean + f.mean, g.var + f.var, full)
    weight = model.branch.weight.detach().double()
    if full and not bayesian_branch:
        pre = g.mean @ weight.T + model.branch.bias.detach().double()
        jac = torch.eye(C, dtype=torch.float64) + (1 - torch.tanh(pre) ** 2).unsqueeze(-1) * weight
        ref = Gaussian(ref.mean, jac @ g.var @ jac.mT, True)
    if full and bayesian_branch:
        jac = torch.eye(C, dtype=torch.float64) + weight
        second = g.mean**2 + torch.diagonal(g.var, dim1=-2, dim2=-1)
        noise = second @ post["branch.weight"].double().T + post["branch.bias"].double()
        ref = Gaussian(ref.mean, jac @ g.var @ jac.mT + torch.diag_embed(noise), True)
    mean, var = compiled_moments(model, post, x, covariance)
    assert_moments_close(mean, var, ref)
    torch.testing.assert_close(mean, model(x), rtol=1e-6, atol=1e-6)
