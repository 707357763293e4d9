"""Weight noise shared across rows: the cross-token covariance of a Bayesian projection, kept until attention.

``v = x W^T + b`` with a random ``W`` (elementwise variance ``S``) and random ``b`` (``s_b``) uses ONE weight
sample for every row (token) of ``x``, so the rows' noises are correlated:
``Cov(v_td, v_sd) = sum_i x_ti x_si S_di + s_b[d]``.  A token-wise moment keeps only the diagonal of that, which is
exact until something mixes tokens.  Attention does: ``o_t = sum_s A_ts v_s`` with deterministic weights ``A``
(the paper's rule) has ``Var(o_td) = sum_i (sum_s A_ts x_si)^2 S_di + (sum_s A_ts)^2 s_b[d]``, i.e. the weight noise
applied to the attention-averaged inputs, while ``sum_s A_ts^2 Var(v_sd)`` (the paper's equation) is up to
``T`` times smaller.

:class:`SharedNoise` rides on a term of the projection's value (``Term.shared``) through data movement (head split,
transpose) until a product with a deterministic left operand uses it.  Nothing is computed unless it is used: the
data-movement ops are recorded and replayed on index tensors only at that product.  Each dimension is tagged with
where its index comes from (rows of ``x`` or columns of ``W``), so a layout where the formula would not hold (a
view mixing tokens into the last dimension) drops the shared noise and falls back to the token-wise variance.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

ROW, COL = "row", "col"
Tags = tuple[frozenset, ...]


@dataclass(frozen=True, eq=False)
class SharedNoise:
    """Noise ``x_r W^T + b`` of the element at (row ``r``, column ``d``) of a projection's output.

    ``inputs``: the projection's input means ``(..., k)``, whose rows are the ``r``; ``weight_var``: ``S^T`` as
    ``(k, m)`` (the right operand's layout);
    ``bias_var``: ``s_b`` ``(m,)`` or None; ``rest``: the variance of everything else (input noise through the
    weights, independent across rows), shaped like the projection's output, or None;
    ``shape``: the projection's output shape; ``moves``: the data-movement ops applied since, as functions of a
    tensor shaped like the mean; ``tags``: per current dimension, the index sources it depends on."""

    inputs: Tensor
    weight_var: Tensor
    bias_var: Tensor | None
    rest: Tensor | None
    shape: tuple
    tags: Tags
    moves: tuple[Callable[[Tensor], Tensor], ...] = field(default=())
    covers: frozenset = field(default=frozenset())  # the ids of the noises this record accounts for

    @classmethod
    def of_projection(cls, inputs: Tensor, weight_var: Tensor, bias_var, rest, out_shape, covers) -> "SharedNoise":
        tags = tuple(frozenset({ROW}) for _ in out_shape[:-1]) + (frozenset({COL}),)
        return cls(inputs, weight_var, bias_var, rest, tuple(out_shape), tags, covers=frozenset(covers))

    def moved(self, move: Callable[[Tensor], Tensor], tags: Tags | None) -> "SharedNoise | None":
        return None if tags is None else replace(self, moves=self.moves + (move,), tags=tags)

    def usable_as_right_operand(self) -> bool:
        """Rows of ``x`` along the second-to-last dim, columns of ``W`` along the last: ``A @ v`` mixes rows."""
        return len(self.tags) >= 2 and self.tags[-1] <= {COL} and self.tags[-2] <= {ROW}

    def _replay(self, t: Tensor) -> Tensor:
        for move in self.moves:
            t = move(t)
        return t

    def averaged_variance(self, weights: Tensor) -> Tensor:
        """``Var((weights @ v)_te) = sum_i (weights @ x_rows)_ti^2 S_ei`` plus the bias and the independent rest."""
        inputs, weight_var = self.inputs.reshape(-1, self.inputs.shape[-1]), self.weight_var.mT
        rows_flat = torch.arange(inputs.shape[0], device=inputs.device)
        rows = self._replay(rows_flat.reshape(*self.shape[:-1], 1).expand(self.shape))[..., :, 0]
        cols = self._replay(torch.arange(self.shape[-1], device=inputs.device).expand(self.shape))[..., 0, :]
        if self.bias_var is not None:  # the bias is a weight on a constant input 1
            inputs = torch.cat([inputs, torch.ones_like(inputs[:, :1])], -1)
            weight_var = torch.cat([weight_var, self.bias_var.unsqueeze(-1)], -1)
        averaged = weights @ F.embedding(rows, inputs)  # (..., T, k)
        var = (averaged * averaged) @ F.embedding(cols, weight_var).mT
        if self.rest is not None:
            var = var + (weights * weights) @ self._replay(self.rest)
        return var


def regroup(tags: Tags, before, after) -> Tags | None:
    """Tags after a reshape from shape ``before`` to ``after``: dimensions merged together share the union of
    their tags, a split dimension passes its tags to every part; None when the grouping cannot be proven."""
    out: list[frozenset] = []
    i = j = 0
    while j < len(after):
        if statically_known_true(after[j] == 1):
            out.append(frozenset())
            j += 1
            continue
        while i < len(before) and statically_known_true(before[i] == 1):
            i += 1
        if i == len(before):
            return None
        group, size_in, size_out, first_j = {i}, before[i], after[j], j
        while not statically_known_true(size_in == size_out):
            if j + 1 < len(after) and statically_known_true(size_in % size_out == 0):
                j += 1
                size_out = size_out * after[j]
            elif i + 1 < len(before) and statically_known_true(size_out % size_in == 0):
                i += 1
                group.add(i)
                size_in = size_in * before[i]
            else:
                return None
        merged = frozenset().union(*(tags[g] for g in group))
        out.extend([merged] * (j - first_j + 1))
        i += 1
        j += 1
    if any(not statically_known_true(before[k] == 1) for k in range(i, len(before))):
        return None
    return tuple(out)


def permuted(tags: Tags, dims) -> Tags:
    n = len(tags)
    return tuple(tags[d % n] for d in dims)


def transposed(tags: Tags, dim0: int, dim1: int) -> Tags:
    order = list(range(len(tags)))
    a, b = dim0 % len(tags), dim1 % len(tags)
    order[a], order[b] = order[b], order[a]
    return permuted(tags, order)
