"""The value every rule works on: a Gaussian tensor carried as a mean and a (co)variance.

Two covariance kinds exist side by side:

* ``full=False`` (diag): ``var`` is the elementwise variance, broadcastable to ``mean``;
* ``full=True``: ``var`` is the covariance over the last (feature) dimension, shape ``mean.shape + (C,)``.

A moment may also carry a pending elementwise Jacobian, ``tangent``: the tensor is then
``mean + tangent * eps`` with ``eps`` the zero-mean Gaussian whose (co)variance is ``var`` (its *root*).
Elementwise rules extend the tangent by the chain rule instead of materialising a variance after every
op, so a composite activation such as ``x * sigmoid(x)`` or GPT-2's tanh-GELU is linearised as ONE function
(pushing variance through each of its ops with independence assumptions is about 10x off).  Two operands
with the same root are recognised by the identity of their ``var`` tensor.

In full mode the tangent may also be a matrix, :class:`MatrixTangent` ``J (..., C, R)``: the tensor is
``mean + J eps`` with ``eps`` a root of ``R`` features per row.  Products with deterministic weights, LayerNorm
and row reshapes extend it (``J <- W J``) instead of forming ``W Sigma W^T``, so a residual block
``h + f(h)`` keeps the covariance between its two branches: ``(I + J_f) Sigma (I + J_f)^T``, where independent
branches would give ``Sigma + J_f Sigma J_f^T``.  The root's variance keeps its own row layout; it is reshaped to
the tangent's rows when the moment is materialised.

A full-mode moment may also be a sum of independent noises, ``parts``, each a root with its own tangent: a
random linear layer passes its input's noises through the mean weights (``J <- M^T J``, each on its root) and
adds its weight noise as one more part, instead of forming ``M^T Sigma M + diag(...)``.  Values of one root
are combined by the chain rule part by part, so the branches of a residual block stay correlated even through
random weights, and with ``predictive="glm"`` the output is the GLM predictive's ``sum_l J_l S_l J_l^T`` without
a (points x width x width) covariance after every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

if TYPE_CHECKING:
    from .shared_weight import SharedNoise



@dataclass(frozen=True, eq=False)
class MatrixTangent:
    """A Jacobian kept as its factors, ``J = diag(d_k) F_k diag(d_(k-1)) ... F_1 diag(d_0)``: ``matrices`` are
    ``F_1 .. F_k`` (innermost first, each ``(..., C_i, C_(i-1))``, leading dims absent for one matrix shared by
    every row) and ``diagonals`` are ``d_0 .. d_k`` (elementwise derivatives, None for 1).

    Layers only append factors; the product is formed once, when the moment is materialised or combined, and
    from its smaller end: a network's output ``W_3 diag(r_2) W_2 diag(r_1)`` on a hidden root becomes
    ``(points, outputs, width)`` products instead of a ``(points, width, width)`` Jacobian per layer.  A diagonal
    ``d_0`` next to a diagonal root is folded into the root's variance and never multiplied into a matrix."""

    matrices: tuple[Tensor, ...]
    diagonals: tuple[Tensor | None, ...]

    @staticmethod
    def of(j: Tensor, cols: Tensor | None = None) -> "MatrixTangent":
        """``j diag(cols)``."""
        return MatrixTangent((j,), (cols, None))

    @property
    def root_size(self) -> int:
        return self.matrices[0].shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.matrices[0].dtype

    @property
    def is_shared_matrix(self) -> bool:
        """One matrix for every row and nothing pending."""
        return len(self.matrices) == 1 and self.matrices[0].dim() == 2 and all(d is None for d in self.diagonals)

    def then(self, left: Tensor) -> "MatrixTangent":
        """``left @ J``."""
        return MatrixTangent(self.matrices + (left,), self.diagonals + (None,))

    def scaled(self, derivative: Tensor | float) -> "MatrixTangent":
        """``diag(derivative) J``."""
        *inner, rows = self.diagonals
        if not isinstance(derivative, Tensor):
            if rows is None:
                return MatrixTangent(self.matrices[:-1] + (derivative * self.matrices[-1],), self.diagonals)
            return MatrixTangent(self.matrices, (*inner, derivative * rows))
        derivative = derivative.to(self.dtype)
        return MatrixTangent(self.matrices, (*inner, derivative if rows is None else derivative * rows))

    def without_cols(self) -> tuple["MatrixTangent", Tensor | None]:
        """``(J diag(d_0)^-1, d_0)``: the product without its innermost diagonal, and that diagonal."""
        cols = self.diagonals[0]
        return (self if cols is None else MatrixTangent(self.matrices, (None, *self.diagonals[1:]))), cols

    def dense(self) -> Tensor:
        """The product, formed from the output end when it is the smaller one (else from the root end)."""
        matrices, diagonals = self.matrices, self.diagonals
        if len(matrices) > 1 and matrices[-1].shape[-2] < matrices[0].shape[-1]:
            j = matrices[-1]
            for d, m in zip(reversed(diagonals[1:-1]), reversed(matrices[:-1])):
                j = (j if d is None else j * d.unsqueeze(-2)) @ m
            if diagonals[0] is not None:
                j = j * diagonals[0].unsqueeze(-2)
        else:
            j = matrices[0] if diagonals[0] is None else matrices[0] * diagonals[0].unsqueeze(-2)
            for d, m in zip(diagonals[1:-1], matrices[1:]):
                j = m @ (j if d is None else d.unsqueeze(-1) * j)
        return j if diagonals[-1] is None else diagonals[-1].unsqueeze(-1) * j


