"""Convolutional networks: convolutions, and the linear ops over the dims of an image or a sequence.

Two families.

* **Linear maps along a dim** (``along``): reductions (``sum``, ``mean``), pooling by averaging (``avg_pool``,
  ``adaptive_avg_pool``), resampling (nearest and bilinear ``upsample``), ``cumsum``, ``embedding_bag`` (over the
  looked-up rows), and ``sort``/``topk`` (the permutation taken from the mean) each apply a fixed matrix along one
  or two dims.  The matrix is found by applying
  the op itself to an identity (so every option of the op, ``ceil_mode``, ``align_corners``, padding, is honoured
  without being re-derived), and applied as a matrix map: over the last dim every map is kept (exact); another dim
  is moved last and back, which keeps every noise's identity (a bias shared by all positions stays shared) and
  collapses only matrix maps over the last dim in full mode.  Pooling in 2-d is the product of its two 1-d maps:
  PyTorch's divisor (valid rows x valid columns, with or without padding) factorises the same way.
* **Convolution** (``convolution``, 1-d to 3-d, stride, padding, dilation, groups, transposed).  Full mode
  (``_convolution_maps``; every one but a transposed 3-d one): exact, as maps over each image's flattened entries
  whose factors are operators (``operators.py``): the input's maps through the mean kernel, the kernel noise
  through the mean input's patches (shared by every position), the bias broadcast; pooling, resampling, padding,
  reductions over the image, concatenation, max pooling and GroupNorm are operators there too (``flat_map``), so
  the GLM in full mode is autograd's ``J S J^T``.  Diag mode (and a transposed 3-d convolution): the paper's
  linear-layer rule at every output location, computed
  as convolutions, ``Var = conv(m^2, S) + conv(v, M^2) + conv(v, S) + s_b`` (``predictive="glm"``: without
  ``conv(v, S)``), one fresh noise for the weight and input terms, the bias noise kept (shared by every location):
  its output entries are taken independent of each other apart from the bias, so a sum over positions misses
  their correlation through the shared kernel.  A Kronecker-factored kernel posterior (laplace-torch's kron) keeps
  its structure in that variance: the patches are rotated by convolutions with the input eigenvectors as kernels
  (``_kron_weight_variance``; groups 1, not transposed, else its marginal variances).

Max pooling is linearised at the arg-max of the mean (each window's winner is the entry that wins at the mean; good
where the winner is clear, as Monte Carlo agrees then): in full mode a gather of the winners' maps, in diag mode a
fresh noise with the winner's variance.  GroupNorm and InstanceNorm are linearised with their statistics, as
LayerNorm is (``normalisation.py``; GroupNorm's Jacobian an operator in full mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .elementwise import add, mul, second_order_product
from .moment import (
    Layout, MatrixTangent, Moment, Noise, Term, _numeric, broadcast_to, combine, embedding_move, expand_move, flat_map,
    is_random, maps_over_entries, mean_of, merged, pad_move, padding_matrix, permute_move, reshape_move, same_shape,
    slice_move,
)
from .normalisation import _normalised_moment, _per_channel, batch_norm
from .operators import (
    ConvolutionOperator, ConvolutionWeightOperator, GatherOperator, SeparableOperator, StandardisationOperator,
    TransposedConvolutionWeightOperator,
)
from .registry import RuleContext, register
from .weights import KronNoise

aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------------------------
# Linear maps along a dim
# ---------------------------------------------------------------------------------------------------------------


def along(x: Moment, dim: int, matrix: Tensor) -> Moment:
    """``x`` with ``matrix`` (``(out, n)``, or per row ``(..., out, n)`` shaped like x's other dims) applied along
    ``dim``.  The mean of the result is the mapped mean; rules replace it by the plain op's."""
    ndim = x.mean.dim()
    dim = dim % ndim
    if dim == ndim - 1:
        mean = (matrix @ x.mean.unsqueeze(-1)).squeeze(-1)
        return x.left_multiplied(mean, matrix)
    order = [d for d in range(ndim) if d != dim] + [dim]
    inverse = [order.index(d) for d in range(ndim)]
    moved = x.moved(x.mean.permute(order), permute_move(order, x.mean.shape))
    mapped = along(moved, ndim - 1, matrix)
    return mapped.moved(mapped.mean.permute(inverse), permute_move(inverse, mapped.mean.shape))


def _identity_images(n: int, like: Tensor) -> Tensor:
    """``n`` one-hot signals of length ``n`` as ``(n, 1, n)``: an op applied to them gives its matrix, transposed."""
    return torch.eye(n, dtype=like.dtype, device=like.device).unsqueeze(1)


def _matrix_1d(op_1d, n: int, like: Tensor) -> Tensor:
    """The ``(out, n)`` matrix of a linear 1-d op ``(N, 1, n) -> (N, 1, out)``."""
    return op_1d(_identity_images(n, like))[:, 0, :].T.contiguous()


def _keeps_maps_over_images(ctx: RuleContext, x, spatial: int) -> bool:
    """Full mode on a batch of images (N, C, *spatial) whose maps can be flattened (``maps_over_entries``): the op
    is applied as an operator over the flattened entries (``flat_map``)."""
    return ctx.keeps_maps and maps_over_entries(x) and x.mean.dim() == spatial + 2 and spatial >= 1


def _spatial(x: Moment, mean: Tensor, matrices: list[Tensor], ctx: RuleContext | None = None) -> Moment:
    """A separable linear op over the last ``len(matrices)`` dims, one ``(out, n)`` matrix per dim; the mean is the
    plain op's."""
    if ctx is not None and _keeps_maps_over_images(ctx, x, len(matrices)):
        return flat_map(x, mean, SeparableOperator(matrices, x.mean.shape[1], x.mean))
    out = x
    for i, matrix in enumerate(matrices):
        out = along(out, x.mean.dim() - len(matrices) + i, matrix)
    return out.with_mean(mean)


def _per_dim(value, dims: int) -> list:
    value = list(value) if isinstance(value, (list, tuple)) else [value]
    return value * dims if len(value) == 1 else value


def _avg_pool(ctx: RuleContext, x: Moment, mean: Tensor, kernel_size, stride, padding, ceil_mode,
              count_include_pad, divisor_override, dims: int) -> Moment:
    """Each dim's 1-d average pooling matrix; PyTorch's divisor (the window's size, clipped at the padded edge, or
    its valid entries) is the product of the 1-d divisors.  ``divisor_override``: window sums over it."""
    kernel, padding = _per_dim(kernel_size, dims), _per_dim(padding, dims)
    stride = _per_dim(stride, dims) if stride else kernel
    matrices = []
    for i, (k, s, p) in enumerate(zip(kernel, stride, padding)):
        n = x.mean.shape[x.mean.dim() - dims + i]
        matrix = _matrix_1d(lambda t: aten.avg_pool1d.default(t, [k], [s], [p], ceil_mode, count_include_pad), n,
                            x.mean)
        matrices.append((matrix > 0).to(matrix.dtype) if divisor_override else matrix)
    if divisor_override:
        matrices[0] = matrices[0] / divisor_override
    return _spatial(x, mean, matrices, ctx)


@register(aten.avg_pool1d.default, whole=True)
def avg_pool1d(ctx: RuleContext, x: Moment, kernel_size, stride=(), padding=0, ceil_mode=False,
               count_include_pad=True) -> Moment:
    """Average pooling: linear, separable (exact maps)."""
    mean = aten.avg_pool1d.default(x.mean, kernel_size, stride, padding, ceil_mode, count_include_pad)
    return _avg_pool(ctx, x, mean, kernel_size, stride, padding, ceil_mode, count_include_pad, None, dims=1)


@register(aten.avg_pool2d.default, aten.avg_pool3d.default, whole=True)
def avg_pool(ctx: RuleContext, x: Moment, kernel_size, stride=(), padding=0, ceil_mode=False,
             count_include_pad=True, divisor_override=None) -> Moment:
    """Average pooling (2-d, 3-d): linear, separable (exact maps)."""
    dims = x.mean.dim() - 2
    op = {2: aten.avg_pool2d.default, 3: aten.avg_pool3d.default}[dims]
    mean = op(x.mean, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    return _avg_pool(ctx, x, mean, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override,
                     dims)


@register(aten._adaptive_avg_pool2d.default, aten.adaptive_avg_pool1d.default, aten._adaptive_avg_pool3d.default,
          whole=True)
def adaptive_avg_pool(ctx: RuleContext, x: Moment, output_size) -> Moment:
    """Adaptive average pooling (1-3 d): linear, separable (exact maps)."""
    op = {1: aten.adaptive_avg_pool1d.default, 2: aten._adaptive_avg_pool2d.default,
          3: aten._adaptive_avg_pool3d.default}[len(output_size)]
    mean = op(x.mean, output_size)
    spatial = x.mean.shape[x.mean.dim() - len(output_size):]
    return _spatial(x, mean, [_matrix_1d(lambda t, size=size: F.adaptive_avg_pool1d(t, size), n, x.mean)
                              for n, size in zip(spatial, output_size)], ctx)


def _resampled(ctx: RuleContext, x: Moment, mean: Tensor, mode: str, align_corners: bool | None,
               scale_factors) -> Moment:
    """One interpolation matrix per spatial dim, from the 1-d op with the same size or scale factor."""
    matrices = []
    for i in range(mean.dim() - 2):
        n = x.mean.shape[2 + i]
        size = {"size": mean.shape[2 + i]} if not scale_factors else {"scale_factor": scale_factors[i]}
        matrices.append(_matrix_1d(lambda t: F.interpolate(t, mode=mode, align_corners=align_corners, **size), n,
                                   x.mean))
    return _spatial(x, mean, matrices, ctx)


@register(aten.upsample_nearest1d.vec, aten.upsample_nearest2d.vec, aten.upsample_nearest3d.vec, whole=True)
def upsample_nearest(ctx: RuleContext, x: Moment, output_size, scale_factors) -> Moment:
    """Nearest resampling: every output entry is a copy of one input entry (exact maps; copies stay one noise)."""
    op = {3: aten.upsample_nearest1d.vec, 4: aten.upsample_nearest2d.vec, 5: aten.upsample_nearest3d.vec}[
        x.mean.dim()]
    return _resampled(ctx, x, op(x.mean, output_size, scale_factors), "nearest", None, scale_factors)


@register(aten.upsample_bilinear2d.vec, aten.upsample_linear1d.vec, aten.upsample_trilinear3d.vec, whole=True)
def upsample_linear(ctx: RuleContext, x: Moment, output_size, align_corners, scale_factors) -> Moment:
    """(Bi/tri)linear resampling: a fixed interpolation matrix per dim (exact maps)."""
    op = {3: aten.upsample_linear1d.vec, 4: aten.upsample_bilinear2d.vec, 5: aten.upsample_trilinear3d.vec}[
        x.mean.dim()]
    return _resampled(ctx, x, op(x.mean, output_size, align_corners, scale_factors), "linear", align_corners,
                      scale_factors)


def _without_copies(t: Term, dims: list[int]) -> Layout | None:
    """The layout of an elementwise term whose entries are copies of one noise entry along ``dims`` (its last move
    is an expand that makes them: a per-channel parameter broadcast over the positions), without those copies;
    None for any other term."""
    if t.jacobian is not None or not t.layout.moves or t.layout.moves[-1][0].kind != "expand":
        return None
    shape_out, shape_in = t.layout.moves[-1][0].args
    lead = len(shape_out) - len(shape_in)
    if not all(d < lead or shape_in[d - lead] == 1 for d in dims):
        return None
    kept = tuple(1 if d in dims else size for d, size in enumerate(shape_out))
    prefix = Layout(t.layout.moves[:-1])
    padded = (1,) * lead + tuple(shape_in)
    if not same_shape(padded, shape_in):
        prefix = prefix.then(reshape_move(shape_in, padded))
    return prefix if same_shape(padded, kept) else prefix.then(expand_move(padded, kept))


def _kept_reduction(t: Tensor, dims: list[int], weight: float) -> Tensor:
    """``t`` summed (times ``weight``) or, for a zero weight, averaged over ``dims``, kept as size-1 dims."""
    return t.sum(dims, keepdim=True) * weight if weight else t.mean(dims, keepdim=True)


def _reduced(ctx: RuleContext, x: Moment, dims, keepdim: bool, mean: Tensor, weight: float) -> Moment:
    ndim = x.mean.dim()
    dims = sorted({d % ndim for d in (range(ndim) if dims is None or len(dims) == 0 else dims)})
    if dims and dims[0] >= 1 and _keeps_maps_over_images(ctx, x, ndim - 2):  # any dims but the batch: one map
        matrices = [torch.full((1, n), weight if weight else 1.0 / n, dtype=x.mean.dtype, device=x.mean.device)
                    if d in dims else n for d, n in enumerate(x.mean.shape[1:], start=1)]
        return flat_map(x, mean, SeparableOperator(matrices, 1, x.mean))
    partial = {id(t): part for t in x.terms
               if 0 < len(part := [d for d in dims if _without_copies(t, [d]) is not None]) < len(dims)}
    if partial:  # a term with copies along some of the dims (a per-channel noise summed over channels and
        # positions): over its copy dims first (no map there), then over the rest; the other terms together
        kept_mean = _kept_reduction(x.mean, dims, weight)
        parts = []
        for t in x.terms:
            if (part := partial.get(id(t))) is not None:
                over_copies = _reduced(ctx, Moment(x.mean, (t,)), part, True, _kept_reduction(x.mean, part, weight),
                                       weight)
                parts.append(_reduced(ctx, over_copies, [d for d in dims if d not in part], True, kept_mean, weight))
        others = tuple(t for t in x.terms if id(t) not in partial)
        if others:
            parts.append(_reduced(ctx, Moment(x.mean, others), dims, True, kept_mean, weight))
        total = merged(kept_mean, [t for part in parts if is_random(part) for t in part.terms])
        return total.moved(mean, reshape_move(kept_mean.shape, mean.shape)) if is_random(total) else mean
    copies = [(t, layout) for t in x.terms if (layout := _without_copies(t, dims)) is not None]
    if copies:  # the sum of copies of one entry is that entry times the sum of their scales (no map over copies)
        kept_mean = _kept_reduction(x.mean, dims, weight)
        pooled = [Term(t.noise, layout, scale=_kept_reduction(broadcast_to(_numeric(t.scale, x.mean) * torch.ones_like(
            x.mean), x.mean.shape), dims, weight)) for t, layout in copies]
        others = [t for t in x.terms if all(t is not c for c, _ in copies)]
        rest = _reduced(ctx, Moment(x.mean, tuple(others)), dims, True, kept_mean, weight) if others else kept_mean
        total = merged(kept_mean, [*pooled, *(rest.terms if is_random(rest) else ())])
        return total.moved(mean, reshape_move(kept_mean.shape, mean.shape))
    if len(dims) > 1 and dims == list(range(ndim - len(dims), ndim)):  # trailing dims (global pooling): one map
        lead = x.mean.shape[:ndim - len(dims)]
        flat = x.mean.reshape(*lead, -1)
        x, dims = x.moved(flat, reshape_move(x.mean.shape, flat.shape)), [len(lead)]
    out = x
    for d in dims:
        n = x.mean.shape[d]
        out = along(out, d, torch.full((1, n), weight if weight else 1.0 / n, dtype=x.mean.dtype,
                                       device=x.mean.device))
    return out.moved(mean, reshape_move(out.mean.shape, mean.shape))


@register(aten.sum.dim_IntList, whole=True)
def sum_dims(ctx: RuleContext, x: Moment, dims=None, keepdim: bool = False, dtype=None) -> Moment:
    """Sum over dims: linear (exact maps)."""
    return _reduced(ctx, x, dims, keepdim, aten.sum.dim_IntList(x.mean, dims, keepdim, dtype=dtype), 1.0)


@register(aten.mean.dim, whole=True)
def mean_dims(ctx: RuleContext, x: Moment, dims=None, keepdim: bool = False, dtype=None) -> Moment:
    """Mean over dims (global average pooling): linear (exact maps)."""
    return _reduced(ctx, x, dims, keepdim, aten.mean.dim(x.mean, dims, keepdim, dtype=dtype), 0.0)


@register(aten.cumsum.default, whole=True)
def cumsum(ctx: RuleContext, x: Moment, dim: int, dtype=None) -> Moment:
    """Cumulative sum: a lower-triangular matrix of ones along ``dim`` (exact maps)."""
    n = x.mean.shape[dim]
    lower = torch.tril(torch.ones(n, n, dtype=x.mean.dtype, device=x.mean.device))
    return along(x, dim, lower).with_mean(aten.cumsum.default(x.mean, dim, dtype=dtype))


@register(aten._embedding_bag.default, whole=True)
def embedding_bag(ctx: RuleContext, weight, indices: Tensor, offsets: Tensor, scale_grad_by_freq: bool = False,
                  mode: int = 0, sparse: bool = False, per_sample_weights=None, include_last_offset: bool = False,
                  padding_idx: int = -1):
    """``nn.EmbeddingBag``: the rows of the table looked up (as ``embedding``; times ``per_sample_weights`` in sum
    mode, a product), then a ``(bags, rows)`` matrix along the looked-up rows: ones per bag (``mode`` 0, sum), one
    over the bag's size (1, mean; ``padding_idx`` rows left out of both; exact), or per feature the row that wins at
    the mean (2, max; the winner taken as fixed).  Random per-sample weights are shared by a row's features, which a
    map along the rows would collapse: their noise goes to each bag's features through one ``(D, rows)`` matrix per
    bag, ``matrix[b, i] * rows[i, d]`` (exact)."""
    weight_mean = mean_of(weight)
    outputs = aten._embedding_bag.default(weight_mean, indices, offsets, scale_grad_by_freq, mode, sparse,
                                          mean_of(per_sample_weights), include_last_offset, padding_idx)
    rows_mean = aten.embedding.default(weight_mean, indices)
    rows = weight.moved(rows_mean, embedding_move(indices)) if is_random(weight) else rows_mean
    random_weights = is_random(per_sample_weights)  # their noise gets its own map, below
    if random_weights:
        column = per_sample_weights.moved(per_sample_weights.mean.unsqueeze(-1), reshape_move(
            per_sample_weights.mean.shape, (*per_sample_weights.mean.shape, 1)))
        extra = second_order_product(ctx, rows_mean * column.mean, rows, column) if is_random(rows) else None
        rows = mul(ctx, rows, column.mean)
        if extra is not None:
            rows = rows.plus(*extra.terms)
    elif per_sample_weights is not None:
        rows = mul(ctx, rows, per_sample_weights.unsqueeze(-1))
    bags, n = outputs[0].shape[0], indices.shape[0]
    position = torch.arange(n, device=indices.device)
    starts = offsets[:bags]
    ends = offsets[1:bags + 1] if include_last_offset else torch.cat([offsets[1:], offsets.new_full((1,), n)])
    member = (position >= starts.unsqueeze(1)) & (position < ends.unsqueeze(1))  # (bags, rows)
    if padding_idx >= 0:
        member = member & (indices != padding_idx)
    matrix = member.to(weight_mean.dtype)
    if mode == 1:
        matrix = matrix / matrix.sum(1, keepdim=True).clamp_min(1.0)
    elif mode == 2:
        scores = torch.where(member.unsqueeze(-1), mean_of(rows).unsqueeze(0), float("-inf"))  # (bags, rows, D)
        winners = F.one_hot(scores.argmax(1), n).to(matrix.dtype) * matrix.amax(1).reshape(bags, 1, 1)
        matrix = winners.permute(1, 0, 2)  # (D, bags, rows): a matrix per feature
    out = along(rows, 0, matrix) if is_random(rows) else outputs[0]
    if random_weights:  # a weight is shared by its row's features: from all the weights, one (D, rows) map per bag
        every_bag = per_sample_weights.moved(per_sample_weights.mean.expand(bags, n),
                                             expand_move(per_sample_weights.mean.shape, (bags, n)))
        spread = matrix.unsqueeze(1) * rows_mean.T.unsqueeze(0)  # (bags, D, rows)
        out = combine(outputs[0], [(1.0, out), (1.0, every_bag.left_multiplied(outputs[0], spread))])
    return (out.with_mean(outputs[0]) if is_random(out) else out, *outputs[1:])


def _permuted_by_the_mean(x: Moment, values: Tensor, indices: Tensor, dim: int) -> Moment:
    """``x`` gathered along ``dim`` at ``indices`` (taken from the mean): a one-hot matrix per row."""
    ndim = x.mean.dim()
    dim = dim % ndim
    n = x.mean.shape[dim]
    rows = indices.movedim(dim, -1)
    selection = F.one_hot(rows, n).to(x.mean.dtype)  # (..., k, n) per row
    return along(x, dim, selection).with_mean(values)


@register(aten.sort.default, whole=True)
def sort(ctx: RuleContext, x: Moment, dim: int = -1, descending: bool = False):
    """Sort by the mean: the permutation that sorts the mean moves every map (the order is taken as fixed)."""
    values, indices = aten.sort.default(x.mean, dim, descending)
    return _permuted_by_the_mean(x, values, indices, dim), indices


@register(aten.topk.default, whole=True)
def topk(ctx: RuleContext, x: Moment, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
    """The k largest (smallest) entries of the mean, with their maps (the selection is taken as fixed)."""
    values, indices = aten.topk.default(x.mean, k, dim, largest, sorted)
    return _permuted_by_the_mean(x, values, indices, dim), indices


@register(aten.constant_pad_nd.default, whole=True, reads="moves")
def constant_pad_nd(ctx: RuleContext, x: Moment, pad, value=0.0) -> Moment:
    """Padding with a constant: the maps are padded with zeros (negative pads crop; exact)."""
    mean = aten.constant_pad_nd.default(x.mean, pad, value)
    ndim = x.mean.dim()
    padded = len(pad) // 2
    if ndim - padded >= 2 and _keeps_maps_over_images(ctx, x, ndim - 2):
        matrices = [padding_matrix(n, pad[2 * (padded - 1 - i)], pad[2 * (padded - 1 - i) + 1], x.mean)
                    for i, n in enumerate(x.mean.shape[ndim - padded:])]
        return flat_map(x, mean, SeparableOperator(matrices, x.mean.shape[1:ndim - padded].numel(), x.mean))
    out = x
    for i in range(len(pad) // 2):
        dim = ndim - 1 - i
        before, after = pad[2 * i], pad[2 * i + 1]
        current = out.mean
        if before < 0 or after < 0:  # crop first
            size = current.shape[dim]
            start, end = max(-before, 0), size - max(-after, 0)
            cropped = current.narrow(dim, start, end - start)
            out = out.moved(cropped, slice_move(ndim, dim, start, end, 1, size))
            current = cropped
        before, after = max(before, 0), max(after, 0)
        if before or after:
            padded = F.pad(current, [0, 0] * (ndim - 1 - dim) + [before, after])
            out = out.moved(padded, pad_move(ndim, dim, before, after, current.shape[dim]))
    return out.with_mean(mean)


# ---------------------------------------------------------------------------------------------------------------
# Max pooling
# ---------------------------------------------------------------------------------------------------------------


def _max_pool(ctx: RuleContext, x: Moment, op, args) -> tuple:
    values, indices = op(x.mean, *args)
    if _keeps_maps_over_images(ctx, x, x.mean.dim() - 2):  # the winners as a gather over the flattened entries
        positions = x.mean.shape[2:].numel()
        channel = torch.arange(x.mean.shape[1], device=indices.device).reshape(1, -1, *[1] * (indices.dim() - 2))
        index = (indices + channel * positions).reshape(indices.shape[0], -1)
        return flat_map(x, values, GatherOperator(index, x.mean.shape[1:].numel(), x.mean)), indices
    flat = x.variance().flatten(2)
    var = flat.gather(2, indices.flatten(2)).reshape(values.shape)
    return Moment.diagonal(values, var), indices


@register(aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default, whole=True)
def max_pool_with_indices(ctx: RuleContext, x: Moment, kernel_size, stride=(), padding=0, dilation=1,
                          ceil_mode=False) -> tuple:
    """Max pooling linearised at the arg-max of the mean: each window passes on its winner at the mean, with that
    entry's variance, as a fresh noise (correlations across windows are dropped)."""
    op = {4: aten.max_pool2d_with_indices.default, 5: aten.max_pool3d_with_indices.default}[x.mean.dim()]
    return _max_pool(ctx, x, op, (kernel_size, stride, padding, dilation, ceil_mode))


# ---------------------------------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------------------------------


@register(aten.convolution.default, whole=True, reads="variance")
def convolution(ctx: RuleContext, x, weight, bias, stride, padding, dilation, transposed, output_padding,
                groups) -> Moment:
    """``conv(x, W) + b``: the paper's linear-layer rule per output location, as convolutions:
    ``Var = conv(m^2, S) + conv(v, M^2) + conv(v, S) + s_b`` (glm: without ``conv(v, S)``); see the module.  With
    both the input and the weight random (and no groups) the two convolutions are one, over the stacked channels:
    ``conv([v, m^2 + v], [M^2, S])``."""

    def conv(inputs: Tensor, kernel: Tensor, b: Tensor | None = None) -> Tensor:
        return aten.convolution.default(inputs, kernel, b, stride, padding, dilation, transposed, output_padding,
                                        groups)

    x_mean, w_mean = mean_of(x), mean_of(weight)
    mean = conv(x_mean, w_mean, mean_of(bias))
    if _exact_convolution(ctx, x_mean, weight, transposed, groups):
        return _convolution_maps(ctx, x, weight, bias, mean, conv, stride, padding, dilation, transposed,
                                 output_padding, groups)
    inputs, kernels = [], []  # the variance is the sum of conv(input, kernel) over these pairs
    x_var = x.variance() if is_random(x) else None
    if x_var is not None:
        inputs.append(x_var)
        kernels.append(w_mean * w_mean)
    kron = _kron_kernel(weight) if not transposed and groups == 1 else None
    if is_random(weight) and kron is None:
        second = x_mean * x_mean
        if x_var is not None and not ctx.first_order:
            second = second + x_var
        inputs.append(second)
        kernels.append(weight.variance())
    if len(inputs) == 2 and groups == 1:  # one convolution over the stacked input channels
        var = conv(torch.cat(inputs, 1), torch.cat(kernels, 0 if transposed else 1))
    else:
        var = None
        for i, k in zip(inputs, kernels):
            var = conv(i, k) if var is None else var + conv(i, k)
    if kron is not None:
        weight_var = _kron_weight_variance(kron, w_mean.shape, x_mean, None if ctx.first_order else x_var, conv)
        var = weight_var if var is None else var + weight_var
    terms = [] if var is None else [Term(Noise(var))]
    if is_random(bias):
        column = _per_channel(bias, mean.dim())
        terms.extend(column.moved(mean, expand_move(column.mean.shape, mean.shape)).terms)
    return merged(mean, terms)


def _exact_convolution(ctx: RuleContext, x_mean: Tensor, weight, transposed: bool, groups: int) -> bool:
    """Full mode keeps a convolution's maps (1-d to 3-d, transposed too; a weight with independent entries, or
    Kronecker factors of an ungrouped, not transposed kernel)."""
    plain_weight = not is_random(weight) or all(
        t.jacobian is None and type(t.noise) is Noise for t in weight.terms) or (
        _kron_kernel(weight) is not None and groups == 1 and not transposed)
    return ctx.keeps_maps and x_mean.dim() in (3, 4, 5) and plain_weight


def _convolution_maps(ctx: RuleContext, x, weight, bias, mean: Tensor, conv, stride, padding, dilation,
                      transposed: bool, output_padding, groups: int) -> Moment | Tensor:
    """Full mode: the convolution as a linear map over the flattened entries (exact maps).  The input's maps go
    through :class:`ConvolutionOperator` (the mean kernel), the weight noise through
    :class:`ConvolutionWeightOperator` (the mean input's patches; every position uses the same kernel noise), the
    bias noise is broadcast over the positions; the paper's second-order term (``suq``) is a fresh noise,
    ``conv(v, S)``."""
    x_mean, w_mean = mean_of(x), mean_of(weight)
    n = mean.shape[0]
    flat_out = mean.reshape(n, -1)
    terms: list[Term] = []
    if is_random(x):
        operator = ConvolutionOperator(w_mean, x_mean.shape[1:], mean.shape[1:], stride, padding, dilation, groups,
                                       transposed, output_padding)
        mapped = flat_map(x, mean, operator)
        if is_random(mapped):
            terms.extend(mapped.terms)
        if is_random(weight) and not ctx.first_order:
            terms.append(Term(Noise(conv(x.propagated_variance(), weight.variance()))))
    kron = _kron_kernel(weight)
    if kron is not None:
        terms.append(_kron_kernel_term(kron, x_mean, w_mean.shape, mean, conv))
    elif is_random(weight):
        operator = TransposedConvolutionWeightOperator(
            x_mean, w_mean.shape, mean.shape[1:], stride, padding, dilation, groups, output_padding) if transposed \
            else ConvolutionWeightOperator(x_mean, w_mean.shape, mean.shape[1:], stride, padding, dilation, groups)
        flat_kernel = (w_mean.numel(),)
        for t in weight.terms:
            layout = t.layout.then(reshape_move(w_mean.shape, flat_kernel))
            layout = layout.then(expand_move(flat_kernel, (n, *flat_kernel)))
            cols = t.scale.reshape(-1) if isinstance(t.scale, Tensor) else t.scale
            terms.append(Term(t.noise, layout, MatrixTangent.of(operator, cols),
                              Layout().then(reshape_move(flat_out.shape, mean.shape))))
    if is_random(bias):
        column = bias.moved(bias.mean.expand(n, -1), expand_move(bias.mean.shape, (n, *bias.mean.shape)))
        spread = [torch.ones(size, 1, dtype=mean.dtype, device=mean.device) for size in mean.shape[2:]]
        flat = column.left_multiplied(flat_out, SeparableOperator(spread, mean.shape[1], mean))
        terms.extend(flat.moved(mean, reshape_move(flat_out.shape, mean.shape)).terms)
    return merged(mean, terms)


def _kron_kernel(weight) -> KronNoise | None:
    """The Kronecker factors of a kernel posterior (laplace-torch's kron), where the weight is only that noise."""
    if is_random(weight) and len(weight.terms) == 1 and isinstance(weight.terms[0].noise, KronNoise):
        return weight.terms[0].noise
    return None


def _kron_kernel_term(noise: KronNoise, x_mean: Tensor, kernel_shape, mean: Tensor, conv) -> Term:
    """Full mode: with ``dW = Q_out Z Q_in^T`` over the kernel matrix (out, in · k...), the weight noise at an
    output location with patch ``a`` is ``Q_out Z (Q_in^T a)``: the noise ``Z`` (independent entries, variance
    ``D``; one per weight, so every use of it is one noise) applied by a 1x1 convolution to the rotated input
    (the convolution with the columns of ``Q_in`` as kernels), then ``Q_out`` as a 1x1 convolution.  Two
    operators over each image's entries: exact."""
    out, n = noise.d.shape
    ones, zeros = [1] * (len(kernel_shape) - 2), [0] * (len(kernel_shape) - 2)
    rotated = conv(x_mean, noise.q_in.T.reshape(n, *kernel_shape[1:]))
    spatial = tuple(mean.shape[2:])
    through_z = ConvolutionWeightOperator(rotated, (out, n, *ones), (out, *spatial), ones, zeros, ones, 1)
    through_q_out = ConvolutionOperator(noise.q_out.reshape(*noise.q_out.shape, *ones), (out, *spatial),
                                        (out, *spatial), ones, zeros, ones, 1)
    root = vars(noise).setdefault("_root", Noise(noise.d.reshape(-1)))
    rows = mean.shape[0]
    return Term(root, Layout().then(expand_move((out * n,), (rows, out * n))),
                MatrixTangent.of(through_z).then(through_q_out),
                Layout().then(reshape_move((rows, mean[0].numel()), mean.shape)))


def _kron_weight_variance(noise: KronNoise, kernel_shape, x_mean: Tensor, x_var: Tensor | None, conv) -> Tensor:
    """The weight noise's variance at every output location under ``Cov vec(W) = (Q_out ⊗ Q_in) diag(vec D)
    (Q_out ⊗ Q_in)^T`` over the kernel matrix (out, in · k...): with the patch ``a`` of a location,
    ``Var = (Q_out^2 D) E[(Q_in^T a)^2]``, the linear rule's, where ``Q_in^T a`` is a convolution with the rotated
    kernels (the columns of ``Q_in`` as kernels, one output channel each) and ``E[(Q_in^T a)^2] = (Q_in^T m)^2 +
    (Q_in^2)^T v`` for an input with independent entries; ``Q_out^2 D`` is then a 1x1 convolution."""
    out, n = noise.q_out.shape[0], noise.q_in.shape[0]
    rotated_shape = (n, *kernel_shape[1:])
    rotated = conv(x_mean, noise.q_in.T.reshape(rotated_shape))
    second = rotated * rotated
    if x_var is not None:
        second = second + conv(x_var, (noise.q_in * noise.q_in).T.reshape(rotated_shape))
    dims = len(kernel_shape) - 2
    mixing = ((noise.q_out * noise.q_out) @ noise.d).reshape(out, n, *[1] * dims)
    return aten.convolution.default(second, mixing, None, [1] * dims, [0] * dims, [1] * dims, False, [0] * dims, 1)


# ---------------------------------------------------------------------------------------------------------------
# Group and instance normalisation
# ---------------------------------------------------------------------------------------------------------------


def _affine(ctx: RuleContext, z, weight, bias, mean: Tensor):
    """``gamma z + beta`` per channel (dim 1); the result's mean is the plain op's ``mean``."""
    if weight is not None:
        z = mul(ctx, z, _per_channel(weight, mean.dim()))
    if bias is not None:
        z = add(ctx, z, _per_channel(bias, mean.dim()))
    return z.with_mean(mean) if is_random(z) else mean


@register(aten.native_group_norm.default, whole=True)
def native_group_norm(ctx: RuleContext, x, weight, bias, n: int, channels: int, spatial: int, groups: int,
                      eps: float):
    """GroupNorm linearised at the mean input with its statistics (LayerNorm's rule over each group's
    ``channels / groups x spatial`` entries: in full mode the Jacobian as an operator over the flattened entries,
    else its closed form, one fresh noise), then the per-channel affine."""
    x_mean = mean_of(x)
    out_mean, centre, inv_std = aten.native_group_norm.default(x_mean, mean_of(weight), mean_of(bias), n, channels,
                                                               spatial, groups, eps)
    grouped_mean = x_mean.reshape(x_mean.shape[0], groups, -1)
    stats_inv_std = torch.rsqrt(grouped_mean.var(-1, unbiased=False, keepdim=True) + eps)
    z = (grouped_mean - grouped_mean.mean(-1, keepdim=True)) * stats_inv_std
    out = z.reshape(x_mean.shape)
    if _keeps_maps_over_images(ctx, x, x_mean.dim() - 2):  # the centring and scaling of each group as an operator
        out = flat_map(x, out, StandardisationOperator(z, stats_inv_std))
    elif is_random(x):
        grouped = Moment.diagonal(grouped_mean, x.variance().reshape(grouped_mean.shape))
        out = Moment.diagonal(out, _normalised_moment(grouped, z, stats_inv_std, (-1,), False).variance().reshape(
            x_mean.shape))
    return _affine(ctx, out, weight, bias, out_mean), centre, inv_std


@register(aten.instance_norm.default, whole=True)
def instance_norm(ctx: RuleContext, x, weight, bias, running_mean, running_var, use_input_stats: bool,
                  momentum: float, eps: float, cudnn_enabled: bool = False) -> Moment | Tensor:
    """InstanceNorm: with each image's own statistics it is GroupNorm with one group per channel (kept whole, so
    full mode keeps its maps over each image; decomposed, it folds the batch into the channels); with running
    statistics, eval-mode batch norm."""
    if not use_input_stats:
        return batch_norm(ctx, x, weight, bias, running_mean, running_var, momentum, eps)[0]
    x_mean = mean_of(x)
    n, channels = x_mean.shape[:2]
    return native_group_norm(ctx, x, weight, bias, n, channels, x_mean[0, 0].numel(), channels, eps)[0]


@register(aten._native_batch_norm_legit.no_stats, whole=True)
def batch_statistics_norm(ctx: RuleContext, x, weight, bias, training: bool, momentum: float, eps: float):
    """Batch norm with the statistics of the input itself (``F.batch_norm`` in training mode without running
    statistics), linearised at the mean with its statistics, per channel over every other dim (LayerNorm's
    closed form)."""
    x_mean = mean_of(x)
    out_mean, centre, inv_std = aten._native_batch_norm_legit.no_stats(
        x_mean, mean_of(weight), mean_of(bias), training, momentum, eps)
    dims = tuple(d for d in range(x_mean.dim()) if d != 1)
    stats_inv_std = torch.rsqrt(x_mean.var(dims, unbiased=False, keepdim=True) + eps)
    z = (x_mean - x_mean.mean(dims, keepdim=True)) * stats_inv_std
    out = _normalised_moment(Moment.diagonal(x_mean, x.variance()), z, stats_inv_std, dims, False) if is_random(
        x) else z
    return _affine(ctx, out, weight, bias, out_mean), centre, inv_std
