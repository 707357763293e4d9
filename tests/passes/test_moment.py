"""The moment value itself: a matrix tangent kept as factors equals the product of those factors, whichever end
it is formed from, and materialising it gives ``J Sigma J^T``.  Oracle: the factors multiplied out explicitly."""

from __future__ import annotations

import pytest
import torch

from momentprop.passes.moment import MatrixTangent, Moment, chain, matrix_jacobian

torch.manual_seed(0)


def explicit(matrices, diagonals) -> torch.Tensor:
    """diag(d_k) F_k ... F_1 diag(d_0), written out with diag_embed."""
    def d(v, n):
        return torch.eye(n) if v is None else torch.diag_embed(v)

    j = d(diagonals[0], matrices[0].shape[-1])
    for m, v in zip(matrices, diagonals[1:]):
        j = d(v, m.shape[-2]) @ m @ j
    return j


@pytest.mark.parametrize("sizes", [(3, 7, 5, 2), (6, 4, 5, 9)], ids=["small-output", "small-root"])
def test_dense_equals_the_explicit_product_from_either_end(sizes):
    points = 4
    root, *widths = sizes
    matrices, diagonals, n = [], [torch.rand(points, root)], root
    for i, w in enumerate(widths):
        # shared and per-point matrices alternate; every other diagonal is absent
        matrices.append(torch.randn(w, n) if i % 2 == 0 else torch.randn(points, w, n))
        diagonals.append(torch.rand(points, w) if i % 2 == 1 else None)
        n = w
    tangent = MatrixTangent(tuple(matrices), tuple(diagonals))
    torch.testing.assert_close(tangent.dense(), explicit(matrices, diagonals))


def test_materialised_matrix_tangent_is_j_sigma_jt_with_the_innermost_diagonal_folded():
    points, root, hidden, out = 5, 6, 4, 3
    x = Moment(torch.randn(points, root), torch.rand(points, root), False, torch.rand(points, root))
    w1, w2 = torch.randn(hidden, root), torch.randn(out, hidden)
    slope = torch.rand(points, hidden)
    m = Moment(torch.zeros(points, hidden), x.var, False, matrix_jacobian(x, w1))
    m = Moment(torch.zeros(points, hidden), m.var, False, chain(slope, m.tangent))
    m = Moment(torch.zeros(points, out), m.var, False, matrix_jacobian(m, w2))
    j = w2 @ torch.diag_embed(slope) @ w1 @ torch.diag_embed(x.tangent)
    expected = j @ torch.diag_embed(x.var) @ j.mT
    got = m.materialised()
    assert got.full
    torch.testing.assert_close(got.var, expected)
    torch.testing.assert_close(m.variance(), torch.diagonal(expected, dim1=-2, dim2=-1))