Tangent = Union[Tensor, float, MatrixTangent, None]


@dataclass(frozen=True, eq=False)
class Moment:
    mean: Tensor
    var: Tensor
    full: bool = False
    tangent: Tangent = None
    shared: "SharedNoise | None" = None  # a projection's row-shared weight noise (shared_weight.py), diag only
    parts: tuple["Moment", ...] = ()  # further independent noises, each a root with its own tangent (full mode)

    @property
    def feature_size(self) -> int:
        return self.mean.shape[-1] if self.mean.dim() else 1

    def materialised(self) -> "Moment":
        """The same Gaussian with the tangent folded into ``var`` and ``var`` shaped like ``mean``."""
        if self.parts:
            return _sum_parts(self)
        if self.tangent is None and self.var_has_mean_shape():
            return self
        jac = 1.0 if self.tangent is None else self.tangent
        if isinstance(jac, MatrixTangent):
            return self._materialised_matrix(jac)
        var = self._root_in_rows()
        if not self.full:
            return Moment(self.mean, broadcast_to(_squared(jac) * var, self.mean.shape), False)
        if isinstance(jac, Tensor):  # J Sigma J as two broadcast products: no (C, C) mask is formed
            cov = (jac.unsqueeze(-1) * var) * jac.unsqueeze(-2)
        else:
            cov = (jac * jac) * var
        size = self.feature_size
        return Moment(self.mean, broadcast_to(cov, (*self.mean.shape, size)), True)

    def _materialised_matrix(self, tangent: MatrixTangent) -> "Moment":
        rows, size = self.mean.shape[:-1], tangent.root_size
        if self.full:
            j = tangent.dense()
            cov = j @ self.var.reshape(*rows, size, size) @ j.mT
        else:
            j, root = self._folded_root(tangent)
            cov = (j * root.unsqueeze(-2)) @ j.mT
        return Moment(self.mean, broadcast_to(cov, (*self.mean.shape, self.feature_size)), True)

    def _folded_root(self, tangent: MatrixTangent) -> tuple[Tensor, Tensor]:
        """``(J', v')`` with ``J diag(v) J^T = J' diag(v') J'^T``: the tangent's innermost diagonal moved into the
        (diagonal) root's variance, laid out per row."""
        tangent, cols = tangent.without_cols()
        root = self.var.reshape(*self.mean.shape[:-1], tangent.root_size)
        return tangent.dense(), root if cols is None else root * (cols * cols)

    def _root_in_rows(self) -> Tensor:
        """The root's variance in the mean's row layout (a reshape moved the rows of the mean and the tangent but
        kept the root, so that other uses of it still recognise it)."""
        extra = 2 if self.full else 1
        rows_var, rows_mean = self.var.shape[: self.var.dim() - extra], self.mean.shape[:-1]
        if self.var.dim() <= extra or same_shape(rows_var, rows_mean):
            return self.var
        if statically_known_true(math.prod(rows_var) == math.prod(rows_mean)):
            return self.var.reshape(*rows_mean, *self.var.shape[-extra:])
        return self.var  # a root broadcast over rows

    @property
    def tracked(self) -> bool:
        """Carries noises by their roots (parts or a matrix tangent): combine it by root, never by materialising."""
        return bool(self.parts) or isinstance(self.tangent, MatrixTangent)

    def without_parts(self) -> "Moment":
        return Moment(self.mean, self.var, self.full, self.tangent) if self.parts else self

    def all_parts(self) -> tuple["Moment", ...]:
        """This moment as a sum of independent noises, each with its own root."""
        return (self.without_parts(),) + self.parts

    def plus_parts(self, *parts: "Moment") -> "Moment":
        """This moment plus further independent noises."""
        return sum_of_parts(self.all_parts() + parts)

    def left_multiplied(self, mean: Tensor, left: Tensor) -> "Moment":
        """``left @ x`` for a deterministic ``left`` (..., C_out, C): every noise's tangent ``J <- left J``."""
        return sum_of_parts([Moment(mean, p.var, p.full, matrix_jacobian(p, left)) for p in map(Moment.rooted_per_row, self.all_parts())])

    def chained(self, mean: Tensor, derivative: Tensor | float) -> "Moment":
        """``f(x)`` for an elementwise ``f`` with derivative ``derivative``: every noise's tangent scaled."""
        parts = tuple(p.chained(mean, derivative) for p in self.parts)
        return Moment(mean, self.var, self.full, chain(derivative, jacobian(self)), parts=parts)

    def with_mean(self, mean: Tensor) -> "Moment":
        return Moment(mean, self.var, self.full, self.tangent, parts=tuple(p.with_mean(mean) for p in self.parts))

    def variance(self) -> Tensor:
        """Elementwise variance, shaped like ``mean``."""
        if self.parts:
            total = self.without_parts().variance()
            for p in self.parts:
                total = total + p.variance()
            return total
        if isinstance(self.tangent, MatrixTangent) and not self.full:  # diag(J diag(v) J^T) = (J * J) v
            return broadcast_to(self._matrix_tangent_variance(self.tangent), self.mean.shape)
        m = self.materialised()
        return torch.diagonal(m.var, dim1=-2, dim2=-1) if m.full else m.var

    def _matrix_tangent_variance(self, tangent: MatrixTangent) -> Tensor:
        if len(tangent.matrices) > 1:
            j, root = self._folded_root(tangent)
            return ((j * j) @ root.unsqueeze(-1)).squeeze(-1)
        # J = diag(r) M diag(c): (J * J) v = r^2 (M * M) (c^2 v), without a per-row matrix when M is shared
        (m,), (cols, rows) = tangent.matrices, tangent.diagonals
        v = self.var.reshape(*self.mean.shape[:-1], tangent.root_size)
        v = v if cols is None else v * (cols * cols)
        out = v @ (m * m).mT if m.dim() == 2 else ((m * m) @ v.unsqueeze(-1)).squeeze(-1)
        return out if rows is None else out * (rows * rows)

    def as_full(self) -> "Moment":
        """Covariance over the last dimension; a diagonal moment becomes a diagonal matrix."""
        m = self.materialised()
        return m if m.full else Moment(m.mean, diagonal_matrix(m.var), True)

    def rooted_per_row(self) -> "Moment":
        """This moment (one part) with a root laid out per row (a root shared by every row, such as a bias, is
        expanded): what a matrix tangent needs."""
        if isinstance(self.tangent, MatrixTangent) or self.var_has_mean_shape():
            return self
        var = self._root_in_rows()
        if var is not self.var and self.tangent is None:
            return self  # rows regrouped since: the root stays, the tangent will be laid out per row
        return self.materialised()

    def var_has_mean_shape(self) -> bool:
        expected = (*self.mean.shape, self.feature_size) if self.full else tuple(self.mean.shape)
        return same_shape(self.var.shape, expected)


