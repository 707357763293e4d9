"""The value every rule works on: a mean plus linear maps of named, independent noises.

A random tensor is carried as

    x = mean + sum_k  scale_k * after_k( J_k  layout_k(eps_k) )

* ``eps_k`` is a :class:`Noise`: a zero-mean Gaussian source with independent entries and an identity of its own
  (the object), never a tensor's identity.  Its covariance kind is its class: diagonal (:class:`Noise`), a dense
  per-row covariance (:class:`RowCovarianceNoise`), Kronecker factors or a dense block of a weight
  (``weights.py``), or a random weight applied to an input (:class:`WeightUse`, the weight noise shared by every
  row and every use of the weight).
* ``layout`` moves the noise's entries to the *root* (views, permutes, slices, expands, lookups; ``Layout``),
  ``J`` is an optional linear map over the last dimension (a :class:`MatrixTangent`, kept as its factors),
  ``after`` moves the result again (data movement after a matrix map), and ``scale`` is an elementwise factor
  (the derivatives of elementwise ops), in the value's layout.

One (noise, map) pair is a :class:`Term`.  Every op applies its JVP to the maps: elementwise ops multiply the
scales, data movement appends to the layouts, linear maps extend ``J``.  Views, clones and ``detach`` move maps
and never noise identities, so ``h * h.clone()`` or the gates of a GRU are products of correlated values and are
combined exactly.  Terms of one noise with the same layout are merged (their maps add); terms of correlated
noises (two uses of one weight, two layouts of one noise) are kept apart and their cross-covariances are added
when the (co)variance is formed.  So with first-order terms only (``predictive="glm"``) and nothing collapsed
(``covariance="full"``), the covariance is exactly ``J S J^T``.

Where a map cannot be kept (a matrix map whose last dimension is moved into another axis, a product that mixes
rows), the term is *collapsed*: replaced by a fresh noise with its exact marginal variance, independent of the
rest.  ``covariance="diag"`` is the policy that collapses every matrix map where it is formed (the paper's
diagonal variant); elementwise maps and data movement are kept in both modes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .operators import LinearOperator, SeparableOperator, SumOperator, as_dense, left_times, right_times

if TYPE_CHECKING:
    from .shared_weight import SharedNoise

aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------------------------


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


def _squared(scale):
    """``scale^2``; a boolean scale (a 0/1 mask such as relu's derivative) is its own square."""
    if isinstance(scale, Tensor) and scale.dtype == torch.bool:
        return scale
    return scale * scale


def _numeric(scale, like: Tensor):
    return scale.to(like.dtype) if isinstance(scale, Tensor) and scale.dtype == torch.bool else scale


def _times(a, b):
    """``a * b`` for scales, skipping exact ones so the graph stays small; boolean masks multiply as masks."""
    if isinstance(a, float) and a == 1.0:
        return b
    if isinstance(b, float) and b == 1.0:
        return a
    if isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    if isinstance(a, Tensor) and a.dtype == torch.bool:
        a = a.to(b.dtype) if isinstance(b, Tensor) else a.float()
    if isinstance(b, Tensor) and b.dtype == torch.bool:
        b = b.to(a.dtype) if isinstance(a, Tensor) else b.float()
    return a * b


def squares_times(a: Tensor, weight_var: Tensor, b: Tensor | None = None, extra: Tensor | None = None) -> Tensor:
    """``(a * b + extra) @ weight_var`` (``b`` defaults to ``a``) without overflow where the result fits: ``a`` and
    ``b`` are divided by their largest magnitude per row first (an input of 1e20 squares to inf in float32, while
    its variance under a weight of variance 1e-6 is 1e34)."""
    b = a if b is None else b
    sa = a.abs().amax(-1, keepdim=True).clamp_min(1.0)
    sb = sa if b is a else b.abs().amax(-1, keepdim=True).clamp_min(1.0)
    product = (a / sa) * (b / sb)
    if extra is not None:
        product = product + (extra / sa) / sb
    return ((product @ weight_var) * sa) * sb


def _plus(a, b, like: Tensor):
    return _numeric(a, like) + _numeric(b, like)


# ---------------------------------------------------------------------------------------------------------------
# Data movement of noises: moves and layouts
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Move:
    """One data-movement op, as it applies to a tensor laid out like the value (``tail=1``) or, when the op leaves
    the last dimension alone (``rows_only``), to a tensor whose last ``tail`` dims replace the value's last one
    (a root of another width, a per-row matrix)."""

    kind: str  # reshape | permute | expand | slice | select | pad | embedding
    args: tuple
    rows_only: bool
    key: str

    def apply(self, t: Tensor, tail: int = 1) -> Tensor:
        if tail != 1 and not self.rows_only:
            raise ValueError("a move of the last dimension applies to value-shaped tensors only")
        trailing = tuple(t.shape[t.dim() - tail:])
        if self.kind == "identity":
            return t
        if self.kind == "reshape":
            _, shape = self.args
            return t.reshape(*shape[:-1], *trailing) if self.rows_only else t.reshape(shape)
        if self.kind == "permute":
            (dims,) = self.args
            n = len(dims)
            return t.permute(*dims[:-1], *range(n - 1, n - 1 + tail)) if self.rows_only else t.permute(dims)
        if self.kind == "expand":
            shape = self.args[0]
            if t.dim() - tail + 1 < len(shape):  # broadcast of a tensor with fewer leading dims
                t = t.reshape(*([1] * (len(shape) - (t.dim() - tail + 1))), *t.shape)
            return t.expand(*shape[:-1], *trailing) if self.rows_only else t.expand(shape)
        if self.kind == "slice":
            dim, start, end, step, _ = self.args
            return aten.slice.Tensor(t, dim, start, end, step)
        if self.kind == "select":
            dim, index = self.args
            return aten.select.int(t, dim, index)
        if self.kind == "pad":
            dim, before, after, _ = self.args
            return F.pad(t, [0, 0] * (t.dim() - 1 - dim % t.dim()) + [before, after])
        if self.kind == "embedding":
            (indices,) = self.args
            flat = t.reshape(t.shape[0], -1)
            return F.embedding(indices, flat).reshape(*indices.shape, *t.shape[1:])
        raise AssertionError(self.kind)


def _shape_key(shape) -> str:
    return "(" + ",".join(str(s) for s in shape) + ")"


def reshape_move(shape_in, shape_out) -> Move:
    if same_shape(shape_in, shape_out):
        return IDENTITY
    rows_only = len(shape_in) > 0 and len(shape_out) > 0 and same_shape(shape_in[-1:], shape_out[-1:])
    key_in, key_out = (shape_in[:-1], shape_out[:-1]) if rows_only else (shape_in, shape_out)
    return Move("reshape", (tuple(shape_in), tuple(shape_out)), rows_only,
                f"reshape{_shape_key(key_in)}->{_shape_key(key_out)}")


def permute_move(dims: Sequence[int], shape=None) -> Move:
    """``shape``: the input's, when known; a permute that keeps the order of the dims larger than 1 only moves
    dims of size 1 and is a reshape (so a transpose round trip through a size-1 dim composes to nothing)."""
    n = len(dims)
    dims = tuple(d % n for d in dims)
    if shape is not None:
        big = [d for d in dims if not statically_known_true(shape[d] == 1)]
        if big == sorted(big):
            return reshape_move(tuple(shape), tuple(shape[d] for d in dims))
    return Move("permute", (dims,), dims[-1] == n - 1, f"permute{dims}")


def expand_move(shape_in, shape_out) -> Move:
    lead = len(shape_out) - len(shape_in)
    if lead >= 0 and all(statically_known_true(d == 1) for d in shape_out[:lead]) and same_shape(
            shape_in, shape_out[lead:]):  # only new leading dims of size 1: a reshape
        return reshape_move(shape_in, shape_out)
    rows_only = len(shape_in) > 0 and same_shape(shape_in[-1:], shape_out[-1:])
    key_in, key_out = (shape_in[:-1], shape_out[:-1]) if rows_only else (shape_in, shape_out)
    key = f"expand{_shape_key(key_in)}->{_shape_key(key_out)}"
    return Move("expand", (tuple(shape_out), tuple(shape_in)), rows_only, key)


def slice_move(ndim: int, dim: int, start, end, step, size) -> Move:
    """``size``: the size of ``dim`` before the slice (a slice of everything is the identity)."""
    dim = dim % ndim
    to_the_end = end is None or (isinstance(end, int) and end >= 2**62) or statically_known_true(end >= size)
    if start in (None, 0) and step == 1 and to_the_end:
        return IDENTITY
    dim = -1 if dim == ndim - 1 else dim  # a cut of the last dim stays on the last dim when rows move
    return Move("slice", (dim, start, end, step, size), dim != -1, f"slice{dim},{start},{end},{step}")


def select_move(ndim: int, dim: int, index) -> Move:
    dim = dim % ndim
    dim = -1 if dim == ndim - 1 else dim
    return Move("select", (dim, index), dim != -1, f"select{dim},{index}")


def pad_move(ndim: int, dim: int, before, after, size) -> Move:
    """``size``: the size of ``dim`` before padding."""
    dim = dim % ndim
    dim = -1 if dim == ndim - 1 else dim
    return Move("pad", (dim, before, after, size), dim != -1, f"pad{dim},{before},{after}")


def embedding_move(indices: Tensor) -> Move:
    return Move("embedding", (indices,), True, f"embedding{id(indices)}")


def _composed(first: Move, second: Move) -> Move | None:
    """``second`` after ``first`` as one move (None: keep both); an identity gives a move of kind "identity"."""
    if first.kind == second.kind == "reshape" and first.rows_only and second.rows_only:
        rows_in, rows_out, last = first.args[0][:-1], second.args[1][:-1], first.args[0][-1:]
        if same_shape(rows_in, rows_out):
            return IDENTITY
        return reshape_move((*rows_in, *last), (*rows_out, *last))
    if first.kind == second.kind == "reshape" and not first.rows_only and not second.rows_only:
        shape_in, shape_out = first.args[0], second.args[1]
        if same_shape(shape_in, shape_out):
            return IDENTITY
        return reshape_move(shape_in, shape_out)
    if first.kind == second.kind == "reshape" and first.rows_only != second.rows_only and same_shape(
            first.args[1], second.args[0]):  # one value-shaped tensor reshaped twice
        shape_in, shape_out = first.args[0], second.args[1]
        return IDENTITY if same_shape(shape_in, shape_out) else reshape_move(shape_in, shape_out)
    if first.kind == second.kind == "permute" and len(first.args[0]) == len(second.args[0]):
        dims = tuple(first.args[0][d] for d in second.args[0])
        return IDENTITY if dims == tuple(range(len(dims))) else permute_move(dims)
    return None


IDENTITY = Move("identity", (), True, "identity")


_KEEP = object()


def _retargeted(move: Move, dim: int) -> Move:
    """The same select/slice on another dim (of a tensor of the same rank)."""
    if move.kind == "select":
        return Move("select", (dim, move.args[1]), move.rows_only, f"select{dim},{move.args[1]}")
    _, start, end, step, size = move.args
    return Move("slice", (dim, start, end, step, size), move.rows_only, f"slice{dim},{start},{end},{step}")


def _through_pad(pad: Move, move: Move):
    """A select or slice of a padded dim: on the unpadded tensor, None if it only picks padding, ``_KEEP`` when
    the sizes are not static."""
    dim, before, after, size = pad.args
    if not all(isinstance(v, int) for v in (before, after, size)):
        return _KEEP
    total = before + size + after
    if move.kind == "select":
        index = move.args[1] % total if isinstance(move.args[1], int) else None
        if index is None:
            return _KEEP
        if not before <= index < before + size:
            return None
        return Move("select", (dim, index - before), move.rows_only, f"select{dim},{index - before}")
    _, start, end, step, _ = move.args
    if not (isinstance(start, int) and isinstance(end, int) and step == 1):
        return _KEEP
    start, end = max(0, start if start >= 0 else start + total), min(total, end if end >= 0 else end + total)
    lo, hi = max(start, before), min(end, before + size)
    if lo >= hi:
        return None
    if lo == start and hi == end:
        if lo == before and hi == before + size:
            return IDENTITY
        return Move("slice", (dim, lo - before, hi - before, 1, size), move.rows_only,
                    f"slice{dim},{lo - before},{hi - before},1")
    return _KEEP


def _cuts_last(move: Move) -> bool:
    """A slice or pad of the last dimension (it becomes a selection matrix when a matrix map is formed)."""
    return move.kind in ("slice", "pad") and not move.rows_only


def _pushed_through(moves: list[tuple[Move, int]], move: Move, tail: int):
    """A select or slice after a permute or a pad, applied before it (zeros found sooner, routes compared equal):
    the new layout, None when it only picks padding, ``_KEEP`` when it cannot be pushed."""
    last = moves[-1][0]
    if last.kind == "permute" and not (last.rows_only ^ move.rows_only):
        dims = last.args[0]
        prefix = Layout(tuple(moves[:-1])).then(_retargeted(move, dims[move.args[0]]), tail)
        if prefix is None or move.kind == "slice":
            return prefix if prefix is None else prefix.then(last, tail)
        kept = [d for d in dims if d != dims[move.args[0]]]
        order = [sorted(kept).index(d) for d in kept]
        return prefix if order == sorted(order) else prefix.then(permute_move(order), tail)
    if last.kind == "slice" and move.kind == "select" and last.args[0] == move.args[0]:
        index = _index_in_slice(last, move.args[1])
        return _KEEP if index is None else Layout(tuple(moves[:-1])).then(select_move_at(move, index), tail)
    if last.kind == "expand" and move.rows_only and last.rows_only:
        return _select_through_expand(moves, last, move, tail) if move.kind == "select" else \
            _slice_through_expand(moves, last, move, tail)
    if last.kind == "pad" and last.args[0] == move.args[0]:
        resolved = _through_pad(last, move)
        if resolved is None or resolved is _KEEP:
            return resolved
        return Layout(tuple(moves[:-1])).then(resolved, tail)
    return _KEEP


def select_move_at(move: Move, index) -> Move:
    """The select ``move`` at another index of the same dim."""
    dim = move.args[0]
    return Move("select", (dim, index), move.rows_only, f"select{dim},{index}")


def _index_in_slice(cut: Move, index) -> int | None:
    """Entry ``index`` of the slice ``cut`` as an index of the sliced dim (None where the sizes are not static)."""
    _, start, end, step, size = cut.args
    start = start or 0
    if not (isinstance(index, int) and isinstance(start, int) and start >= 0 and step == 1):
        return None
    if index >= 0:
        return start + index
    if not (isinstance(end, int) and isinstance(size, int)):
        return None
    return min(end, size) + index


def _select_through_expand(moves: list[tuple[Move, int]], expand: Move, move: Move, tail: int):
    """``select(d, i)`` of an expanded tensor: the select of the input (index 0 of a broadcast dim; nothing for a
    new leading dim), then the expand without ``d``."""
    shape_out, shape_in = expand.args
    dim, index = move.args
    lead = len(shape_out) - len(shape_in)
    prefix: Layout | None = Layout(tuple(moves[:-1]))
    if dim >= lead:
        broadcast = statically_known_true(shape_in[dim - lead] == 1) and not statically_known_true(
            shape_out[dim] == 1)
        prefix = prefix.then(select_move(len(shape_in), dim - lead, 0 if broadcast else index), tail)
        shape_in = (*shape_in[:dim - lead], *shape_in[dim - lead + 1:])
    shape_out = (*shape_out[:dim], *shape_out[dim + 1:])
    if prefix is None or same_shape(shape_in, shape_out):
        return prefix
    return prefix.then(expand_move(shape_in, shape_out), tail)


def _slice_through_expand(moves: list[tuple[Move, int]], expand: Move, move: Move, tail: int):
    """A slice of a dim the expand created or broadcast: the expand to the shorter size."""
    shape_out, shape_in = expand.args
    dim, start, end, step, _ = move.args
    lead = len(shape_out) - len(shape_in)
    size = shape_out[dim]
    if not (all(isinstance(v, int) for v in (start or 0, end, step, size))
            and (dim < lead or statically_known_true(shape_in[dim - lead] == 1))):
        return _KEEP
    length = len(range(size)[slice(start, end, step)])
    if length == 0:
        return None
    shape_out = (*shape_out[:dim], length, *shape_out[dim + 1:])
    prefix = Layout(tuple(moves[:-1]))
    return prefix if same_shape(shape_in, shape_out) else prefix.then(expand_move(shape_in, shape_out), tail)


@dataclass(frozen=True)
class Layout:
    """A sequence of moves, each with the ``tail`` it applies with; consecutive reshapes and permutes are
    composed and identities dropped, so two routes to the same layout compare equal (``key``)."""

    moves: tuple[tuple[Move, int], ...] = ()

    def then(self, move: Move, tail: int = 1) -> "Layout | None":
        """This layout followed by ``move``; None when the moved map is exactly zero (a selection of padding)."""
        if move is IDENTITY:
            return self
        moves = list(self.moves)
        cuts: list[tuple[Move, int]] = []
        if move.rows_only:  # a move of the rows commutes with slices and pads of the last dim: keep those last
            while moves and _cuts_last(moves[-1][0]) and moves[-1][1] == tail:
                cuts.insert(0, moves.pop())
        if moves and moves[-1][1] == tail and move.kind in ("select", "slice"):
            pushed = _pushed_through(moves, move, tail)
            if pushed is not _KEEP:
                return None if pushed is None else Layout(pushed.moves + tuple(cuts))
        if moves and moves[-1][1] == tail and (composed := _composed(moves[-1][0], move)) is not None:
            moves.pop()
            if composed is not IDENTITY:
                moves.append((composed, tail))
        else:
            moves.append((move, tail))
        return Layout(tuple(moves + cuts))

    def apply(self, t: Tensor) -> Tensor:
        padding: dict[int, list] = {}  # consecutive pads (of different dims, or adding up on one) as one pad
        for move, tail in self.moves:
            if move.kind == "pad":
                dim, before, after, _ = move.args
                total = padding.setdefault(dim % t.dim(), [0, 0])
                total[0], total[1] = total[0] + before, total[1] + after
                continue
            t = _padded(t, padding)
            t = move.apply(t, tail)
        return _padded(t, padding)

    @property
    def key(self) -> tuple:
        return tuple((m.key, tail) for m, tail in self.moves)

    @property
    def rows_only(self) -> bool:
        return all(m.rows_only for m, _ in self.moves)

    def __bool__(self) -> bool:
        return bool(self.moves)


NO_MOVES = Layout()


def _padded(t: Tensor, padding: dict[int, list]) -> Tensor:
    """``t`` zero-padded by ``{dim: [before, after]}`` in one op; empties ``padding``."""
    if not padding:
        return t
    spec: list = []
    for dim in range(t.dim() - 1, min(padding) - 1, -1):
        spec += padding.get(dim, [0, 0])
    padding.clear()
    return F.pad(t, spec)


# ---------------------------------------------------------------------------------------------------------------
# Noises
# ---------------------------------------------------------------------------------------------------------------


class Noise:
    """A zero-mean Gaussian source with independent entries of variance ``variance``; its identity is the object.

    ``group`` is the noise it is correlated with (itself, or the weight a :class:`WeightUse` draws on);
    ``cross_variance(other)`` is the elementwise covariance with another noise of the group laid out alike."""

    def __init__(self, variance: Tensor):
        self._variance = variance

    @property
    def variance(self) -> Tensor:
        return self._variance

    @property
    def group(self) -> "Noise":
        return self

    def cross_variance(self, other: "Noise") -> Tensor | None:
        return self.variance if other is self else None

    row_covariance: Tensor | None = None  # a dense covariance over the last dim per row (RowCovarianceNoise)


class RowCovarianceNoise(Noise):
    """A noise with a dense covariance ``cov`` (..., R, R) over its last dimension, rows independent: a covariance
    formed where a map could not be kept (attention in full mode)."""

    def __init__(self, cov: Tensor):
        super().__init__(torch.diagonal(cov, dim1=-2, dim2=-1))
        self.row_covariance = cov


class WeightUse(Noise):
    """``u = a @ dW``: the noise ``dW`` (k, m) of a random weight (variance ``weight_var``, laid out (k, m) by
    ``weight_key``) applied to the rows ``a`` (..., k).  Per row ``Var u = a^2 @ S``; two uses of the same weight
    (a recurrent cell's steps, a tied weight) are correlated: ``Cov(u, u') = (a a') @ S`` entrywise."""

    def __init__(self, source: Noise, inputs: Tensor, weight_var: Tensor, weight_key: tuple):
        self.source, self.inputs, self.weight_var, self.weight_key = source, inputs, weight_var, weight_key
        self._cached: Tensor | None = None

    @property
    def variance(self) -> Tensor:
        if self._cached is None:
            self._cached = squares_times(self.inputs, self.weight_var)
        return self._cached

    @property
    def group(self) -> Noise:
        return self.source

    def cross_variance(self, other: Noise) -> Tensor | None:
        if other is self:
            return self.variance
        if isinstance(other, WeightUse) and other.source is self.source and other.weight_key == self.weight_key:
            return squares_times(self.inputs, self.weight_var, other.inputs)
        return None


class WeightEntries(Noise):
    """The entries of a random weight (k, m) as one vector (variance ``weight_var`` flattened): the root of the
    summed map of several uses of the weight (:func:`_summed_weight_uses`).  One per weight and layout, so every
    summed map of the weight draws on the same noise."""

    def __init__(self, use: WeightUse):
        super().__init__(use.weight_var.reshape(-1))
        self.source, self.weight_key = use.source, use.weight_key

    @staticmethod
    def of(use: WeightUse) -> "WeightEntries":
        memo = vars(use.source).setdefault("_entries", {})
        if use.weight_key not in memo:
            memo[use.weight_key] = WeightEntries(use)
        return memo[use.weight_key]

    @property
    def group(self) -> Noise:
        return self.source


# ---------------------------------------------------------------------------------------------------------------
# Matrix maps
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MatrixTangent:
    """A Jacobian kept as its factors, ``J = diag(d_k) F_k diag(d_(k-1)) ... F_1 diag(d_0)``: ``matrices`` are
    ``F_1 .. F_k`` (innermost first, each ``(..., C_i, C_(i-1))``, leading dims absent for one matrix shared by
    every row) and ``diagonals`` are ``d_0 .. d_k`` (elementwise derivatives, None for 1).

    Layers only append factors; the product is formed once, when a covariance is formed, and from its smaller
    end: a network's output ``W_3 diag(r_2) W_2 diag(r_1)`` on a hidden root becomes ``(points, outputs, width)``
    products instead of a ``(points, width, width)`` Jacobian per layer."""

    matrices: tuple[Tensor, ...]
    diagonals: tuple[Tensor | float | None, ...]

    @staticmethod
    def of(j: Tensor, cols=None) -> "MatrixTangent":
        """``j diag(cols)``."""
        return MatrixTangent((j,), (None if isinstance(cols, float) and cols == 1.0 else cols, None))

    @property
    def root_size(self) -> int:
        return self.matrices[0].shape[-1]

    @property
    def out_size(self) -> int:
        return self.matrices[-1].shape[-2]

    @property
    def dtype(self) -> torch.dtype:
        return self.matrices[0].dtype

    @property
    def is_shared_matrix(self) -> bool:
        """One matrix for every row and nothing pending."""
        return all(m.dim() == 2 for m in self.matrices) and all(d is None for d in self.diagonals)

    def then(self, left: Tensor) -> "MatrixTangent":
        """``left @ J``."""
        return MatrixTangent(self.matrices + (left,), self.diagonals + (None,))

    def scaled(self, derivative) -> "MatrixTangent":
        """``diag(derivative) J``."""
        if isinstance(derivative, float) and derivative == 1.0:
            return self
        *inner, rows = self.diagonals
        derivative = _numeric(derivative, self.matrices[-1])
        return MatrixTangent(self.matrices, (*inner, derivative if rows is None else rows * derivative))

    def without_cols(self) -> tuple["MatrixTangent", Tensor | None]:
        """``(J diag(d_0)^-1, d_0)``: the product without its innermost diagonal, and that diagonal."""
        cols = self.diagonals[0]
        if cols is None:
            return self, None
        return MatrixTangent(self.matrices, (None, *self.diagonals[1:])), _numeric(cols, self.matrices[0])

    def dense(self) -> Tensor:
        """The product, formed from the output end when it is the smaller one (else from the root end)."""
        matrices = self.matrices
        diagonals = tuple(_numeric(d, matrices[0]) if d is not None else None for d in self.diagonals)
        if len(matrices) > 1 and statically_known_true(self.out_size < self.root_size):
            j = as_dense(matrices[-1])
            for d, m in zip(reversed(diagonals[1:-1]), reversed(matrices[:-1])):
                j = right_times(j if d is None else j * _col(d), m)
            if diagonals[0] is not None:
                j = j * _col(diagonals[0])
        else:
            j = as_dense(matrices[0]) if diagonals[0] is None else as_dense(matrices[0]) * _col(diagonals[0])
            for d, m in zip(diagonals[1:-1], matrices[1:]):
                j = left_times(m, j if d is None else _row(d) * j)
        return j if diagonals[-1] is None else _row(diagonals[-1]) * j

    def squared(self, v: Tensor) -> Tensor:
        """``(J * J) v`` propagated factor by factor, ``(d_k^2) (F_k * F_k) ... (F_1 * F_1) (d_0^2) v``: exact for one
        factor; through several it drops the cross terms of the inner factors (the diagonal mode's rule)."""
        for i, m in enumerate(self.matrices):
            d = self.diagonals[i]
            if d is not None:
                v = v * _squared(_numeric(d, v))
            v = _squared_factor(m, v)
        last = self.diagonals[-1]
        return v if last is None else v * _squared(_numeric(last, v))

    @property
    def has_operator(self) -> bool:
        return any(isinstance(m, LinearOperator) for m in self.matrices)

    def rmatmul(self, j: Tensor) -> Tensor:
        """``j @ J`` for rows ``j`` (..., r, out), from the output end (a chain of no matrices is its diagonal)."""
        like = j
        *_, last = self.diagonals
        if last is not None:
            j = j * _col(_numeric(last, like))
        for d, m in zip(reversed(self.diagonals[:-1]), reversed(self.matrices)):
            j = right_times(j, m)
            if d is not None:
                j = j * _col(_numeric(d, like))
        return j

    def matmul(self, x: Tensor) -> Tensor:
        """``J @ x`` for columns ``x`` (..., root, c)."""
        like = x
        first = self.diagonals[0]
        if first is not None:
            x = _row(_numeric(first, like)) * x
        for d, m in zip(self.diagonals[1:], self.matrices):
            x = left_times(m, x)
            if d is not None:
                x = _row(_numeric(d, like)) * x
        return x


def _squared_factor(m, v: Tensor) -> Tensor:
    """``(M * M) v`` for a matrix (shared or per row) or an operator."""
    if isinstance(m, LinearOperator):
        return m.squared(v)
    return v @ (m * m).mT if m.dim() == 2 else ((m * m) @ v.unsqueeze(-1)).squeeze(-1)


def _col(d):
    return d.unsqueeze(-2) if isinstance(d, Tensor) else d


def _row(d):
    return d.unsqueeze(-1) if isinstance(d, Tensor) else d


# ---------------------------------------------------------------------------------------------------------------
# Terms
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Term:
    """``scale * after(J layout(noise))``; ``J`` None is the identity (then ``after`` is empty: every move is in
    ``layout``).  ``shared``: a projection's row-shared weight noise (``shared_weight.py``), for attention."""

    noise: Noise
    layout: Layout = NO_MOVES
    jacobian: MatrixTangent | None = None
    after: Layout = NO_MOVES
    scale: Tensor | float = 1.0
    shared: "SharedNoise | None" = None

    @property
    def merge_key(self) -> tuple:
        """Terms with equal keys are one map of one noise and add."""
        return (id(self.noise), self.layout.key, self.jacobian is not None, self.after.key)


def _moved_rows(layout: Layout, cov: Tensor) -> Tensor:
    for move, tail in layout.moves:
        cov = move.apply(cov, tail + 1)
    return cov


# ---------------------------------------------------------------------------------------------------------------
# The random value
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Moment:
    """A random tensor: ``mean`` plus the sum of its ``terms``."""

    mean: Tensor
    terms: tuple[Term, ...]

    # -- construction -------------------------------------------------------------------------------------------

    @staticmethod
    def of_noise(mean: Tensor, noise: Noise, layout: Layout = NO_MOVES, jacobian: MatrixTangent | None = None,
                 shared: "SharedNoise | None" = None) -> "Moment":
        return Moment(mean, (Term(noise, layout, jacobian, shared=shared),))

    @staticmethod
    def diagonal(mean: Tensor, variance: Tensor, shared: "SharedNoise | None" = None) -> "Moment":
        """A fresh noise with elementwise variance ``variance`` (broadcast to the mean's shape)."""
        return Moment.of_noise(mean, Noise(broadcast_to(variance, mean.shape)), shared=shared)

    @staticmethod
    def with_covariance(mean: Tensor, cov: Tensor) -> "Moment":
        """A fresh noise with the covariance ``cov`` (mean.shape + (C,)) over the last dimension."""
        return Moment.of_noise(mean, RowCovarianceNoise(broadcast_to(cov, (*mean.shape, mean.shape[-1]))))

    @property
    def feature_size(self) -> int:
        return self.mean.shape[-1] if self.mean.dim() else 1

    # -- the JVP of each family -----------------------------------------------------------------------------------

    def scaled(self, mean: Tensor, derivative) -> "Moment":
        """``f(x)`` for an elementwise ``f`` with derivative ``derivative`` (broadcastable to the mean)."""
        if isinstance(derivative, float) and derivative in (0.0, 1.0):
            return mean if derivative == 0.0 else self.with_mean(mean)
        products: dict[int, object] = {}  # terms that shared a scale share the new one: one product each
        terms = []
        for t in self.terms:
            key = id(t.scale) if isinstance(t.scale, Tensor) else t.scale
            if key not in products:
                products[key] = _times(t.scale, derivative)
            terms.append(replace(t, scale=products[key], shared=None))
        return Moment(mean, tuple(terms))

    def with_mean(self, mean: Tensor) -> "Moment":
        return Moment(mean, self.terms)

    def moved(self, mean: Tensor, move: Move, scale_op=None, shared_move=None) -> "Moment":
        """Data movement: every map is moved, no noise is touched.  ``scale_op`` applies the op to a tensor shaped
        like the input mean (default ``move.apply``); ``shared_move`` moves a projection's shared noise."""
        if move is IDENTITY:
            return self.with_mean(mean)
        scale_op = scale_op or move.apply
        terms, moved_scales = [], {}
        for t in self.terms:
            if t.noise.row_covariance is not None and not move.rows_only:  # a dense root keeps only its variances
                t = Term(Noise(_term_variance(t)))
            scale = t.scale
            if isinstance(scale, Tensor):
                if id(scale) not in moved_scales:  # an expand keeps a broadcastable scale as it is (no copy)
                    moved_scales[id(scale)] = scale if move.kind == "expand" and scale_op == move.apply else \
                        scale_op(broadcast_to(scale, self.mean.shape))
                scale = moved_scales[id(scale)]
            shared = shared_move(t.shared) if (shared_move is not None and t.shared is not None) else None
            if t.jacobian is None:
                layout = t.layout.then(move)
                if layout is not None:
                    terms.append(Term(t.noise, layout, None, NO_MOVES, scale, shared))
            else:
                after = t.after.then(move)
                if after is not None:
                    terms.append(Term(t.noise, t.layout, t.jacobian, after, scale, shared))
        return Moment(mean, tuple(terms)) if terms else mean

    def broadcast_to(self, shape) -> "Moment":
        """The value broadcast to ``shape`` (an operand of a broadcasting op): an expand move."""
        if same_shape(self.mean.shape, shape):
            return self
        mean = self.mean.expand(shape) if self.mean.dim() == len(shape) else self.mean.reshape(
            *([1] * (len(shape) - self.mean.dim())), *self.mean.shape).expand(shape)
        return self.moved(mean, expand_move(self.mean.shape, shape))

    def left_multiplied(self, mean: Tensor, left: Tensor) -> "Moment":
        """``left @ x`` over the last dimension, ``left`` (..., C_out, C) deterministic: ``J <- left diag(s) J``."""
        terms, maps, alive = [], {}, []  # terms that shared a map share the extended one (one covariance product)
        for t in self.terms:
            t = settled(t, self.mean)
            if t is None:
                continue
            alive.append(t)  # settling may make new maps and scales: an id is a key only while its object lives
            scale_key = id(t.scale) if isinstance(t.scale, Tensor) else t.scale
            if t.jacobian is None:
                layout, cuts = _canonical_root(t, left)
                key = (None, scale_key, t.layout.key[len(layout.moves):])
                if key not in maps:
                    selections = tuple(_selection(move, left) for move, _ in cuts)
                    scale = None if isinstance(t.scale, float) and t.scale == 1.0 else t.scale
                    maps[key] = MatrixTangent(selections + (left,), (None,) * len(selections) + (scale, None))
                t = replace(t, layout=layout)
            else:
                key = (id(t.jacobian), scale_key)
                if key not in maps:
                    maps[key] = t.jacobian.scaled(t.scale).then(left)
            terms.append(Term(t.noise, t.layout, maps[key]))
        return merged(mean, terms, onto_maps=True)

    def plus(self, *terms: Term) -> "Moment":
        return Moment(self.mean, self.terms + tuple(terms))

    # -- policy ---------------------------------------------------------------------------------------------------

    def collapsed_matrix_maps(self) -> "Moment":
        """The matrix-mapped terms replaced by one fresh diagonal noise with their exact marginal variance; the
        elementwise terms kept (``covariance="diag"``)."""
        matrix = [t for t in self.terms if t.jacobian is not None]
        if not matrix:
            return self
        rest = tuple(t for t in self.terms if t.jacobian is None)
        fresh = Term(Noise(broadcast_to(_variance(self.mean, matrix), self.mean.shape).contiguous()))
        return Moment(self.mean, rest + (fresh,))

    # -- moments --------------------------------------------------------------------------------------------------

    def variance(self) -> Tensor:
        """Elementwise variance, shaped like ``mean``."""
        return broadcast_to(_variance(self.mean, self.terms), self.mean.shape)

    @property
    def has_operator_maps(self) -> bool:
        return any(t.jacobian is not None and t.jacobian.has_operator for t in self.terms)

    def propagated_variance(self) -> Tensor:
        """The elementwise variance, exact except that maps through operators (a convolution network's, full mode)
        are propagated factor by factor, ``(A * A) v``, as the diagonal mode does: what the paper's second-order
        terms (``v_a S``) and moment-matched activations use as their input variance, where the exact one would
        form each image's Jacobian at every layer."""
        through = [t for t in self.terms if t.jacobian is not None and t.jacobian.has_operator]
        rest = [t for t in self.terms if t.jacobian is None or not t.jacobian.has_operator]
        total = Moment(self.mean, tuple(rest)).variance() if rest else torch.zeros_like(self.mean)
        for t in through:
            flat = t.jacobian.squared(t.layout.apply(t.noise.variance))
            total = total + _times(_squared(t.scale), t.after.apply(flat))
        return total

    def covariance(self) -> Tensor:
        """Covariance over the last dimension, ``mean.shape + (C,)``."""
        return broadcast_to(_covariance(self.mean, self.terms), (*self.mean.shape, self.feature_size))


def flat_map(x: Moment, mean: Tensor, operator: LinearOperator) -> "Moment | Tensor":
    """``x`` (N, ...) with ``operator`` applied as one matrix map over all its entries but the batch dim
    (flattened), laid out like ``mean`` (the plain op's): how full mode keeps a convolution network's maps exact
    (the map of a random convolution reaches back to earlier layers through every channel and position)."""
    flat_in = x.mean.reshape(x.mean.shape[0], -1)
    converted = [(t, _broadcast_copies(t, x.mean)) for t in x.terms]
    copies = [c for _, c in converted if c is not None]
    rest = [t for t, c in converted if c is None]
    moved = Moment(x.mean, tuple(rest)).moved(flat_in, reshape_move(x.mean.shape, flat_in.shape)) if rest else None
    terms = copies + list(moved.terms if is_random(moved) else ())
    if not terms:
        return mean
    moved = Moment(flat_in, tuple(terms))
    flat_out = mean.reshape(mean.shape[0], -1)
    mapped = moved.left_multiplied(flat_out, operator)
    return mapped.moved(mean, reshape_move(flat_out.shape, mean.shape)) if is_random(mapped) else mean


def _broadcast_copies(t: Term, mean: Tensor) -> Term | None:
    """An elementwise term of per-channel copies (a (C,) parameter broadcast over a batch of images (N, C, ...),
    as batch norm's scale and shift are) as the channel noise, one row per image, with a broadcast operator over
    the flattened entries; None for any other term.  (Laid out as copies, its flattened entries would meet across
    every pair of positions.)"""
    if t.jacobian is not None or not t.layout.moves or t.layout.moves[-1][0].kind != "expand":
        return None
    shape_out, shape_in = t.layout.moves[-1][0].args
    ndim = len(shape_out)
    padded = (1,) * (ndim - len(shape_in)) + tuple(shape_in)
    if ndim < 3 or not same_shape(shape_out, mean.shape) or not all(
            statically_known_true(d == 1) for d in (padded[0], *padded[2:])) or not statically_known_true(
            padded[1] == shape_out[1]):
        return None
    n, channels = shape_out[0], shape_out[1]
    layout = Layout(t.layout.moves[:-1]).then(reshape_move(tuple(shape_in), (1, channels)))
    layout = layout.then(expand_move((1, channels), (n, channels)))
    ones = [torch.ones(size, 1, dtype=mean.dtype, device=mean.device) for size in shape_out[2:]]
    scale = None if isinstance(t.scale, float) and t.scale == 1.0 else broadcast_to(
        _numeric(t.scale, mean) * torch.ones_like(mean), mean.shape).reshape(n, -1)
    return Term(t.noise, layout, MatrixTangent((SeparableOperator(ones, channels, mean),), (None, scale)))


def maps_over_entries(x: object, operator_found: bool = False) -> bool:
    """A random value whose matrix maps, if any, act on all its entries but the batch dim (operators, from
    ``flat_map``), so that ``flat_map`` keeps them; a map over the last dim alone would be collapsed by the
    flattening.  ``operator_found``: also require one such map."""
    if not isinstance(x, Moment) or any(t.jacobian is not None and not t.jacobian.has_operator for t in x.terms):
        return False
    return not operator_found or x.has_operator_maps


def is_random(value: object) -> bool:
    return isinstance(value, Moment)


def mean_of(value: object) -> object:
    """The mean of a moment, or the value itself when it is deterministic."""
    return value.mean if isinstance(value, Moment) else value


def merged(mean: Tensor, terms: Iterable[Term], onto_maps: bool = False) -> Moment | Tensor:
    """A value from terms: terms of one noise with the same layout add (their scales where they share a map,
    else their maps as dense matrices).  ``onto_maps`` (where a matrix map is formed anyway): uses of one weight
    are first summed onto its entries and the maps of one noise settled onto a common root, so a recurrence
    carries a bounded number of terms however many steps it has.  Elsewhere elementwise terms stay elementwise:
    a matrix map cannot follow its last dimension into the rows (a ``stack``), an elementwise term can."""
    terms = list(terms)
    if onto_maps:
        terms = _on_common_roots(_summed_weight_uses(terms, mean), mean)
    crowded = set() if onto_maps else _crowded(terms, mean)
    if crowded:
        mapped = [t for t in terms if t.jacobian is not None and id(t.noise) in crowded]
        terms = _on_common_roots(mapped, mean) + [t for t in terms if t.jacobian is None or id(t.noise) not in crowded]
    groups: dict[tuple, list[Term]] = {}
    for t in terms:
        adds_maps = onto_maps or id(t.noise) in crowded
        groups.setdefault(t.merge_key if adds_maps else (*t.merge_key, id(t.jacobian)), []).append(t)
    out: list[Term] = []
    for group in groups.values():
        out.extend(group if len(group) == 1 else _merge(group, mean))
    if not out:
        return mean
    return Moment(mean, tuple(out))


# entries of one row's dense map (C x root width, or C x k * m for a weight's entries) up to which maps are added
_ROW_MAP_BUDGET = 1 << 16


def _crowded(terms: list[Term], mean: Tensor) -> set[int]:
    """The noises (ids) with several matrix maps that are cheap to add as dense matrices: an elementwise op of a
    recurrence (``z * h + (1 - z) * n``) would otherwise carry every earlier step's maps apart, so the terms, and
    the graph, grow with each step.  Other noises keep their maps apart (a large map is formed only once, when a
    covariance is, and from its cheaper end)."""
    seen: set[int] = set()
    crowded: set[int] = set()
    for t in terms:
        if t.jacobian is None or t.jacobian.has_operator:  # operator maps add lazily (``_summed_tangents``)
            continue
        if id(t.noise) in seen and t.jacobian.out_size * t.jacobian.root_size <= _ROW_MAP_BUDGET:
            crowded.add(id(t.noise))
        seen.add(id(t.noise))
    return crowded


def _merge(group: list[Term], mean: Tensor) -> list[Term]:
    """One term for maps of one noise through one layout: scales add where the map is shared, dense matrices add
    otherwise (terms that settle differently stay apart; their cross-covariance is formed later)."""
    first = group[0]
    if first.jacobian is None or all(t.jacobian is first.jacobian for t in group):
        scale = first.scale
        for t in group[1:]:
            scale = _plus(scale, t.scale, mean)
        return [Term(first.noise, first.layout, first.jacobian, first.after, scale)]
    settled_terms = [s for s in (settled(t, mean) for t in group) if s is not None]
    if not settled_terms:
        return []
    if any(s.jacobian is None or s.noise is not first.noise or s.layout.key != settled_terms[0].layout.key
           for s in settled_terms):
        return settled_terms
    if any(s.jacobian.has_operator for s in settled_terms):  # a map of operators is never formed: a lazy sum
        total = settled_terms[0].jacobian.scaled(settled_terms[0].scale)
        for s in settled_terms[1:]:
            total = _summed_tangents(total, s.jacobian.scaled(s.scale))
        return [Term(first.noise, settled_terms[0].layout, total)]
    j = None
    for s in settled_terms:
        dense = s.jacobian.dense()
        dense = dense if isinstance(s.scale, float) and s.scale == 1.0 else _row(_numeric(s.scale, mean)) * dense
        j = dense if j is None else j + dense
    return [Term(first.noise, settled_terms[0].layout, MatrixTangent.of(j))]




def _summed_tangents(a: MatrixTangent, b: MatrixTangent) -> MatrixTangent:
    """``a + b`` with the factors they share kept once: the common inner factors (from the root) and outer factors
    (from the output), with a :class:`SumOperator` of the two middles between them (a skip connection adds a
    block's map to the identity; the earlier layers' factors are shared)."""
    ma, mb, da, db = a.matrices, b.matrices, a.diagonals, b.diagonals
    inner = 0
    while inner < min(len(ma), len(mb)) and ma[inner] is mb[inner] and da[inner] is db[inner]:
        inner += 1
    outer = 0
    while (outer < min(len(ma), len(mb)) - inner and ma[len(ma) - 1 - outer] is mb[len(mb) - 1 - outer]
           and da[len(da) - 1 - outer] is db[len(db) - 1 - outer]):
        outer += 1
    middles = [MatrixTangent(m[inner:len(m) - outer], d[inner:len(d) - outer]) for m, d in ((ma, da), (mb, db))]
    inp = ma[inner - 1].shape[-2] if inner else a.root_size
    out = ma[len(ma) - outer].shape[-1] if outer else a.out_size
    leading = [tuple(f.shape[:-2]) for mid in middles for f in mid.matrices] + [
        tuple(d.shape[:-1]) for mid in middles for d in mid.diagonals if isinstance(d, Tensor)]
    rows = tuple(torch.broadcast_shapes(*leading)) if leading else ()
    total = SumOperator(middles, out, inp, ma[0] if isinstance(ma[0], Tensor) else _like(ma[0]), rows)
    return MatrixTangent(ma[:inner] + (total,) + ma[len(ma) - outer:],
                         da[:inner] + (None, None) + da[len(da) - outer:])


def _like(op: LinearOperator) -> Tensor:
    return torch.empty(0, dtype=op.dtype, device=op.device)


def _summed_weight_uses(terms: list[Term], mean: Tensor) -> list[Term]:
    """Several uses of one weight (a recurrent cell's steps, its gates) as one term on the weight's entries, whose
    map is the sum of the uses' maps; the cross-covariances of the uses are then in that one map.  Uses whose map
    would be too large per row stay apart (crossed when a covariance is formed)."""
    uses: dict[tuple, list[int]] = {}
    for i, t in enumerate(terms):
        if isinstance(t.noise, (WeightUse, WeightEntries)):
            uses.setdefault((id(t.noise.group), t.noise.weight_key), []).append(i)
    summed: dict[int, Term | None] = {}
    for members in uses.values():
        if len({terms[i].merge_key for i in members}) < 2:
            continue
        # once a weight has summed uses, every later use joins them: a summed map and a separate use never cross
        force = any(isinstance(terms[i].noise, WeightEntries) for i in members)
        maps = [_weight_map(terms[i], mean, force) for i in members]
        if any(m is False for m in maps):
            continue
        present = [m for m in maps if m is not None]
        total = None
        for m in present:
            total = m if total is None else total + m
        first = members[0]
        summed.update({i: None for i in members})
        if total is not None:
            entries = WeightEntries.of(terms[first].noise) if isinstance(terms[first].noise, WeightUse) else \
                terms[first].noise
            width = entries.variance.shape[-1]
            layout = NO_MOVES.then(expand_move((width,), (*mean.shape[:-1], width)))
            summed[first] = Term(entries, layout, MatrixTangent.of(total))
    return [summed[i] if i in summed else t for i, t in enumerate(terms) if summed.get(i, t) is not None]


def _on_common_roots(terms: list[Term], mean: Tensor) -> list[Term]:
    """Terms of a noise that has a matrix map, settled onto the canonical root (moves after the map pushed into it,
    last-dim cuts of elementwise terms as selection matrices), so maps of one noise on one root add.  A map whose
    moves cannot be pushed without collapsing it is left as it is."""
    mapped = {id(t.noise) for t in terms if t.jacobian is not None}
    if not mapped:
        return terms
    out = []
    for t in terms:
        if t.jacobian is not None and not _settles(t):
            out.append(t)
            continue
        if id(t.noise) in mapped and (t.after or t.jacobian is None):
            t = settled(t, mean)
            if t is not None and t.jacobian is None and t.layout.moves and _cuts_last(t.layout.moves[-1][0]):
                t = _as_selection(t, mean)
        if t is not None:
            out.append(t)
    return out


def _settles(t: Term) -> bool:
    """Every move after the term's map can be pushed into it (rows, last-dim cuts, copies of one feature)."""
    return all(m.rows_only or m.kind in ("slice", "pad") or m.kind == "expand" and statically_known_true(
        t.jacobian.out_size == 1) for m, _ in t.after.moves)


def _as_selection(t: Term, mean: Tensor) -> Term:
    """An elementwise term whose layout ends in last-dim cuts, as a matrix map (the cuts' selection matrices) on
    the uncut root."""
    layout, cuts = _canonical_root(t, mean)
    selections = tuple(_selection(move, mean) for move, _ in cuts)
    scale = None if isinstance(t.scale, float) and t.scale == 1.0 else t.scale
    return Term(t.noise, layout, MatrixTangent(selections, (None,) * len(selections) + (scale,)))


def _weight_map(t: Term, mean: Tensor, force: bool = False) -> Tensor | None | bool:
    """The per-row map (..., C, k * m) of a use of a weight ``u = a @ dW`` from the weight's entries:
    ``D[c, (k, m)] = a_k J[c, m]`` with ``J`` the use's map (scale and cuts included); None for a zero term,
    False where it is over the budget (unless ``force``) or cannot be formed."""
    use = t.noise
    t = settled(t, mean)
    if t is None:
        return None
    if t.noise is not use:  # collapsed when settled (its features moved where a map cannot follow)
        return False
    if not isinstance(use, WeightEntries):
        k, m = use.weight_var.shape[-2:]
        if not force and mean.shape[-1] * k * m > _ROW_MAP_BUDGET:
            return False
    layout, cuts = _canonical_root(t, mean)
    if not layout.rows_only:  # entries found by moving index tensors (a transpose of the features, say)
        if isinstance(use, WeightEntries):
            return False
        _, cols, inputs = _located(t.layout, use, mean)
        column = (cols.unsqueeze(-1) == torch.arange(1, m + 1, device=mean.device)).to(mean.dtype)
        out = _dense_with_scale(t, mean) @ (inputs.unsqueeze(-1) * column.unsqueeze(-2)).flatten(-2)
        rows = (*mean.shape[:-1], *out.shape[-2:])
        return out if same_shape(out.shape, rows) else out.expand(rows)
    j = _dense_with_scale(replace(t, layout=layout), mean) if t.jacobian is not None or not cuts else \
        diagonal_matrix(broadcast_to(_numeric(t.scale, mean) * torch.ones_like(mean), mean.shape))
    selection = None
    for move, _ in cuts:
        cut = _selection(move, mean)
        selection = cut if selection is None else cut @ selection
    if selection is not None:
        j = j @ selection
    if isinstance(use, WeightEntries):
        out = j
    else:
        inputs = layout.apply(use.inputs)
        out = (inputs.unsqueeze(-2).unsqueeze(-1) * j.unsqueeze(-2)).flatten(-2)
    rows = (*mean.shape[:-1], *out.shape[-2:])
    return out if same_shape(out.shape, rows) else out.expand(rows)


def combine(mean: Tensor, terms: Sequence[tuple[object, object]]) -> Moment | Tensor:
    """``sum_i d_i * x_i`` linearised: each random ``x_i``'s maps scaled by its partial derivative ``d_i``."""
    out: list[Term] = []
    for derivative, x in terms:
        if is_random(x):
            x = x.broadcast_to(mean.shape)
            scaled = x.scaled(mean, derivative)
            if is_random(scaled):
                out.extend(scaled.terms)
    return merged(mean, out)


# ---------------------------------------------------------------------------------------------------------------
# Settling a matrix map, and forming (co)variances
# ---------------------------------------------------------------------------------------------------------------


def settled(t: Term, mean: Tensor | None = None) -> Term | None:
    """The term with its moves after ``J`` pushed into ``J`` and the root (rows moved, last-dim slices and pads as
    selection matrices).  A move of the last dimension into another axis cannot be pushed: the part of the term
    before it is collapsed into a fresh diagonal noise (its exact marginal variance, independent of the rest)."""
    if t.jacobian is None or not t.after:
        return t
    jacobian, layout = t.jacobian, t.layout
    for i, (move, tail) in enumerate(t.after.moves):
        if move.rows_only:
            if not jacobian.is_shared_matrix:
                jacobian = MatrixTangent.of(move.apply(_dense_per_row(jacobian, layout, t.noise), tail + 1))
            layout = layout.then(move, tail)
            if layout is None:  # the rows it reaches are padding: the term is zero
                return None
        elif move.kind in ("slice", "pad"):  # of the last dim: a selection (or embedding) matrix on the left
            jacobian = jacobian.then(_selection(move, jacobian.matrices[-1]))
        elif move.kind == "expand" and statically_known_true(jacobian.out_size == 1):  # copies of one feature
            shape = move.args[0]
            like = jacobian.matrices[-1]
            jacobian = jacobian.then(torch.ones(shape[-1], 1, dtype=like.dtype, device=like.device))
            current = layout.apply(t.noise.variance).shape[:-1]
            if not same_shape(current, shape[:-1]):  # what is left moves rows only
                rows = expand_move((*current, shape[-1]), shape)
                if not jacobian.is_shared_matrix:
                    jacobian = MatrixTangent.of(rows.apply(_dense_per_row(jacobian, layout, t.noise), tail + 1))
                layout = layout.then(rows, tail)
        elif (split := _split_of_last(move)) is not None:  # new rows cut from the features: J's rows reshaped
            dense = _dense_per_row(jacobian, layout, t.noise)
            rows = dense.shape[:-2]
            jacobian = MatrixTangent.of(dense.reshape(*rows, *split, dense.shape[-1]))
            root = (*rows, dense.shape[-1])
            ones = (*rows, *(1 for _ in split[:-1]), dense.shape[-1])
            layout = layout.then(reshape_move(root, ones), tail).then(
                expand_move(ones, (*rows, *split[:-1], dense.shape[-1])), tail)
        else:
            before = Term(t.noise, layout, jacobian)
            variance = _cross(before, before, jacobian.matrices[-1], full=False) if _meets_across_rows(before) \
                else _term_variance(before)
            rest = Layout(t.after.moves[i:])
            return Term(Noise(variance), rest, None, NO_MOVES, t.scale)
    return Term(t.noise, layout, jacobian, NO_MOVES, t.scale, t.shared)


def _split_of_last(move: Move) -> tuple | None:
    """The new trailing dims (..., k, c) of a reshape that only splits the last dimension, else None."""
    if move.kind != "reshape" or move.rows_only:
        return None
    shape_in, shape_out = move.args
    rows = len(shape_in) - 1
    if len(shape_out) <= len(shape_in) or not same_shape(shape_in[:rows], shape_out[:rows]):
        return None
    split = tuple(shape_out[rows:])
    size = 1
    for d in split:
        size = size * d
    return split if statically_known_true(size == shape_in[-1]) else None


def _selection(move: Move, like: Tensor) -> Tensor:
    """The matrix of a slice or pad of the last dimension: (size after, size before)."""
    if move.kind == "slice":
        _, start, end, step, size = move.args
        return aten.slice.Tensor(torch.eye(size, dtype=like.dtype, device=like.device), 0, start, end, step)
    _, before, after, size = move.args
    return padding_matrix(size, before, after, like)


def padding_matrix(size: int, before: int, after: int, like: Tensor) -> Tensor:
    """The ``(before + size + after, size)`` matrix that pads a vector with zeros (negative amounts crop)."""
    return F.pad(torch.eye(size, dtype=like.dtype, device=like.device), [0, 0, before, after])


def _canonical_root(t: Term, like: Tensor) -> tuple[Layout, tuple[tuple[Move, int], ...]]:
    """The root layout without its trailing slices and pads of the last dimension, and those cuts (innermost
    first; each becomes a selection matrix): maps of one noise cut into pieces (a GRU's gates) then share one root
    and add."""
    moves = list(t.layout.moves)
    cuts: list[tuple[Move, int]] = []
    while moves and _cuts_last(moves[-1][0]):
        cuts.insert(0, moves.pop())
    return Layout(tuple(moves)), tuple(cuts)


def _dense_per_row(jacobian: MatrixTangent, layout: Layout, noise: Noise) -> Tensor:
    """The dense Jacobian expanded to the root's rows (a row move needs every row's matrix)."""
    j = jacobian.dense()
    rows = layout.apply(noise.variance).shape[:-1]
    return j if same_shape(j.shape[:-2], rows) else j.expand(*rows, *j.shape[-2:])


def _root_of(t: Term) -> tuple[Tensor, Tensor | None]:
    """(root variance, root covariance or None)."""
    if t.noise.row_covariance is not None:
        cov = _moved_rows(t.layout, t.noise.row_covariance)
        return torch.diagonal(cov, dim1=-2, dim2=-1), cov
    return t.layout.apply(t.noise.variance), None


def _term_variance(t: Term) -> Tensor:
    """The elementwise variance of one term."""
    t = settled(t)
    var, cov = _root_of(t)
    if t.jacobian is None:
        if cov is not None and not t.layout.rows_only:  # pragma: no cover - collapsed before such moves
            raise AssertionError("a dense root moved across its last dimension")
        return _times(_squared(t.scale), var) if not (isinstance(t.scale, float) and t.scale == 1.0) else var
    if cov is not None:
        j = t.jacobian.dense()
        out = ((j @ cov) * j).sum(-1)
    else:
        out = _matrix_variance(t.jacobian, var)
    return out if isinstance(t.scale, float) and t.scale == 1.0 else _times(_squared(t.scale), out)


def _matrix_variance(jacobian: MatrixTangent, var: Tensor) -> Tensor:
    """``diag(J diag(v) J^T) = (J * J) v``; for ``J = diag(r) M diag(c)`` with one shared ``M``:
    ``r^2 (M * M) (c^2 v)``, without a per-row matrix."""
    jacobian, cols = jacobian.without_cols()
    v = var if cols is None else var * (cols * cols)
    if len(jacobian.matrices) == 1:
        (m,), (_, rows) = jacobian.matrices, jacobian.diagonals
        out = _squared_factor(m, v)
        return out if rows is None else _times(_squared(rows), out)
    j = jacobian.dense()
    return ((j * j) @ v.unsqueeze(-1)).squeeze(-1)


def _term_covariance(t: Term, mean: Tensor) -> Tensor:
    t = settled(t, mean)
    var, cov = _root_of(t)
    if t.jacobian is None:
        if cov is not None:
            out = cov
        else:
            return diagonal_matrix(broadcast_to(_times(_squared(t.scale), var) if isinstance(t.scale, Tensor) else
                                                (t.scale * t.scale) * var, mean.shape))
    else:
        jacobian, cols = t.jacobian.without_cols()
        j = jacobian.dense()
        if cov is not None:
            if cols is not None:
                cov = cov * _row(cols) * _col(cols)
            out = j @ cov @ j.mT
        else:
            v = var if cols is None else var * (cols * cols)
            out = (j * v.unsqueeze(-2)) @ j.mT
    if isinstance(t.scale, float):
        return out if t.scale == 1.0 else (t.scale * t.scale) * out
    s = _numeric(t.scale, mean)
    s = broadcast_to(s, mean.shape)
    return s.unsqueeze(-1) * out * s.unsqueeze(-2)


def _meets_across_rows(t: Term, full: bool = True) -> bool:
    """A term whose last dim holds entries that are not independent: entries that rows brought into the last dim
    (a reduction over positions) on a root of the uses of one weight noise by every row, or copies of one entry (a
    bias broadcast to every position or along the features, an embedding looked up twice); with a matrix map
    after, or without one where the covariance (``full``) is formed.  Its second moments must pair the entries that
    meet (``_cross`` of the term with itself); the plain ``J diag(v) J^T`` (or ``diag(v)``) would take them
    independent.  Without a map, the variances need no pairing."""
    if t.layout.rows_only or (t.jacobian is None and not full):
        return False
    if isinstance(t.noise, WeightUse):
        return True
    copied = False  # copies meet in the last dim where they are made there, or rows are moved into it after them
    for move, _ in t.layout.moves:
        if move.kind in ("expand", "embedding"):
            if not move.rows_only:
                return True
            copied = True
        elif copied and not move.rows_only:
            return True
    return False


def _cross(a: Term, b: Term, mean: Tensor, full: bool) -> Tensor | None:
    """The covariance between two terms of one group (its diagonal unless ``full``), or None where it is not
    tracked (a dense-covariance root, noises of different shapes, a correlation not modelled).  With ``a is b``:
    the term's own second moment, for terms that meet across rows (``_meets_across_rows``)."""
    if a.noise.row_covariance is not None or b.noise.row_covariance is not None:
        return None
    a, b = settled(a, mean), settled(b, mean)
    c = a.noise.cross_variance(b.noise)
    if c is None:
        return None
    elementwise = a.jacobian is None and b.jacobian is None
    if a.layout.key == b.layout.key and not (_meets_across_rows(a, full) or _meets_across_rows(b, full)):
        c = a.layout.apply(c)
        if elementwise and not full:
            return _times(_times(_numeric(a.scale, mean), _numeric(b.scale, mean)), c)
        ja, jb = _dense_with_scale(a, mean), _dense_with_scale(b, mean)
        return (ja * c.unsqueeze(-2)) @ jb.mT if full else ((ja * c.unsqueeze(-2)) * jb).sum(-1)
    if isinstance(a.noise, WeightUse):
        return _weight_use_cross(a, b, mean, full)
    if not same_shape(a.noise.variance.shape, b.noise.variance.shape):
        return None
    # different layouts: entries meet where both layouts pick the same noise entry (moved index tensors)
    shape = c.shape
    index = torch.arange(1, c.numel() + 1, device=mean.device).reshape(shape)
    ia, ib, ca = a.layout.apply(index), b.layout.apply(index), a.layout.apply(c)
    if elementwise and not full:
        sa, sb = _numeric(a.scale, mean), _numeric(b.scale, mean)
        return _times(_times(sa, sb), ca * (ia == ib).to(mean.dtype))
    meet = (ia.unsqueeze(-1) == ib.unsqueeze(-2)).to(mean.dtype) * ca.unsqueeze(-1)  # (..., R_a, R_b)
    ja, jb = _dense_with_scale(a, mean), _dense_with_scale(b, mean)
    cross = ja @ meet @ jb.mT
    return cross if full else torch.diagonal(cross, dim1=-2, dim2=-1)


def _located(layout: Layout, use: WeightUse, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Where each entry of ``layout(a @ dW)`` comes from: its row of ``a`` and its column ``m`` (1-based, 0 for
    padding; index tensors moved with the layout), and that row's input ``a_r`` (zeros for padding)."""
    rows_shape = use.inputs.shape[:-1]
    width = use.weight_var.shape[-1]
    shape = (*rows_shape, width)
    rows = torch.arange(1, use.inputs[..., 0].numel() + 1, device=like.device).reshape(*rows_shape, 1)
    cols = torch.arange(1, width + 1, device=like.device)
    r, c = layout.apply(rows.expand(shape)), layout.apply(cols.expand(shape))
    gathered = F.embedding((r - 1).clamp_min(0), use.inputs.reshape(-1, use.inputs.shape[-1]))
    return r, c, gathered * (r > 0).unsqueeze(-1).to(like.dtype)


def _weight_use_cross(a: Term, b: Term, mean: Tensor, full: bool) -> Tensor:
    """Two uses of one weight laid out differently (a recurrent cell's time steps): entries ``(r, m)`` and
    ``(r', m')`` meet where ``m = m'``, with ``Cov = sum_k a_rk b_r'k S_km``; rows and columns are found by moving
    index tensors with each layout (0 marks padding)."""
    na = a.noise
    _, ca, xa = _located(a.layout, na, mean)
    _, cb, xb = _located(b.layout, b.noise, mean)
    weight = F.embedding((ca - 1).clamp_min(0), na.weight_var.mT)  # S[:, m] per entry
    if a.jacobian is None and b.jacobian is None and not full:
        same = ((ca == cb) & (ca > 0)).to(mean.dtype)
        return _times(_times(_numeric(a.scale, mean), _numeric(b.scale, mean)), (xa * xb * weight).sum(-1) * same)
    meet = ((ca.unsqueeze(-1) == cb.unsqueeze(-2)) & (ca > 0).unsqueeze(-1)).to(mean.dtype)
    meet = meet * ((xa * weight) @ xb.mT)  # (..., R_a, R_b)
    ja, jb = _dense_with_scale(a, mean), _dense_with_scale(b, mean)
    cross = ja @ meet @ jb.mT
    return cross if full else torch.diagonal(cross, dim1=-2, dim2=-1)


def _dense_with_scale(t: Term, mean: Tensor) -> Tensor:
    """The term's map per row as a dense matrix (..., C, R)."""
    if t.jacobian is None:
        s = broadcast_to(_numeric(t.scale, mean) * torch.ones_like(mean), mean.shape)
        return diagonal_matrix(s)
    j = t.jacobian.dense()
    return j if isinstance(t.scale, float) and t.scale == 1.0 else _row(_numeric(t.scale, mean)) * j


def _grouped(terms: Sequence[Term]) -> list[list[Term]]:
    groups: dict[int, list[Term]] = {}
    for t in terms:
        groups.setdefault(id(t.noise.group), []).append(t)
    return list(groups.values())


def _pooled(terms: Sequence[Term]) -> list[Term]:
    """Terms that apply one map to different diagonal noises, as one term on the sum of their root variances
    (``J diag(v_1) J^T + J diag(v_2) J^T = J diag(v_1 + v_2) J^T``): a weight noise and its bias through the
    same layers cost one product."""
    buckets: dict[tuple, list[Term]] = {}
    out: list[Term] = []
    for t in terms:
        if t.jacobian is None or t.noise.row_covariance is not None:
            out.append(t)
            continue
        scale_key = id(t.scale) if isinstance(t.scale, Tensor) else t.scale
        buckets.setdefault((id(t.jacobian), scale_key), []).append(t)
    for bucket in buckets.values():
        if len(bucket) == 1:
            out.extend(bucket)
            continue
        total = None
        for t in bucket:
            root = t.layout.apply(t.noise.variance)
            total = root if total is None else total + root
        out.append(Term(Noise(total), NO_MOVES, bucket[0].jacobian, NO_MOVES, bucket[0].scale))
    return out


def _variance(mean: Tensor, terms: Sequence[Term]) -> Tensor:
    total = _second_moments(mean, terms, full=False)
    return torch.zeros_like(mean) if total is None else total


def _covariance(mean: Tensor, terms: Sequence[Term]) -> Tensor:
    total = _second_moments(mean, terms, full=True)
    return mean.new_zeros(*mean.shape, mean.shape[-1]) if total is None else total


def _second_moments(mean: Tensor, terms: Sequence[Term], full: bool) -> Tensor | None:
    """Each term's (co)variance (terms that share a map pooled), plus the cross-covariances within noise groups."""
    if not full and mean.dim() >= 3 and any(t.jacobian is not None and t.jacobian.has_operator for t in terms):
        # maps over the flattened entries (a convolution network's): the variances there, laid out like the mean
        flat = mean.reshape(mean.shape[0], -1)
        moved = Moment(mean, tuple(terms)).moved(flat, reshape_move(mean.shape, flat.shape))
        total = _second_moments(flat, moved.terms, False) if is_random(moved) else None
        return None if total is None else total.reshape(mean.shape)
    terms = [s for s in (settled(t, mean) for t in _summed_weight_uses(list(terms), mean)) if s is not None]
    total = None
    for a in _pooled([t for t in terms if not _meets_across_rows(t, full)]):
        part = _term_covariance(a, mean) if full else _term_variance(a)
        total = part if total is None else total + part
    for a in (t for t in terms if _meets_across_rows(t, full)):
        part = broadcast_to(_cross(a, a, mean, full=full), (*mean.shape, mean.shape[-1]) if full else mean.shape)
        total = part if total is None else total + part
    for group in _grouped(terms):
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                cross = _cross(a, b, mean, full=full)
                if cross is not None:
                    total = total + (cross + cross.mT if full else 2.0 * cross)
    return total
