"""Matrix-free factors of a matrix map: linear maps applied as operators, never formed as dense matrices.

A :class:`~momentprop.passes.moment.MatrixTangent` is a product of factors over the last dimension.  Most factors
are matrices (a linear layer's weight).  A convolution over an image is also a linear map, from the flattened
``C x H x W`` entries of its input to those of its output, but as a matrix it is huge and mostly zeros; these
classes apply it as the op itself.  Each has the three products a covariance needs:

* ``rmatmul(j)``: ``j @ A`` for rows ``j`` (..., r, out): the adjoint, applied from the output end, where the
  map is formed for a small output (a transposed convolution for a convolution, a scatter for a gather);
* ``matmul(x)``: ``A @ x`` for columns ``x`` (..., in, c): the op applied to each column;
* ``squared(v)``: ``(A * A) @ v``, the variance of ``A e`` for independent entries of variance ``v``.

An operator is *shared* (one map for every row, ``dim() == 2``) or *per row* (it depends on each input, as the
weight noise of a convolution does, ``dim() == 3``: its rows are the batch)."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten


class LinearOperator:
    """A linear map (``out`` x ``in``) over the last dimension, applied without its matrix."""

    rows: tuple = ()  # the leading (batch) dims of a per-row operator

    def __init__(self, out: int, inp: int, like: Tensor):
        self.out, self.inp, self.dtype, self.device = out, inp, like.dtype, like.device

    @property
    def shape(self) -> tuple:
        return (*self.rows, self.out, self.inp)

    def dim(self) -> int:
        return len(self.shape)

    def rmatmul(self, j: Tensor) -> Tensor:
        raise NotImplementedError

    def matmul(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def squared(self, v: Tensor) -> Tensor:
        """``(A * A) @ v`` for ``v`` (..., in); by default from the dense map (operators override it)."""
        dense = self.dense()
        return ((dense * dense) @ v.unsqueeze(-1)).squeeze(-1)

    def dense(self) -> Tensor:
        """The matrix, from whichever end is smaller (the op applied to the identity's columns or rows)."""
        if statically_known_true(self.inp < self.out):
            return self.matmul(torch.eye(self.inp, dtype=self.dtype, device=self.device))
        return self.rmatmul(torch.eye(self.out, dtype=self.dtype, device=self.device))


def right_times(j: Tensor, factor) -> Tensor:
    """``j @ factor`` for a matrix or an operator."""
    return factor.rmatmul(j) if isinstance(factor, LinearOperator) else j @ factor


def left_times(factor, x: Tensor) -> Tensor:
    """``factor @ x`` for a matrix or an operator."""
    return factor.matmul(x) if isinstance(factor, LinearOperator) else factor @ x


def as_dense(factor) -> Tensor:
    return factor.dense() if isinstance(factor, LinearOperator) else factor


def per_row(t: Tensor, rows: tuple, tail: int = 2) -> Tensor:
    """``t`` with the operator's rows in front where it has none (a matrix or vector shared by every row)."""
    return t.expand(*rows, *t.shape[t.dim() - tail:]) if t.dim() == tail else t


def _rows_first(t: Tensor, tail: int) -> tuple[Tensor, tuple]:
    """``t`` with every dim but its last ``tail`` folded into one (the leading shape returned)."""
    lead = tuple(t.shape[:t.dim() - tail])
    return t.reshape(-1, *t.shape[t.dim() - tail:]), lead


class ConvolutionOperator(LinearOperator):
    """A convolution with a fixed kernel, from the flattened ``(C_in, *spatial_in)`` entries to ``(C_out,
    *spatial_out)``: ``A x = conv(x, W)``, ``j A = conv_transpose(j, W)`` (the output padding chosen so the
    spatial size comes back), ``(A * A) v = conv(v, W^2)``; a transposed convolution the other way round."""

    def __init__(self, kernel: Tensor, in_shape: tuple, out_shape: tuple, stride, padding, dilation, groups: int,
                 transposed: bool = False, output_padding=None):
        super().__init__(math.prod(out_shape), math.prod(in_shape), kernel)
        self.kernel, self.in_shape, self.out_shape = kernel, tuple(in_shape), tuple(out_shape)
        self.stride, self.padding, self.dilation, self.groups = list(stride), list(padding), list(dilation), groups
        self.transposed = transposed
        # the output padding of the transposed direction: what brings the larger image's size back
        small, large = (in_shape, out_shape) if transposed else (out_shape, in_shape)
        self.output_padding = list(output_padding) if transposed else [
            large[1 + i] - ((small[1 + i] - 1) * self.stride[i] - 2 * self.padding[i]
                            + self.dilation[i] * (kernel.shape[2 + i] - 1) + 1) for i in range(len(in_shape) - 1)]

    def _op(self, images: Tensor, kernel: Tensor, transposed: bool) -> Tensor:
        zeros = [0] * len(self.stride)
        if all(k == 1 for k in kernel.shape[2:]) and all(s == 1 for s in self.stride) and not any(self.padding) \
                and self.groups == 1:  # a 1x1 convolution is a product over the channels (PyTorch's CPU transposed
            matrix = kernel.reshape(kernel.shape[:2])  # convolution takes a slow path for it)
            out = (matrix.mT if transposed else matrix) @ images.flatten(2)
            return out.reshape(*out.shape[:2], *images.shape[2:])
        if not transposed or all(isinstance(p, int) for p in self.output_padding):
            return aten.convolution.default(images, kernel, None, self.stride, self.padding, self.dilation,
                                            transposed, self.output_padding if transposed else zeros, self.groups)
        # the output padding depends on an image size known only when run (a dynamic image size), and ONNX's
        # ConvTranspose takes a fixed one: the whole transposed convolution, padded by the most output padding
        # can add (stride - 1), cut to the larger image
        whole = aten.convolution.default(images, kernel, None, self.stride, zeros, self.dilation, True, zeros,
                                         self.groups)
        whole = F.pad(whole, [p for s in reversed(self.stride) for p in (0, s - 1)])
        for i, size in enumerate(self.in_shape[1:]):
            whole = whole.narrow(2 + i, self.padding[i], size)
        return whole

    def matmul(self, x: Tensor) -> Tensor:
        flat, lead = _rows_first(x.mT, 1)
        out = self._op(flat.reshape(-1, *self.in_shape), self.kernel, self.transposed)
        return out.reshape(*lead, self.out).mT

    def rmatmul(self, j: Tensor) -> Tensor:
        flat, lead = _rows_first(j, 1)
        out = self._op(flat.reshape(-1, *self.out_shape), self.kernel, not self.transposed)
        return out.reshape(*lead, self.inp)

    def squared(self, v: Tensor) -> Tensor:
        flat, lead = _rows_first(v, 1)
        out = self._op(flat.reshape(-1, *self.in_shape), self.kernel * self.kernel, self.transposed)
        return out.reshape(*lead, self.out)


def _as_2d(images: Tensor, kernel_size, stride, padding, dilation) -> tuple:
    """A 1-d convolution's arguments as a 2-d one's (an image of height 1)."""
    if images.dim() == 3:
        return images.unsqueeze(2), (1, *kernel_size), (1, *stride), (0, *padding), (1, *dilation)
    return images, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation)


