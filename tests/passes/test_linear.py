"""passes/linear.py: Gaussian moment matching of h = W a + b (linear, addmm, mm, matmul).

Oracles: the paper's equations in float64 (``oracles.ref_linear`` and explicit sums written out below) and Monte
Carlo over the weight posterior.  For a network without activations the second moments are exact, so the
compiled covariance must match both the closed form and Monte Carlo.
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
    make_mlp,
    monte_carlo,
    random_posterior,
    ref_linear,
    ref_sequential,
    source_posterior,
)

MODES = ["diag", "full"]


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("covariance", MODES)
@pytest.mark.parametrize(
    "random_weight, random_bias", [(True, True), (True, False), (False, True), (False, False)]
)
def test_layer_on_deterministic_input(random_weight, random_bias, covariance):
    """Var h = x^2 S^T + s_b; a deterministic input leaves the outputs uncorrelated (diagonal covariance).
    The input has a middle dimension (batch, tokens, features): moments are per feature vector."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5)).eval()
    names = {n for n, keep in (("0.weight", random_weight), ("0.bias", random_bias)) if keep}
    post = random_posterior(model, scale=1e-2, names=names)
    x = _x(4, 3, 6)
    mean, var = compiled_moments(model, post or 0.0, x, covariance)  # nothing random: zero variances ({} is refused)

    # Written out element by element: Var h[b, t, o] = sum_i x[b, t, i]^2 S[o, i] + s_b[o].
    expected = torch.zeros(4, 3, 5, dtype=torch.float64)
    x64 = x.double()
    for o in range(5):
        if random_weight:
            expected[..., o] += (x64**2 * post["0.weight"][o].double()).sum(-1)
        if random_bias:
            expected[..., o] += post["0.bias"][o].double()
    ref = Gaussian(model(x), torch.diag_embed(expected) if covariance == "full" else expected, covariance == "full")
    assert_moments_close(mean, var, ref)
    torch.testing.assert_close(mean, model(x), rtol=1e-6, atol=1e-6)


# Which parameters of Linear(5,7) -> Linear(7,6) -> Linear(6,4) are random.  Each subset exercises a different
# combination of (input random?, weight random?, bias random?) at layers 1 and 2.
SUBSETS = {
    "all": None,
    "random_input_deterministic_weight": {"0.weight", "2.weight"},
    "biases_only": {"0.bias", "1.bias", "2.bias"},
    "middle_weight_only": {"1.weight"},
}


@pytest.mark.parametrize("covariance", MODES)
@pytest.mark.parametrize("subset", list(SUBSETS))
def test_random_input_against_paper_equations(subset, covariance):
    """diag: Var h = m^2 S^T + v (M^2 + S)^T + s_b;  full: Cov h = M Sigma M^T + diag((m^2 + diag Sigma) S^T + s_b)."""
    model = make_mlp([5, 7, 6, 4], activation=None, seed=3)
    post = random_posterior(model, scale=5e-3, seed=1, names=SUBSETS[subset])
    x = _x(6, 5)
    mean, var = compiled_moments(model, post, x, covariance)
    ref = ref_sequential(model, post, Gaussian.constant(x, covariance == "full"))
    assert_moments_close(mean, var, ref)
    torch.testing.assert_close(mean, model(x), rtol=1e-6, atol=1e-6)
    if covariance == "full":
        assert_symmetric_psd(var)
    if subset == "random_input_deterministic_weight":
        # The middle layer has a random input and a deterministic weight: its output is correlated, so in
        # full mode the covariance must be far from diagonal (guards against a rule that drops M Sigma M^T).
        if covariance == "full":
            off = var - torch.diag_embed(torch.diagonal(var, dim1=-2, dim2=-1))
            assert off.abs().max() > 0.1 * var.abs().max()


@pytest.fixture(scope="module")
def linear_net_mc():
    """A two-layer network without activations, every parameter random, and its Monte Carlo moments."""
    model = make_mlp([4, 6, 3], activation=None, seed=5)
    post = random_posterior(model, scale=2e-2, seed=2)
    x = _x(5, 4, seed=7)
    return model, post, x, monte_carlo(model, post, x, n_samples=20_000)


