"""passes/data_movement.py: views, permutations, indexing, concatenation, copies, dropout.

These ops move elements, so the oracle is an index map: the same op applied to a tensor of element indices says
where every output element comes from.  With the joint covariance of the inputs that the moment representation
stands for (rows independent, each row's covariance over the last dim as propagated; independent operands
independent; deterministic operands zero), the moved covariance is that joint covariance read at the indices:

* diag: the variance follows the mean exactly;
* full, last dim untouched (or sliced / concatenated along it): the whole covariance is exact (block diagonal for
  a concatenation of independent parts, all-equal entries for an expanded size-1 last dim);
* full, an op that builds a new last dim from other dims: only the variances are claimed, so only the diagonal
  is compared (and the matrix must stay symmetric PSD).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oracles import Source, assert_symmetric_psd, compiled_moments, source_posterior

MODES = ["diag", "full"]
B, R, C = 3, 4, 6  # batch, rows, features (the covariance dim)

# name: (fn(a, b, d) with a, b independent random (B, R, C) tensors and d deterministic, whole covariance exact?)
OPS = {
    "reshape_keep_last": (lambda a, b, d: a.reshape(a.shape[0], 2, 2, C), True),
    "view_flatten": (lambda a, b, d: a.view(a.shape[0], R * C), False),
    "flatten_leading": (lambda a, b, d: a.flatten(0, 1), True),
    "permute_keep_last": (lambda a, b, d: a.permute(1, 0, 2), True),
    "permute_move_last": (lambda a, b, d: a.permute(0, 2, 1), False),
    "transpose_keep_last": (lambda a, b, d: a.unsqueeze(1).transpose(1, 2), True),
    "transpose_move_last": (lambda a, b, d: a.transpose(1, 2).contiguous(), False),
    "t_2d": (lambda a, b, d: a[:, 0].t(), False),
    "unsqueeze_squeeze": (lambda a, b, d: a.unsqueeze(2).squeeze(2), True),
    "unsqueeze_last": (lambda a, b, d: a.unsqueeze(-1), True),  # size-1 last dim: its covariance is the variance
    "squeeze_last": (lambda a, b, d: a[..., 2:3].squeeze(-1), False),
    "select_row": (lambda a, b, d: a[:, 2], True),
    "select_feature": (lambda a, b, d: a[..., 3], False),
    "slice_rows": (lambda a, b, d: a[:, 1:3], True),
    "slice_features_step": (lambda a, b, d: a[..., 1::2], True),
    # parts of ONE tensor concatenated: cat takes its parts as independent, so in full mode only the
    # diagonal is exact (the cross-covariance between the parts is dropped; documented in data_movement.py)
    "chunk_features": (lambda a, b, d: torch.cat(a.split([2, 4], dim=-1)[::-1], dim=-1), False),
    "expand_rows": (lambda a, b, d: a[:, :1].expand(-1, 3, -1), True),
    "expand_feature": (lambda a, b, d: a[..., :1].expand(-1, -1, 5), True),  # perfectly correlated copies
    "clone": (lambda a, b, d: a.clone(), True),
    "dropout_eval": (lambda a, b, d: F.dropout(a, 0.3, training=False), True),
    "cat_features": (lambda a, b, d: torch.cat([a, b[..., :3]], dim=-1), True),
    "cat_features_with_deterministic": (lambda a, b, d: torch.cat([d[..., :2], a, d], dim=-1), True),
    "cat_rows": (lambda a, b, d: torch.cat([a, b, d], dim=1), True),
    "stack": (lambda a, b, d: torch.stack([a, b], dim=1), True),
}


class Move(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.src_a = Source(5, C, seed=61)
        self.src_b = Source(5, C, seed=62)
        self.det = nn.Linear(5, C)
        self.dropout = nn.Dropout(0.5)  # eval: identity

    def forward(self, x):
        return self.fn(self.dropout(self.src_a(x)), self.src_b(x), self.det(x))


def _joint(blocks: list[torch.Tensor], full: bool) -> torch.Tensor:
    """The joint (co)variance of the flattened operands plus one final zero-variance slot (deterministic values).
    ``blocks``: per operand, its variance (diag) or per-row covariance (full)."""
    if not full:
        return torch.cat([b.flatten() for b in blocks] + [torch.zeros(1, dtype=torch.float64)])
    rows = [r for b in blocks for r in b.reshape(-1, C, C)]
    return torch.block_diag(*rows, torch.zeros(1, 1, dtype=torch.float64))


@pytest.mark.parametrize("covariance", [pytest.param("diag", marks=pytest.mark.slow), "full"])  # fast loop: full
@pytest.mark.parametrize("name", list(OPS))
def test_variance_follows_the_mean(name, covariance):
    fn, exact = OPS[name]
    torch.manual_seed(63)
    model = Move(fn).eval()
    post = source_posterior(model, scale=1e-2, seed=11)
    x = torch.randn(B, R, 5, generator=torch.Generator().manual_seed(5))
    full = covariance == "full"
    mean, var = compiled_moments(model, post, x, covariance)
    torch.testing.assert_close(mean, model(x), rtol=0, atol=0)

    ga = model.src_a.reference(x, post, "src_a.", full)
    gb = model.src_b.reference(x, post, "src_b.", full)
    n = ga.mean.numel()
    index_a = torch.arange(n, dtype=torch.float64).reshape(ga.mean.shape)
    index = fn(index_a, index_a + n, torch.full_like(index_a, 2 * n))  # 2n: the zero-variance slot
    joint = _joint([ga.var, gb.var], full)
    idx = index.long()
    atol = 1e-5 * joint.abs().max().item()  # float32 rounding on entries that are ~0
    if not full:
        torch.testing.assert_close(var.double(), joint[idx], rtol=1e-5, atol=atol)
        return
    expected = joint[idx.unsqueeze(-1), idx.unsqueeze(-2)]
    assert var.shape == expected.shape
    assert_symmetric_psd(var)
    diagonal = lambda t: torch.diagonal(t, dim1=-2, dim2=-1)  # noqa: E731
    torch.testing.assert_close(diagonal(var).double(), diagonal(expected), rtol=1e-5, atol=atol)
    if exact:
        torch.testing.assert_close(var.double(), expected, rtol=1e-5, atol=atol)


def test_dropout_module_is_identity():
    """nn.Dropout in a model (compiled in eval mode) changes neither mean nor variance, in either mode."""
    with_dropout = nn.Sequential(Source(5, C, seed=64), nn.Dropout(0.5), nn.Linear(C, 3)).eval()
    without = nn.Sequential(with_dropout[0], nn.Identity(), with_dropout[2]).eval()
    post = source_posterior(with_dropout, scale=1e-2, seed=12)
    x = torch.randn(B, 5, generator=torch.Generator().manual_seed(6))
    for covariance in MODES:
        got = compiled_moments(with_dropout, post, x, covariance)
        expected = compiled_moments(without, post, x, covariance)
        assert got[1].abs().max() > 0
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
