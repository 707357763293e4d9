"""Data movement: views, reshapes, permutations, indexing, concatenation, copies.

These ops move elements without arithmetic, so the variance follows the mean (diag: the same op on the
variance; exact).  In full mode the covariance over the last dimension moves with the leading dimensions while
the op leaves the last dimension intact (exact); slicing or concatenating along the last dimension selects or
block-diagonalises the covariance (exact).  An op that builds a new last dimension out of other dimensions
(a flattening view, a permutation that moves the last axis) keeps only the variances on it: the
cross-covariances the new axis would need were never tracked.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .moment import MatrixTangent, Moment, diagonal_matrix, is_random, promote, same_shape, sum_of_parts
from .shared_weight import Tags, permuted, regroup, transposed
from .registry import RuleContext, register

aten = torch.ops.aten


def def_structural(
    op, full_cov: Callable[..., Tensor | None] | None = None, var_op=None,
    moved_tags: Callable[..., Tags | None] | None = None, relabels_rows: bool = False,
) -> Callable:
    """Register a data-movement rule: ``op`` on the mean and ``var_op`` (default ``op``) on the variance.

    ``full_cov(cov, mean_out, *args)`` gives the moved covariance in full mode, or ``None`` when the op
    changes the last dimension (then only the variances are moved).  ``moved_tags(tags, mean_in, mean_out, *args)``
    tells how the op moves the dimensions of a projection's shared weight noise (``shared_weight.py``); ops
    without it drop that noise (the token-wise variance stays exact).  ``relabels_rows``: the op only regroups
    rows (a reshape or copy that keeps the last dimension), so a matrix tangent moves with the mean and keeps
    its root."""
    var_op = var_op or op

    def rule(ctx: RuleContext, x: Moment, *args, **kwargs) -> Moment:
        mean = op(x.mean, *args, **kwargs)
        if relabels_rows and same_shape(mean.shape[-1:], x.mean.shape[-1:]) and x.tracked:
            return sum_of_parts([_relabelled(p, x.mean, mean, var_op, args, kwargs) for p in x.all_parts()])
        x = x.materialised()
        if not x.full:
            shared = None
            if x.shared is not None and moved_tags is not None:
                move = lambda t: var_op(t, *args, **kwargs)  # noqa: E731
                shared = x.shared.moved(move, moved_tags(x.shared.tags, x.mean, mean, *args, **kwargs))
            return Moment(mean, var_op(x.var, *args, **kwargs), False, shared=shared)
        cov = full_cov(x.var, mean, *args, **kwargs) if full_cov is not None else None
        if cov is None:
            cov = diagonal_matrix(var_op(x.variance(), *args, **kwargs))
        return Moment(mean, cov, True)

    rule.__name__ = f"move_{op.__name__.replace('.', '_')}"
    rule.__doc__ = f"{op}: the variance follows the mean."
    register(op, raw=True)(rule)
    return rule


def _relabelled(part: Moment, before: Tensor, after: Tensor, var_op, args, kwargs) -> Moment:
    """One noise of a moment whose rows are regrouped: the tangent moves with the mean, the root stays (it is
    brought to the new rows when materialised), so other uses of the root still recognise it."""
    tangent = part.tangent
    if isinstance(tangent, MatrixTangent) and not tangent.is_shared_matrix:
        j = tangent.dense()
        tangent = MatrixTangent.of(j.expand(*before.shape, j.shape[-1]).reshape(*after.shape, j.shape[-1]))
    elif isinstance(tangent, Tensor) and same_shape(tangent.shape, before.shape):
        tangent = var_op(tangent, *args, **kwargs)
    elif isinstance(tangent, Tensor) and tangent.dim() > 1:  # a partly broadcast Jacobian: materialise it
        tangent = var_op(tangent.expand(before.shape), *args, **kwargs)
    return Moment(after, part.var, part.full, tangent)


def _reshaped_tags(tags: Tags, mean_in: Tensor, mean_out: Tensor, *args, **kwargs) -> Tags | None:
    return regroup(tags, mean_in.shape, mean_out.shape)


def _same_tags(tags: Tags, *args, **kwargs) -> Tags:
    return tags


def _last(dim: int, ndim: int) -> bool:
    return dim % ndim == ndim - 1


def _same_op(op):
    """Full-mode rule for ops that act on storage only (copies, casts): apply them to the covariance."""
    return lambda cov, mean, *args, **kwargs: op(cov, *args, **kwargs)


def _view_cov(cov: Tensor, mean: Tensor, *args) -> Tensor | None:
    if mean.dim() == 0 or not same_shape(mean.shape[-1:], cov.shape[-1:]):
        return None
    return cov.reshape(*mean.shape, cov.shape[-1])


def _permute_cov(cov: Tensor, mean: Tensor, dims) -> Tensor | None:
    n = mean.dim()
    dims = [d % n for d in dims]
    return cov.permute(*dims, n) if dims[-1] == n - 1 else None


def _transpose_cov(cov: Tensor, mean: Tensor, dim0: int, dim1: int) -> Tensor | None:
    n = mean.dim()
    if _last(dim0, n) or _last(dim1, n):
        return None
    return cov.transpose(dim0 % n, dim1 % n)


def _unsqueeze_cov(cov: Tensor, mean: Tensor, dim: int) -> Tensor | None:
    n = mean.dim()
    return None if _last(dim, n) else cov.unsqueeze(dim % n)


def _squeeze_cov(cov: Tensor, mean: Tensor, dims=None) -> Tensor | None:
    n_in = cov.dim() - 1
    if dims is None:
        dims = [d for d in range(n_in) if statically_known_true(cov.shape[d] == 1)]
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [d % n_in for d in dims if statically_known_true(cov.shape[d % n_in] == 1)]
    if n_in - 1 in dims:
        return None
    return cov.squeeze(dims) if dims else cov


def _select_cov(cov: Tensor, mean: Tensor, dim: int, index) -> Tensor | None:
    n_in = cov.dim() - 1
    return None if _last(dim, n_in) else cov.select(dim % n_in, index)


def _slice_cov(cov: Tensor, mean: Tensor, dim: int = 0, start=None, end=None, step=1) -> Tensor:
    n_in = cov.dim() - 1
    if _last(dim, n_in):
        rows = aten.slice.Tensor(cov, n_in - 1, start, end, step)
        return aten.slice.Tensor(rows, n_in, start, end, step)
    return aten.slice.Tensor(cov, dim % n_in, start, end, step)


def _expand_cov(cov: Tensor, mean: Tensor, *args, **kwargs) -> Tensor:
    # Expanding a size-1 last dim makes perfectly correlated copies: (..., 1, 1) -> (..., C, C) is exact.
    return cov.expand(*mean.shape, mean.shape[-1])


for _op in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
    # a variance computed by another route may not share the mean's memory layout: reshape, never view
    def_structural(_op, _view_cov, var_op=aten.reshape.default, moved_tags=_reshaped_tags, relabels_rows=True)
def_structural(aten.permute.default, _permute_cov, moved_tags=lambda tags, x, y, dims: permuted(tags, dims))
def_structural(aten.transpose.int, _transpose_cov, moved_tags=lambda tags, x, y, d0, d1: transposed(tags, d0, d1))
def_structural(aten.t.default, moved_tags=lambda tags, x, y: tags[::-1])
def_structural(aten.unsqueeze.default, _unsqueeze_cov, moved_tags=_reshaped_tags)
for _op in (aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims):
    def_structural(_op, _squeeze_cov, moved_tags=_reshaped_tags)
def_structural(aten.select.int, _select_cov, moved_tags=lambda tags, x, y, dim, index: tags[:dim % len(tags)] + tags[dim % len(tags) + 1:])
slice_ = def_structural(aten.slice.Tensor, _slice_cov, moved_tags=_same_tags)
def_structural(aten.expand.default, _expand_cov, moved_tags=lambda tags, x, y, *a, **k: (frozenset(),) * (y.dim() - x.dim()) + tags)
for _op in (aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default):
    def_structural(_op, _same_op(_op), moved_tags=_same_tags, relabels_rows=True)
def_structural(aten._to_copy.default, _same_op(aten._to_copy.default))  # a cast would cast the index tensors


@register(aten.dropout.default, raw=True)
def dropout(ctx: RuleContext, x: Moment, p: float = 0.5, train: bool = False) -> Moment:
    """Dropout at inference is the identity."""
    return x


@register(aten.cat.default)
def cat(ctx: RuleContext, tensors: list, dim: int = 0) -> Moment:
    """Concatenation; deterministic parts get zero variance.  Along the last dimension in full mode the
    covariance is block diagonal: exact for independent parts, while parts cut from one random tensor
    (``cat(x.split(...)[::-1])``) lose their cross-covariance (their diagonals stay exact)."""
    mean = aten.cat.default([t.mean if is_random(t) else t for t in tensors], dim)
    kinds = promote(*(t for t in tensors if is_random(t)))
    full = kinds[0].full
    it = iter(kinds)
    parts = [next(it) if is_random(t) else None for t in tensors]
    if not full:
        return Moment(mean, aten.cat.default([p.var if p else torch.zeros_like(t) for p, t in zip(parts, tensors)], dim), False)
    covs = [p.var if p else t.new_zeros(*t.shape, t.shape[-1]) for p, t in zip(parts, tensors)]
    if not _last(dim, mean.dim()):
        return Moment(mean, aten.cat.default(covs, dim % mean.dim()), True)
    sizes = [c.shape[-1] for c in covs]
    total, start, rows = sum(sizes), 0, []
    for c, size in zip(covs, sizes):
        rows.append(F.pad(c, (start, total - start - size)))
        start += size
    return Moment(mean, torch.cat(rows, dim=-2), True)


@register(aten.split_with_sizes.default, aten.split.Tensor)
def split(ctx: RuleContext, x: Moment, split_size, dim: int = 0) -> list[Moment]:
    """Split as a list of slices (each exact)."""
    size = x.mean.shape[dim]
    sizes = split_size if isinstance(split_size, (list, tuple)) else [split_size] * -(-size // split_size)
    out, start = [], 0
    for s in sizes:
        end = min(start + s, size)
        out.append(slice_(ctx, x, dim, start, end))
        start = end
    return out


@register(operator.getitem)
def getitem(ctx: RuleContext, values, index):
    """Element ``index`` of a multi-output op's results."""
    return values[index]


@register(aten.embedding.default)
def embedding(ctx: RuleContext, weight: Moment, indices, padding_idx: int = -1, scale_grad_by_freq=False, sparse=False):
    """A lookup in a random table: the rows' variances are looked up with them (entries independent: exact
    for a diagonal posterior; full mode gets the diagonal covariance of the looked-up entries)."""
    mean = aten.embedding.default(weight.mean, indices, padding_idx)
    var = aten.embedding.default(weight.variance(), indices, padding_idx)
    return Moment(mean, diagonal_matrix(var) if ctx.covariance == "full" else var, ctx.covariance == "full")