@pytest.mark.parametrize("covariance", MODES)
def test_network_without_activations_is_exact(linear_net_mc, covariance):
    """y = W2 (W1 x + b1) + b2 with independent Gaussian weights: second moments in closed form,
    Cov y_kl = sum_i M2_ki M2_li v1_i + [k == l] (sum_i S2_ki (m1_i^2 + v1_i) + s2_k),  v1 = x^2 S1^T + s1.
    The first layer's outputs are uncorrelated (deterministic input), so the diag mode is exact too."""
    model, post, x, (mc_mean, mc_var, mc_cov) = linear_net_mc
    mean, var = compiled_moments(model, post, x, covariance)

    x64 = x.double()
    W1, b1, W2, b2 = (p.detach().double() for p in (model[0].weight, model[0].bias, model[1].weight, model[1].bias))
    S1, s1, S2, s2 = (post[n].double() for n in ("0.weight", "0.bias", "1.weight", "1.bias"))
    m1 = x64 @ W1.T + b1
    v1 = x64**2 @ S1.T + s1
    cov = torch.zeros(5, 3, 3, dtype=torch.float64)
    for n in range(5):
        for k in range(3):
            for j in range(3):
                cov[n, k, j] = (W2[k] * W2[j] * v1[n]).sum()
            cov[n, k, k] += (S2[k] * (m1[n] ** 2 + v1[n])).sum() + s2[k]
    full = covariance == "full"
    exact = Gaussian(m1 @ W2.T + b2, cov if full else torch.diagonal(cov, dim1=-2, dim2=-1), full)
    assert_moments_close(mean, var, exact)

    # Monte Carlo (20,000 samples): relative standard error of a variance ~1%; allow 5%.
    got_var = torch.diagonal(var, dim1=-2, dim2=-1) if covariance == "full" else var
    torch.testing.assert_close(got_var.double(), mc_var, rtol=0.05, atol=0)
    torch.testing.assert_close(mean.double(), mc_mean, rtol=0, atol=0.05 * mc_var.sqrt().max().item())
    if covariance == "full":
        scale = (mc_var.unsqueeze(-1) * mc_var.unsqueeze(-2)).sqrt()
        assert ((var.double() - mc_cov).abs() <= 0.05 * scale).all()


def test_deep_network_without_activations_full_covariance_matches_monte_carlo():
    """Three random layers: the intermediate outputs are correlated; the full-covariance propagation stays exact."""
    model = make_mlp([4, 6, 5, 3], activation=None, seed=8)
    post = random_posterior(model, scale=2e-2, seed=4)
    x = _x(4, 4, seed=9)
    _, cov = compiled_moments(model, post, x, "full")
    _, mc_var, mc_cov = monte_carlo(model, post, x, n_samples=20_000)
    scale = (mc_var.unsqueeze(-1) * mc_var.unsqueeze(-2)).sqrt()
    assert ((cov.double() - mc_cov).abs() <= 0.05 * scale).all()
    assert_symmetric_psd(cov)


class RightOperand(nn.Module):
    """A Bayesian linear layer followed by a product with a weight stored (in, out), as GPT-2's Conv1D does."""

    def __init__(self, op: str, d_in=5, d_mid=6, d_out=4):
        super().__init__()
        self.op = op
        self.pre = nn.Linear(d_in, d_mid)
        self.W = nn.Parameter(torch.randn(d_mid, d_out) / d_mid**0.5)
        self.b = nn.Parameter(torch.randn(d_out))

    def forward(self, x):
        a = self.pre(x)
        if self.op == "addmm":
            return torch.addmm(self.b, a, self.W)
        if self.op == "addmm_scaled":
            return torch.addmm(self.b, a, self.W, beta=0.5, alpha=2.0)
        if self.op == "mm":
            return torch.mm(a, self.W)
        if self.op == "matmul":  # a is (batch, tokens, features)
            return a @ self.W + self.b
        raise ValueError(self.op)


@pytest.mark.parametrize("covariance", MODES)
@pytest.mark.parametrize("op", ["addmm", "addmm_scaled", "mm", "matmul"])
def test_right_operand_products(op, covariance):
    """beta b + alpha (a @ W) with W (in, out): the linear rule with W^T, alpha^2 on the product's (co)variance and
    beta^2 on the bias variance; both operands random and independent."""
    torch.manual_seed(4)
    model = RightOperand(op).eval()
    post = random_posterior(model, scale=5e-3, seed=3)
    x = _x(4, 3, 5) if op == "matmul" else _x(4, 5)
    mean, var = compiled_moments(model, post, x, covariance)

    alpha, beta = (2.0, 0.5) if op == "addmm_scaled" else (1.0, 1.0)
    has_bias = op != "mm"
    g = Gaussian.constant(x, covariance == "full")
    g = ref_linear(g, model.pre.weight, model.pre.bias, post["pre.weight"], post["pre.bias"])
    ref = ref_linear(
        g,
        alpha * model.W.detach().T,
        beta * model.b.detach() if has_bias else None,
        alpha**2 * post["W"].T,
        beta**2 * post["b"] if has_bias else None,
    )
    assert_moments_close(mean, var, ref)
    torch.testing.assert_close(mean, model(x), rtol=1e-5, atol=1e-5)


