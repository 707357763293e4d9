"""The random value itself (mean plus maps of named noises): a matrix map kept as factors equals the product of
those factors, whichever end it is formed from; forming the covariance gives ``J Sigma J^T``; copies and round-trip
moves keep the noise's identity; two uses of one weight are correlated.  Oracles: the factors multiplied out
explicitly, and the covariance of explicit linear maps of the noise."""

from __future__ import annotations

import pytest
import torch

from momentprop.passes.moment import (
    MatrixTangent, Moment, Noise, Term, WeightUse, combine, permute_move, reshape_move, slice_move,
)


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


def test_covariance_of_a_factored_map_is_j_sigma_jt_with_the_innermost_diagonal_folded():
    g = torch.Generator().manual_seed(0)
    points, root, hidden, out = 5, 6, 4, 3
    v, d0 = torch.rand(points, root, generator=g), torch.rand(points, root, generator=g)
    x = Moment.of_noise(torch.randn(points, root, generator=g), Noise(v)).scaled(torch.zeros(points, root), d0)
    w1, w2 = torch.randn(hidden, root, generator=g), torch.randn(out, hidden, generator=g)
    slope = torch.rand(points, hidden, generator=g)
    m = x.left_multiplied(torch.zeros(points, hidden), w1).scaled(torch.zeros(points, hidden), slope)
    m = m.left_multiplied(torch.zeros(points, out), w2)
    j = w2 @ torch.diag_embed(slope) @ w1 @ torch.diag_embed(d0)
    expected = j @ torch.diag_embed(v) @ j.mT
    torch.testing.assert_close(m.covariance(), expected)
    torch.testing.assert_close(m.variance(), torch.diagonal(expected, dim1=-2, dim2=-1))


def test_a_value_times_its_round_trip_moved_copy_is_fully_correlated():
    """``h.t().t() * h`` and ``h.view(...).view(...) * h``: the moves compose to nothing, so the maps add:
    ``Var(h^2) = (2 m)^2 v``, not the ``2 m^2 v`` of independent operands."""
    g = torch.Generator().manual_seed(1)
    mean, v = torch.randn(4, 3, generator=g), torch.rand(4, 3, generator=g)
    h = Moment.of_noise(mean, Noise(v))
    there = h.moved(mean.t(), permute_move([1, 0]))
    back = there.moved(mean, permute_move([1, 0]))
    flat = h.moved(mean.reshape(12), reshape_move((4, 3), (12,))).moved(mean, reshape_move((12,), (4, 3)))
    for copy in (back, flat):
        product = combine(mean * mean, [(mean, h), (mean, copy)])
        assert len(product.terms) == 1
        torch.testing.assert_close(product.variance(), 4 * mean * mean * v)


def test_two_pieces_of_one_noise_meet_only_where_they_pick_the_same_entries():
    """``x[:, :2] + x[:, 1:]``: entry 1 of x appears in both pieces' second and first columns respectively."""
    g = torch.Generator().manual_seed(2)
    mean, v = torch.randn(2, 3, generator=g), torch.rand(2, 3, generator=g)
    x = Moment.of_noise(mean, Noise(v))
    left = x.moved(mean[:, :2], slice_move(2, 1, 0, 2, 1, 3))
    right = x.moved(mean[:, 1:], slice_move(2, 1, 1, 3, 1, 3))
    total = combine(mean[:, :2] + mean[:, 1:], [(1.0, left), (1.0, right)])
    a = torch.tensor([[1.0, 0, 0], [0, 1, 0]]) + torch.tensor([[0, 1.0, 0], [0, 0, 1]])  # total = a @ x_row
    expected = a @ torch.diag_embed(v) @ a.T
    torch.testing.assert_close(total.covariance(), expected)


def test_two_uses_of_one_weight_are_correlated():
    """``u = a dW`` and ``u' = b dW`` for one weight noise dW (k, m): ``Cov(u_m, u'_m) = sum_k a_k b_k S_km``."""
    g = torch.Generator().manual_seed(3)
    k, m, rows = 4, 3, 5
    s = torch.rand(k, m, generator=g)
    weight = Noise(s)
    a, b = torch.randn(rows, k, generator=g), torch.randn(rows, k, generator=g)
    ua = Moment(torch.zeros(rows, m), (Term(WeightUse(weight, a, s, ())),))
    ub = Moment(torch.zeros(rows, m), (Term(WeightUse(weight, b, s, ())),))
    total = combine(torch.zeros(rows, m), [(1.0, ua), (1.0, ub)])
    expected = ((a + b) ** 2) @ s  # (a + b) dW: one weight, one map
    torch.testing.assert_close(total.variance(), expected)
