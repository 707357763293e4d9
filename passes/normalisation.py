"""Normalisation layers at inference.

BatchNorm in eval mode is a per-channel affine map with fixed statistics:
``y = (x - mu) * gamma / sqrt(running_var + eps) + beta`` so ``Var y = gamma^2 v / (running_var + eps)``
(exact for deterministic gamma; a random gamma or beta is an independent product or sum).
"""

from __future__ import annotations

import torch

from .elementwise import add, mul, sub
from .moment import Moment, is_random
from .registry import RuleContext, register

aten = torch.ops.aten


def _per_channel(value, ndim: int):
    """Reshape a (C,) statistic or parameter to broadcast along dim 1 of an ``ndim`` tensor."""
    shape = (-1,) + (1,) * (ndim - 2)
    if is_random(value):
        return Moment(value.mean.reshape(shape), value.variance().reshape(shape), False)
    return value.reshape(shape)


@register(aten._native_batch_norm_legit_no_training.default)
def batch_norm(ctx: RuleContext, x, weight, bias, running_mean, running_var, momentum, eps):
    """Eval-mode batch norm: ``(x - mu) * gamma / sqrt(running_var + eps) + beta`` with fixed statistics."""
    ndim = x.mean.dim() if is_random(x) else x.dim()
    inv_std = _per_channel(torch.rsqrt(running_var + eps), ndim)
    scale = inv_std if weight is None else mul(ctx, _per_channel(weight, ndim), inv_std)
    out = mul(ctx, sub(ctx, x, _per_channel(running_mean, ndim)), scale)
    if bias is not None:
        out = add(ctx, out, _per_channel(bias, ndim))
    empty = running_mean.new_zeros(0)
    return out, empty, empty