def _sum_parts(m: Moment) -> Moment:
    parts = promote(*m.all_parts())
    total = parts[0].var
    for p in parts[1:]:
        total = total + p.var
    return Moment(m.mean, total, parts[0].full)


def merge_parts(mean: Tensor, terms: list[tuple[Tensor | float, Moment]]) -> Moment:
    """``sum_i d_i * x_i`` for moments made of independent parts: parts of one root are combined by the chain rule,
    the others stay separate (independent) parts."""
    merged: list[tuple[Moment, Tangent]] = []
    for derivative, moment in terms:
        for part in moment.all_parts():
            tangent = chain(derivative, jacobian(part))
            for i, (root, existing) in enumerate(merged):
                if same_root(root, part):
                    merged[i] = (root, add_tangents(_numeric(existing, mean), _numeric(tangent, mean)))
                    break
            else:
                merged.append((part, tangent))
    return sum_of_parts([Moment(mean, root.var, root.full, tangent) for root, tangent in merged])


def sum_of_parts(parts) -> Moment:
    """One moment made of independent noises (the first part carries the others)."""
    first, *rest = parts
    return Moment(first.mean, first.var, first.full, first.tangent, parts=tuple(rest))


def _numeric(jac, like: Tensor):
    """Boolean (0/1 mask) Jacobians as numbers, so that adding two of them sums instead of or-ing."""
    return jac.to(like.dtype) if isinstance(jac, Tensor) and jac.dtype == torch.bool else jac


