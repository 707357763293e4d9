"""passes/attention.py and the transformer pieces of normalisation/data movement: softmax, scaled dot-product
attention (the paper's rule and the linearised one), layer_norm, embedding.  Oracles: the equations written out
here, autograd Jacobians, and Monte Carlo over the weight posterior."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import momentprop as mp
from oracles import TokenEmbedding, monte_carlo, random_posterior


class SelfAttention(nn.Module):
    """One multi-head self-attention layer with separate q, k, v projections and an output projection."""

    def __init__(self, dim=8, heads=2, sdpa=True, causal=False, seed=0, project=True):
        super().__init__()
        torch.manual_seed(seed)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.heads, self.sdpa, self.causal, self.project = heads, sdpa, causal, project

    def split(self, x):
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x, mask=None):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = torch.softmax(scores, -1) @ v
        b, h, t, dh = out.shape
        out = out.transpose(1, 2).reshape(b, t, h * dh)
        return self.o(out) if self.project else out


def paper_reference(model: SelfAttention, post, x, mask=None):
    """Values and output projection random, attention weights from the means.  The attended values
    ``o = A (x W_v^T + b_v)`` are linear in (W_v, b_v), ONE sample of which serves every token, so their
    variance is ``sum_p J_p^2 S_p`` with the Jacobian J from autograd (the paper's ``sum_s A_ts^2 Var v_s`` drops the
    cross-token covariance); then the linear rule of the output projection (per token, exact)."""
    with torch.no_grad():
        q, k = model.split(model.q(x)), model.split(model.k(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        if model.causal:
            t = x.shape[1]
            scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        a = torch.nan_to_num(torch.softmax(scores, -1))

    def attended(weight, bias):
        return (a @ model.split(F.linear(x, weight, bias))).transpose(1, 2).flatten(2)

    params = (model.v.weight.detach(), model.v.bias.detach())
    o_mean = attended(*params)
    jac_w, jac_b = torch.autograd.functional.jacobian(attended, params)
    o_var = (jac_w**2 * post["v.weight"]).flatten(-2).sum(-1) + (jac_b**2 * post["v.bias"]).sum(-1)
    w = model.o.weight.detach()
    s_w = post.get("o.weight", torch.zeros_like(w))
    s_b = post.get("o.bias", torch.zeros_like(model.o.bias))
    return (o_mean**2) @ s_w.T + o_var @ (w**2 + s_w).T + s_b


@pytest.mark.parametrize("sdpa, causal", [(True, False), (True, True), (False, False)])
def test_paper_rule_values_random(sdpa, causal):
    model = SelfAttention(sdpa=sdpa, causal=causal).eval()
    post = random_posterior(model, 1e-3, names={"v.weight", "v.bias", "o.weight", "o.bias"})
    x = torch.randn(3, 5, 8)
    mean, var = mp.compile(model, post, (x,))(x)
    torch.testing.assert_close(mean, model(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, paper_reference(model, post, x), rtol=1e-4, atol=1e-9)


def test_padding_mask_gives_zero_variance_never_nan():
    model = SelfAttention(sdpa=True).eval()
    post = random_posterior(model, 1e-3, names={"v.weight", "v.bias"})
    x = torch.randn(2, 4, 8)
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    mask[:, :, :, 2:] = False  # keys 2 and 3 are padding
    cm = mp.compile(model, post, (x, mask))
    mean, var = cm(x, mask)
    assert torch.isfinite(var).all()
    torch.testing.assert_close(var, paper_reference(model, post, x, mask), rtol=1e-4, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_value_posterior_within_fifteen_percent_of_monte_carlo(covariance):
    """Values and output projection random: the row-shared value noise keeps the cross-token covariance that
    one W_v sample creates (the paper's equation alone is up to T times too small)."""
    model = SelfAttention(sdpa=True, seed=3).eval()
    post = random_posterior(model, 1e-4, names={"v.weight", "v.bias", "o.weight", "o.bias"})
    x = torch.randn(2, 5, 8)
    _, mc_var, _ = monte_carlo(model, post, x, 20_000)
    var = mp.compile(model, post, (x,), covariance=covariance)(x)[1]
    var = torch.diagonal(var, dim1=-2, dim2=-1) if covariance == "full" else var
    assert ((var.double() - mc_var).abs() / mc_var).max() < 0.15


def test_linearised_attention_propagates_query_and_key_uncertainty():
    """Only the query projection random, one head, no output projection: the paper's rule gives zero variance;
    the linearised rule in full mode gives, per token, the linearisation J diag(S) J^T over the query weights,
    with J from autograd (exact per token: the entries of q_t are independent, the keys deterministic)."""
    model = SelfAttention(sdpa=True, seed=4, heads=1, project=False).eval()
    post = random_posterior(model, 1e-4, names={"q.weight"})
    x = torch.randn(2, 5, 8)
    paper = mp.compile(model, post, (x,))(x)[1]
    assert torch.count_nonzero(paper) == 0
    cov = mp.compile(model, post, (x,), covariance="full", attention="linearised")(x)[1]
    diag = mp.compile(model, post, (x,), attention="linearised")(x)[1]
    weight = model.q.weight.detach()

    def output(w):
        return torch.func.functional_call(model, {"q.weight": w}, (x,))

    jac = torch.autograd.functional.jacobian(output, weight).flatten(-2)  # (2, 5, 8, out * in)
    expected = torch.einsum("btip,p,btjp->btij", jac, post["q.weight"].flatten(), jac)
    torch.testing.assert_close(cov, expected, rtol=1e-3, atol=1e-10)
    assert (diag > 0).all() and torch.isfinite(diag).all()  # diag mode drops the score correlations


@pytest.mark.parametrize("attention", ["paper", "linearised"])
@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_softmax_linearised(covariance, attention):
    """A classifier's softmax is linearised under either attention rule (only attention weights are taken at
    the mean by the paper's rule)."""
    class Softmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            return torch.softmax(self.fc(x), -1)

    model = Softmax()
    post = random_posterior(model, 1e-3)
    x = torch.randn(3, 4)
    _, var = mp.compile(model, post, (x,), covariance=covariance, attention=attention)(x)
    h_var = (x**2) @ post["fc.weight"].T + post["fc.bias"]
    p = torch.softmax(model.fc(x), -1).detach()
    jac = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    cov = jac @ torch.diag_embed(h_var) @ jac.mT
    expected = cov if covariance == "full" else (jac**2 * h_var.unsqueeze(-2)).sum(-1)
    torch.testing.assert_close(var, expected, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_layer_norm_linearised_with_its_statistics(covariance):
    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.norm = nn.LayerNorm(6, eps=1e-3)
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 1.5)

        def forward(self, x):
            return self.norm(self.fc(x))

    model = Norm()
    post = random_posterior(model, 1e-3, names={"fc.weight", "fc.bias", "norm.bias"})
    x = torch.randn(3, 4)
    mean, var = mp.compile(model, post, (x,), covariance=covariance)(x)
    h = model.fc(x).detach()
    jac = torch.func.vmap(torch.func.jacrev(model.norm))(h).detach()  # LayerNorm's Jacobian, statistics included
    h_var = (x**2) @ post["fc.weight"].T + post["fc.bias"]
    expected = jac @ torch.diag_embed(h_var) @ jac.mT + torch.diag_embed(post["norm.bias"].expand(3, 6))
    torch.testing.assert_close(mean, model(x))
    expected = expected if covariance == "full" else torch.diagonal(expected, dim1=-2, dim2=-1)
    torch.testing.assert_close(var, expected, rtol=1e-4, atol=1e-10)


def test_embedding_variance_is_looked_up():
    model = TokenEmbedding()
    post = random_posterior(model, 1e-2)
    ids = torch.randint(0, 10, (3, 5))
    mean, var = mp.compile(model, post, (ids,))(ids)
    torch.testing.assert_close(mean, model(ids))
    torch.testing.assert_close(var, post["table.weight"][ids])
