"""Data movement: views, reshapes, permutations, indexing, concatenation, copies.

These ops move elements without arithmetic, so every map moves with the mean and no noise is touched (exact):
an elementwise map records the move in its layout, a matrix map after its matrix (``Moment.moved``).  Copies
(``clone``, ``alias``, ``detach``, casts, dropout at inference) return the same maps, so ``h * h.clone()`` is a
product of one value with itself.  Concatenation pads each operand's maps with zeros along the new dimension.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
from torch import Tensor

from .moment import (
    Move, Moment, embedding_move, expand_move, flat_map, maps_over_entries, merged, pad_move, padding_matrix,
    permute_move, reshape_move, select_move, slice_move,
)
from .operators import SeparableOperator
from .registry import RuleContext, register
from .shared_weight import Tags, permuted, regroup, transposed

aten = torch.ops.aten


def def_structural(
    op, move: Callable[..., Move], moved_tags: Callable[..., Tags | None] | None = None,
) -> Callable:
    """Register a data-movement rule: ``op`` on the mean, ``move(mean_in, mean_out, *args)`` on every map.
    ``moved_tags(tags, mean_in, mean_out, *args)`` tells how the op moves a projection's shared weight noise
    (``shared_weight.py``); ops without it drop that noise (the token-wise variance stays exact)."""

    def rule(ctx: RuleContext, x: Moment, *args, **kwargs) -> Moment:
        mean = op(x.mean, *args, **kwargs)
        step = move(x.mean, mean, *args, **kwargs)
        shared_move = None
        if moved_tags is not None:
            def shared_move(shared):
                return shared.moved(step.apply, moved_tags(shared.tags, x.mean, mean, *args, **kwargs))
        return x.moved(mean, step, shared_move=shared_move)

    rule.__name__ = f"move_{op.__name__.replace('.', '_')}"
    rule.__doc__ = f"{op}: every map moves with the mean."
    register(op, whole=True)(rule)
    return rule


def def_copy(*ops) -> None:
    """Ops that copy or relabel storage (clone, alias, detach, casts): the same maps (moments are not gradients,
    so ``detach`` keeps them too)."""
    for op in ops:

        def rule(ctx: RuleContext, x: Moment, *args, _op=op, **kwargs) -> Moment:
            return x.with_mean(_op(x.mean, *args, **kwargs))

        rule.__name__ = f"copy_{op.__name__.replace('.', '_')}"
        rule.__doc__ = f"{op}: a copy; the same maps and noises."
        register(op, whole=True, reads="entrywise")(rule)


def _reshaped(x: Tensor, y: Tensor, *args, **kwargs) -> Move:
    return reshape_move(x.shape, y.shape)


def _reshaped_tags(tags: Tags, mean_in: Tensor, mean_out: Tensor, *args, **kwargs) -> Tags | None:
    return regroup(tags, mean_in.shape, mean_out.shape)


def _same_tags(tags: Tags, *args, **kwargs) -> Tags:
    return tags


def _transpose_move(x: Tensor, y: Tensor, dim0: int, dim1: int) -> Move:
    order = list(range(x.dim()))
    a, b = dim0 % x.dim(), dim1 % x.dim()
    order[a], order[b] = order[b], order[a]
    return permute_move(order, x.shape)


for _op in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
    def_structural(_op, _reshaped, moved_tags=_reshaped_tags)
def_structural(aten.unsqueeze.default, _reshaped, moved_tags=_reshaped_tags)
for _op in (aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims):
    def_structural(_op, _reshaped, moved_tags=_reshaped_tags)
def_structural(aten.permute.default, lambda x, y, dims: permute_move(dims, x.shape),
               moved_tags=lambda tags, x, y, dims: permuted(tags, dims))
def_structural(aten.transpose.int, _transpose_move, moved_tags=lambda tags, x, y, d0, d1: transposed(tags, d0, d1))
def_structural(aten.t.default, lambda x, y: permute_move(list(range(x.dim()))[::-1], x.shape),
               moved_tags=lambda tags, x, y: tags[::-1])
def_structural(aten.select.int, lambda x, y, dim, index: select_move(x.dim(), dim, index),
               moved_tags=lambda tags, x, y, dim, index: tags[:dim % len(tags)] + tags[dim % len(tags) + 1:])
slice_ = def_structural(aten.slice.Tensor, lambda x, y, dim=0, start=None, end=None, step=1:
                        slice_move(x.dim(), dim, start, end, step, x.shape[dim]), moved_tags=_same_tags)
def_structural(aten.expand.default, lambda x, y, *args, **kwargs: expand_move(x.shape, y.shape),
               moved_tags=lambda tags, x, y, *a, **k: (frozenset(),) * (y.dim() - x.dim()) + tags)
COPIES = (aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
          aten._to_copy.default)
def_copy(*COPIES)


@register(aten.dropout.default, reads="entrywise")
def dropout(ctx: RuleContext, x: Moment, p: float = 0.5, train: bool = False) -> Moment:
    """Dropout at inference is the identity."""
    return x


IDENTITIES = frozenset(COPIES) | {aten.dropout.default}  # a value passes through these unchanged


@register(aten.cat.default, whole=True)
def cat(ctx: RuleContext, tensors: list, dim: int = 0) -> Moment:
    """Concatenation: each operand's maps padded with zeros to the output (exact; operands cut from one random
    tensor, ``cat(x.split(...)[::-1])``, keep their noise and so their cross-covariance)."""
    means = [t.mean if isinstance(t, Moment) else t for t in tensors]
    mean = aten.cat.default(means, dim)
    ndim = mean.dim()
    axis = dim % ndim
    total, offset, terms = mean.shape[axis], 0, []
    # full mode, operands carrying maps over their flattened entries (a convolution network's): as operators
    over_images = ctx.keeps_maps and ndim >= 3 and axis >= 1 and any(
        maps_over_entries(t, operator_found=True) for t in tensors) and all(
        maps_over_entries(t) for t in tensors if isinstance(t, Moment))
    for t, m in zip(tensors, means):
        size = m.shape[axis]
        if isinstance(t, Moment) and over_images:
            placed = padding_matrix(size, offset, total - offset - size, mean)
            operator = SeparableOperator([placed, *m.shape[axis + 1:]], m.shape[1:axis].numel(), m)
            moved = flat_map(t, mean, operator)
            terms.extend(moved.terms if isinstance(moved, Moment) else ())
        elif isinstance(t, Moment):
            moved = t.moved(mean, pad_move(ndim, axis, offset, total - offset - size, size))
            terms.extend(moved.terms)
        offset = offset + size
    return merged(mean, terms)


@register(aten.split_with_sizes.default, aten.split.Tensor, whole=True)
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


@register(aten.embedding.default, whole=True)
def embedding(ctx: RuleContext, weight: Moment, indices, padding_idx: int = -1, scale_grad_by_freq=False,
              sparse=False):
    """A lookup in a random table: the table's noise is looked up with the rows (exact)."""
    mean = aten.embedding.default(weight.mean, indices, padding_idx)
    return weight.moved(mean, embedding_move(indices))


@register(aten.repeat.default, whole=True)
def repeat(ctx: RuleContext, x: Moment, repeats) -> Moment:
    """Tiling: each dim ``n`` repeated ``r`` times is a new dim of size ``r`` expanded in front of it, then merged
    (exact: the tiles are one noise)."""
    mean = aten.repeat.default(x.mean, repeats)
    shape = (1,) * (len(repeats) - x.mean.dim()) + tuple(x.mean.shape)
    spaced = x.mean.reshape([d for n in shape for d in (1, n)])
    tiled = spaced.expand([d for r, n in zip(repeats, shape) for d in (r, n)])
    out = x.moved(spaced, reshape_move(x.mean.shape, spaced.shape))
    out = out.moved(tiled, expand_move(spaced.shape, tiled.shape))
    return out.moved(mean, reshape_move(tiled.shape, mean.shape))