def _squared(jac: Tensor | float) -> Tensor | float:
    """``jac^2``; a boolean Jacobian (a 0/1 mask such as relu's) is its own square."""
    if isinstance(jac, Tensor) and jac.dtype == torch.bool:
        return jac
    return jac * jac


def same_shape(a, b) -> bool:
    """Shape equality that never adds a guard on a symbolic (dynamic) size: unknown counts as different."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def broadcast_to(t: Tensor, shape) -> Tensor:
    """``t`` expanded to ``shape`` as a contiguous tensor (a no-op when it already has that shape)."""
    return t if same_shape(t.shape, shape) else t.expand(shape).contiguous()


def diagonal_matrix(variance: Tensor) -> Tensor:
    """``diag_embed`` written as a product with the identity: ONNX Runtime runs the exported diag_embed as a
    Where over an identity mask, several times slower on (batch, C, C) tensors."""
    eye = torch.eye(variance.shape[-1], dtype=variance.dtype, device=variance.device)
    return variance.unsqueeze(-1) * eye


def is_random(value: object) -> bool:
    return isinstance(value, Moment)


def mean_of(value: object) -> object:
    """The mean of a moment, or the value itself when it is deterministic."""
    return value.mean if isinstance(value, Moment) else value


def jacobian(m: Moment) -> Tensor | float:
    return 1.0 if m.tangent is None else m.tangent


def chain(derivative: Tensor | float, tangent: Tangent) -> Tangent:
    """``derivative * tangent`` (an elementwise derivative scales the rows of a matrix tangent), skipping
    multiplications by exactly 1 so the graph stays small."""
    if isinstance(derivative, float) and derivative == 1.0:
        return tangent
    if isinstance(tangent, MatrixTangent):
        return tangent.scaled(derivative)
    if isinstance(tangent, float) and tangent == 1.0:
        return derivative
    return derivative * tangent


def add_tangents(a: Tangent, b: Tangent) -> Tangent:
    """The tangent of a sum of two values of one root; an elementwise tangent next to a matrix one is a diagonal
    matrix."""
    if not isinstance(a, MatrixTangent) and not isinstance(b, MatrixTangent):
        return a + b
    like = a if isinstance(a, MatrixTangent) else b
    return MatrixTangent.of(_as_dense(a, like) + _as_dense(b, like))


def _as_dense(tangent: Tangent, like: MatrixTangent) -> Tensor:
    if isinstance(tangent, MatrixTangent):
        return tangent.dense()
    eye = torch.eye(like.root_size, dtype=like.dtype, device=like.matrices[0].device)
    return tangent.unsqueeze(-1) * eye if isinstance(tangent, Tensor) else tangent * eye


def matrix_jacobian(m: Moment, left: Tensor) -> MatrixTangent:
    """The tangent of ``left @ x`` (``left``: (..., C_out, C)) for a moment ``x`` with any tangent."""
    tangent = m.tangent
    if isinstance(tangent, MatrixTangent):
        return tangent.then(left)
    if isinstance(tangent, Tensor):  # J = left diag(t): t stays a pending diagonal next to the root
        return MatrixTangent.of(left, cols=tangent.to(left.dtype))
    return MatrixTangent.of(left if tangent is None else tangent * left)


def same_root(a: Moment, b: Moment) -> bool:
    return a.var is b.var and a.full == b.full


def promote(*moments: Moment) -> tuple[Moment, ...]:
    """Materialise moments and bring them to one kind: full if any of them is full."""
    moments = tuple(m.materialised() for m in moments)
    if any(m.full for m in moments):
        return tuple(m.as_full() for m in moments)
    return moments


def linear_combination(mean: Tensor, terms: list[tuple[Tensor | float, Moment]]) -> Moment:
    """Var of ``sum_i J_i * x_i`` for independent moments ``x_i`` (each term is ``(J_i, x_i)``).

    diag: ``sum_i J_i^2 v_i``;  full: ``sum_i (J_i J_i^T) * Sigma_i``.
    """
    moments = promote(*(m for _, m in terms))
    full = moments[0].full
    total = None
    for (jac, _), m in zip(terms, moments):
        if isinstance(jac, float) and jac == 1.0:
            part = m.var
        elif full and isinstance(jac, Tensor):
            jac_b = torch.broadcast_to(jac, mean.shape)
            part = (jac_b.unsqueeze(-1) * m.var) * jac_b.unsqueeze(-2)
        else:
            part = _squared(jac) * m.var
        total = part if total is None else total + part
    shape = (*mean.shape, mean.shape[-1]) if full else mean.shape
    return Moment(mean, broadcast_to(total, shape), full)