def test_output_covariance_keeps_the_last_layer_correlations():
    """diag mode with output_covariance=True: diagonal propagation up to the last layer, then its full covariance
    M diag(v) M^T + diag((m^2 + v) S^T + s_b); its diagonal equals the plain diag-mode variance."""
    model = make_mlp([6, 8, 8, 3], nn.Tanh, seed=2)
    post = random_posterior(model, scale=1e-3, seed=5)
    x = _x(5, 6)
    g = ref_sequential(model[:-1], post, Gaussian.constant(x, False))
    last = model[-1]
    ref = ref_linear(g.to_full(), last.weight, last.bias, post["4.weight"], post["4.bias"])
    mean, cov = compiled_moments(model, post, x, "diag", output_covariance=True)
    assert_moments_close(mean, cov, ref)
    _, var = compiled_moments(model, post, x, "diag")
    torch.testing.assert_close(torch.diagonal(cov, dim1=-2, dim2=-1), var, rtol=1e-5, atol=1e-10)
    assert_symmetric_psd(cov)


class Attention(nn.Module):
    """``P @ V`` over tokens: V (batch, T, C) random with a covariance over C per token; P (batch, T, T) either
    deterministic (softmax of input scores: the paper's attention, only V random) or random and independent."""

    def __init__(self, random_weights: bool):
        super().__init__()
        self.random_weights = random_weights
        self.values = Source(5, 6, seed=71)
        self.scores = Source(5, 4, seed=72)  # T = 4 tokens

    def forward(self, x):
        if self.random_weights:
            p = self.scores(x)
        else:
            p = torch.softmax(x @ x.transpose(1, 2), dim=-1)
        return p @ self.values(x)


@pytest.mark.parametrize("covariance", MODES)
@pytest.mark.parametrize("random_weights", [False, True])
def test_attention_values(random_weights, covariance):
    """out_t = sum_s P_ts V_s, value tokens independent of each other and of P.  Written out:
    Cov(out_t)_jl = sum_ss' Cov(P)_t,ss' M_sj M_s'l + sum_s E[P_ts^2] Cov(V_s)_jl
    (deterministic P: sum_s P_ts^2 Cov(V_s), the paper's rule).  diag: the diagonal of the same terms, with
    Cov(P) and Cov(V_s) replaced by their diagonal-mode variances."""
    model = Attention(random_weights).eval()
    post = source_posterior(model, scale=1e-2, seed=6)
    x = _x(3, 4, 5, seed=12)
    full = covariance == "full"
    mean, var = compiled_moments(model, post, x, covariance)

    v = model.values.reference(x, post, "values.", full)
    if random_weights:
        p = model.scores.reference(x, post, "scores.", full)
    else:
        p = Gaussian.constant(torch.softmax(x @ x.transpose(1, 2), dim=-1), full)
    p_second = p.mean**2 + p.variance()  # E[P_ts^2]
    if full:
        cov = torch.einsum("btsu,bsj,bul->btjl", p.var, v.mean, v.mean)
        cov = cov + torch.einsum("bts,bsjl->btjl", p_second, v.var)
    else:
        cov = torch.einsum("bts,bsj->btj", p.var, v.mean**2) + torch.einsum("bts,bsj->btj", p_second, v.var)
    ref = Gaussian(p.mean @ v.mean, cov, full)
    assert_moments_close(mean, var, ref)
    torch.testing.assert_close(mean, model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("covariance", MODES)
def test_kronecker_weight_on_a_correlated_input_uses_the_input_covariance(covariance):
    """``E_a[Cov(W a | a)] = sum_ij C[k, i, l, j] (m_i m_j + Sigma_ij)`` with ``C`` the dense Kronecker covariance
    written out: exact in full mode (the input covariance formed there enters through ``diag(Q_in^T Sigma Q_in)``);
    diag mode has only the input variances and drops the off-diagonal ``Sigma_ij`` (the paper's diagonal rule)."""
    import momentprop as mp

    model = nn.Sequential(Source(4, 6, gain=2.0, seed=3), nn.Linear(6, 5)).eval()
    post = source_posterior(model, scale=1e-1)
    g = torch.Generator().manual_seed(1)
    q_out = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0]
    q_in = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]
    d = torch.rand(5, 6, generator=g, dtype=torch.float64) * 1e-2
    post["1.weight"] = mp.Kron(q_out.float(), q_in.float(), d.float())
    x = _x(3, 4)
    mean, var = compiled_moments(model, post, x, covariance, predictive="suq")
    a = model[0].reference(x, post, "0.", True)  # exactly Gaussian: a linear map of a random layer's output
    dense = (torch.kron(q_out, q_in) @ torch.diag(d.reshape(-1)) @ torch.kron(q_out, q_in).T).reshape(5, 6, 5, 6)
    weight = model[1].weight.detach().double()
    sigma = a.var if covariance == "full" else torch.diag_embed(torch.diagonal(a.var, dim1=-2, dim2=-1))
    second = a.mean.unsqueeze(-1) * a.mean.unsqueeze(-2) + sigma
    expected = weight @ sigma @ weight.T + torch.einsum("kilj,bij->bkl", dense, second)
    if covariance == "diag":
        expected = torch.diagonal(expected, dim1=-2, dim2=-1)
    torch.testing.assert_close(var.double(), expected, rtol=1e-4, atol=1e-7)