def patches(images: Tensor, kernel_size, stride, padding, dilation) -> Tensor:
    """The input patch of every output location, ``(N, L, C_in * k...)`` (PyTorch's ``unfold`` in 1-d and 2-d;
    in 3-d, which ``unfold`` lacks, one strided slice of the padded images per kernel offset)."""
    if images.dim() == 5:
        return _patches_by_slicing(images, kernel_size, stride, padding, dilation)
    images, kernel_size, stride, padding, dilation = _as_2d(images, kernel_size, stride, padding, dilation)
    return F.unfold(images, kernel_size, dilation, padding, stride).mT


def _patches_by_slicing(images: Tensor, kernel_size, stride, padding, dilation) -> Tensor:
    """``patches`` for any number of spatial dims, in ``unfold``'s order (channel, then kernel offset)."""
    padded = F.pad(images, [p for p in reversed(padding) for _ in range(2)])
    spatial = padded.shape[2:]
    outs = [(spatial[i] - dilation[i] * (k - 1) - 1) // stride[i] + 1 for i, k in enumerate(kernel_size)]
    columns = [padded[(slice(None), slice(None), *(
        slice(o * dilation[i], o * dilation[i] + (outs[i] - 1) * stride[i] + 1, stride[i])
        for i, o in enumerate(offset)))] for offset in itertools.product(*(range(k) for k in kernel_size))]
    stacked = torch.stack(columns, 2)  # (N, C, K, *outs)
    return stacked.reshape(images.shape[0], -1, math.prod(outs)).mT


def fold(columns: Tensor, size, kernel_size, stride, padding, dilation) -> Tensor:
    """The adjoint of :func:`patches`: columns ``(N, C * k..., L)`` summed into images ``(N, C, *size)``
    (PyTorch's ``fold`` in 1-d and 2-d; in 3-d, which ``fold`` lacks, each kernel offset's block spread by the
    stride and padded into place)."""
    if len(size) < 3:
        like = columns.new_empty(columns.shape[0], 0, *size)  # only its number of dims matters
        _, kernel_size, stride, padding, dilation = _as_2d(like, kernel_size, stride, padding, dilation)
        out = F.fold(columns, (1, *size) if len(size) == 1 else tuple(size), kernel_size, dilation, padding, stride)
        return out.reshape(columns.shape[0], -1, *size)
    padded = [s + 2 * p for s, p in zip(size, padding)]
    grid = [(padded[i] - dilation[i] * (k - 1) - 1) // stride[i] + 1 for i, k in enumerate(kernel_size)]
    blocks = columns.reshape(columns.shape[0], -1, *kernel_size, *grid)
    out = None
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        block = blocks[(slice(None), slice(None), *offset)]
        for i, s in enumerate(stride):  # zeros between the positions: (grid - 1) * stride + 1 along each dim
            if s > 1:
                spread = F.pad(block.unsqueeze(3 + i), [0, 0] * (len(grid) - 1 - i) + [0, s - 1])
                block = spread.flatten(2 + i, 3 + i).narrow(2 + i, 0, (grid[i] - 1) * s + 1)
        pads = []
        for i in reversed(range(len(grid))):
            before = offset[i] * dilation[i]
            pads += [before, padded[i] - before - ((grid[i] - 1) * stride[i] + 1)]
        placed = F.pad(block, pads)
        out = placed if out is None else out + placed
    for i, s in enumerate(size):
        out = out.narrow(2 + i, padding[i], s)
    return out


class ConvolutionWeightOperator(LinearOperator):
    """The weight noise of a convolution applied to each row's mean input ``a``: from the kernel's entries
    ``(C_out, C_in / groups, k...)`` (flattened) to the output's ``(C_out, *spatial_out)``, per row (batch entry):
    ``A dW = conv(a, dW) = patches(a) @ dW^T`` per group.  The adjoint is the kernel gradient, ``j A`` =
    ``sum_l j[o, l] patches[l, k]``; ``(A * A) s = conv(a^2, s)``."""

    def __init__(self, inputs: Tensor, kernel_shape: tuple, out_shape: tuple, stride, padding, dilation,
                 groups: int):
        super().__init__(math.prod(out_shape), math.prod(kernel_shape), inputs)
        self.rows = tuple(inputs.shape[:1])
        self.inputs, self.kernel_shape, self.out_shape = inputs, tuple(kernel_shape), tuple(out_shape)
        self.stride, self.padding, self.dilation, self.groups = list(stride), list(padding), list(dilation), groups
        self._patches: Tensor | None = None

    def _grouped_patches(self) -> Tensor:
        """``(N, L, groups, C_in / groups * k...)``."""
        if self._patches is None:
            p = patches(self.inputs, self.kernel_shape[2:], self.stride, self.padding, self.dilation)
            self._patches = p.reshape(*p.shape[:2], self.groups, -1)
        return self._patches

    def rmatmul(self, j: Tensor) -> Tensor:
        p = self._grouped_patches()
        n, g = p.shape[0], self.groups
        j = per_row(j, (n,))
        r = j.shape[-2]
        jr = j.reshape(n, r, g, self.kernel_shape[0] // g, -1)  # (N, r, G, C_out / G, L)
        return torch.einsum("nrgol,nlgk->nrgok", jr, p).reshape(n, r, self.inp)

    def matmul(self, x: Tensor) -> Tensor:
        p = self._grouped_patches()
        n, g = p.shape[0], self.groups
        x = per_row(x, (n,))
        c = x.shape[-1]
        xr = x.reshape(n, g, self.kernel_shape[0] // g, -1, c)  # (N, G, C_out / G, K, c)
        out = torch.einsum("nlgk,ngokc->ngolc", p, xr)
        return out.reshape(n, self.out, c)

    def squared(self, v: Tensor) -> Tensor:
        p = self._grouped_patches()
        n, g = p.shape[0], self.groups
        vr = v.reshape(-1, g, self.kernel_shape[0] // g, p.shape[-1])
        out = torch.einsum("nlgk,mgok->ngol", p * p, vr) if vr.shape[0] == 1 else torch.einsum(
            "nlgk,ngok->ngol", p * p, vr)
        return out.reshape(n, self.out)


class TransposedConvolutionWeightOperator(LinearOperator):
    """The weight noise of a transposed convolution applied to each row's mean input ``a``: from the kernel's
    entries ``(C_in, C_out / groups, k...)`` to the output's ``(C_out, *spatial_out)``: ``A dW =
    conv_transpose(a, dW)``, the fold (``col2im``) of ``dW^T a`` per group.  The adjoint is the kernel gradient,
    ``sum_p a[i, p] unfold(j)[(o, k), p]``; ``(A * A) s = conv_transpose(a^2, s)`` (``s``: the kernel's
    variances, one for every row)."""

    def __init__(self, inputs: Tensor, kernel_shape: tuple, out_shape: tuple, stride, padding, dilation,
                 groups: int, output_padding):
        super().__init__(math.prod(out_shape), math.prod(kernel_shape), inputs)
        self.rows = tuple(inputs.shape[:1])
        self.inputs, self.kernel_shape, self.out_shape = inputs, tuple(kernel_shape), tuple(out_shape)
        self.stride, self.padding, self.dilation, self.groups = list(stride), list(padding), list(dilation), groups
        self.output_padding = list(output_padding)

    def _grouped_inputs(self) -> Tensor:
        """``(N, G, C_in / G, positions)``."""
        return self.inputs.reshape(self.inputs.shape[0], self.groups, self.kernel_shape[0] // self.groups, -1)

    def rmatmul(self, j: Tensor) -> Tensor:
        a = self._grouped_inputs()
        n, g, r = a.shape[0], self.groups, j.shape[-2]
        j = per_row(j, (n,))
        images = j.reshape(n * r, *self.out_shape)
        unfolded = patches(images, self.kernel_shape[2:], self.stride, self.padding, self.dilation).mT
        unfolded = unfolded.reshape(n, r, g, self.kernel_shape[1], math.prod(self.kernel_shape[2:]), -1)
        return torch.einsum("ngip,nrgokp->nrgiok", a, unfolded).reshape(n, r, self.inp)

    def matmul(self, x: Tensor) -> Tensor:
        a = self._grouped_inputs()
        n, g = a.shape[0], self.groups
        x = per_row(x, (n,))
        c = x.shape[-1]
        kernels = x.reshape(n, g, self.kernel_shape[0] // g, self.kernel_shape[1], math.prod(self.kernel_shape[2:]),
                            c)
        columns = torch.einsum("ngip,ngiokc->ncgokp", a, kernels).reshape(n * c, -1, a.shape[-1])
        out = fold(columns, self.out_shape[1:], self.kernel_shape[2:], self.stride, self.padding, self.dilation)
        return out.reshape(n, c, self.out).mT

    def squared(self, v: Tensor) -> Tensor:
        kernel = v.reshape(-1, *self.kernel_shape)[0]
        out = aten.convolution.default(self.inputs * self.inputs, kernel, None, self.stride, self.padding,
                                       self.dilation, True, self.output_padding, self.groups)
        return out.reshape(out.shape[0], -1)


class SeparableOperator(LinearOperator):
    """One matrix ``(out_i, in_i)`` along each trailing dim of ``(C, *dims)`` (an int ``n``: that dim is kept, the
    identity), the leading ``C`` kept: pooling by averaging, resampling, padding, concatenation, broadcasting a
    per-channel value over the positions."""

    def __init__(self, matrices: list, channels: int, like: Tensor):
        outs = [m if not isinstance(m, Tensor) else m.shape[0] for m in matrices]
        ins = [m if not isinstance(m, Tensor) else m.shape[1] for m in matrices]
        super().__init__(channels * math.prod(outs), channels * math.prod(ins), like)
        self.matrices, self.channels, self.outs, self.ins = matrices, channels, outs, ins

    def _along(self, t: Tensor, shape: list[int], matrices: list, adjoint: bool) -> Tensor:
        """``t`` (..., C * prod(shape)) with each matrix applied along its dim (its transpose: ``adjoint``)."""
        lead = t.shape[:-1]
        t = t.reshape(*lead, self.channels, *shape)
        for i, m in enumerate(matrices):
            if not isinstance(m, Tensor):
                continue
            dim = t.dim() - len(shape) + i
            t = torch.movedim(torch.movedim(t, dim, -1) @ (m if adjoint else m.T), -1, dim)
        return t.reshape(*lead, -1)

    def matmul(self, x: Tensor) -> Tensor:
        return self._along(x.mT, self.ins, self.matrices, False).mT

    def rmatmul(self, j: Tensor) -> Tensor:
        return self._along(j, self.outs, self.matrices, True)

    def squared(self, v: Tensor) -> Tensor:
        return self._along(v, self.ins, [m if not isinstance(m, Tensor) else m * m for m in self.matrices], False)


class GatherOperator(LinearOperator):
    """Per row, each output entry is one input entry (``index`` (N, out) into the flattened input): max pooling
    linearised at the mean's winners.  ``A x`` gathers rows, ``j A`` scatters (adds) columns, ``(A * A) v``
    gathers ``v``."""

    def __init__(self, index: Tensor, inp: int, like: Tensor):
        super().__init__(index.shape[-1], inp, like)
        self.rows = tuple(index.shape[:-1])
        self.index = index

    def matmul(self, x: Tensor) -> Tensor:
        x = per_row(x, self.rows)
        return torch.gather(x, -2, self.index.unsqueeze(-1).expand(*self.index.shape, x.shape[-1]))

    def rmatmul(self, j: Tensor) -> Tensor:
        j = per_row(j, self.rows)
        index = self.index.unsqueeze(-2).expand(*j.shape)
        return j.new_zeros(*j.shape[:-1], self.inp).scatter_add(-1, index, j)

    def squared(self, v: Tensor) -> Tensor:
        v = per_row(v, self.rows, 1)
        return torch.gather(v, -1, self.index.expand(*v.shape[:-1], self.index.shape[-1]))


class SumOperator(LinearOperator):
    """The sum of several maps with the same ends (the two paths of a skip connection, between the part of the map
    they share inside and the part they share outside); each branch is a ``MatrixTangent``."""

    def __init__(self, branches: list, out: int, inp: int, like: Tensor, rows: tuple):
        super().__init__(out, inp, like)
        self.branches, self.rows = branches, rows

    def squared(self, v: Tensor) -> Tensor:
        """Each branch's ``(B * B) v`` summed: the cross terms of the branches dropped (used for the second-order
        term's input variance only, ``Moment.propagated_variance``)."""
        parts = [b.squared(v) for b in self.branches]
        return sum(parts[1:], parts[0])

    def rmatmul(self, j: Tensor) -> Tensor:
        parts = [b.rmatmul(j) for b in self.branches]
        return sum(parts[1:], parts[0])

    def matmul(self, x: Tensor) -> Tensor:
        parts = [b.matmul(x) for b in self.branches]
        return sum(parts[1:], parts[0])


class StandardisationOperator(LinearOperator):
    """Per row, the Jacobian of standardising each of ``groups`` consecutive blocks of the flattened entries (n
    each), at the mean: ``J = (I - 1 1^T / n - z z^T / n) / sigma`` per block (symmetric; GroupNorm over
    ``C / groups x positions``).  ``(J * J) v`` is LayerNorm's closed form."""

    def __init__(self, z: Tensor, inv_std: Tensor):
        n, groups, size = z.shape
        super().__init__(groups * size, groups * size, z)
        self.rows = (n,)
        self.z, self.inv_std = z.unsqueeze(1), inv_std.reshape(n, 1, groups, 1)  # (N, 1, G, n), (N, 1, G, 1)

    def rmatmul(self, j: Tensor) -> Tensor:
        j = per_row(j, self.rows)
        blocks = j.reshape(*j.shape[:-1], *self.z.shape[-2:])
        out = blocks - blocks.mean(-1, keepdim=True) - self.z * (blocks * self.z).mean(-1, keepdim=True)
        return (out * self.inv_std).reshape(j.shape)

    def matmul(self, x: Tensor) -> Tensor:
        return self.rmatmul(x.mT).mT

    def squared(self, v: Tensor) -> Tensor:
        z, size = self.z[:, 0], self.z.shape[-1]
        v = per_row(v, self.rows, 1)
        v = v.reshape(z.shape)
        s0, s1, s2 = v.sum(-1, keepdim=True), (z * v).sum(-1, keepdim=True), (z * z * v).sum(-1, keepdim=True)
        out = v * (1.0 - 2.0 * (1.0 + z * z) / size) + (s0 + 2.0 * z * s1 + z * z * s2) / (size * size)
        return (out * self.inv_std[:, 0] ** 2).reshape(self.rows[0], -1)
