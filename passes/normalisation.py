"""Normalisation layers at inference: BatchNorm (eval) and LayerNorm.

BatchNorm in eval mode is a per-channel affine map with fixed statistics:
``y = (x - mu) * gamma / sqrt(running_var + eps) + beta`` so ``Var y = gamma^2 v / (running_var + eps)``
(exact for deterministic gamma; a random gamma or beta is an independent product or sum).
"""

from __future__ import annotations

import torch

from .elementwise import add, mul, sub
from .moment import Moment, is_random, mean_of
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


@register(aten.layer_norm.default)
def layer_norm(ctx: RuleContext, x, normalized_shape, weight=None, bias=None, eps: float = 1e-5, cudnn_enable=True):
    """LayerNorm with its statistics taken from the mean input and held constant (the paper's rule):
    ``y = (x - mu(m)) / sqrt(var(m) + eps) * gamma + beta``, so ``Var y = gamma^2 v / (var(m) + eps)``
    (full: the same scaling on both sides of the covariance); a random gamma or beta is an independent
    product or sum.  The mean is the plain layer_norm of the mean."""
    x_mean = x.mean if is_random(x) else x
    dims = tuple(range(-len(normalized_shape), 0))
    centre = x_mean.mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(x_mean.var(dim=dims, unbiased=False, keepdim=True) + eps)
    out = mul(ctx, sub(ctx, x, centre), inv_std)
    if weight is not None:
        out = mul(ctx, out, weight)
    if bias is not None:
        out = add(ctx, out, bias)
    mean = aten.layer_norm.default(x_mean, normalized_shape, mean_of(weight), mean_of(bias), eps)
    return out.with_tangent(mean, out.tangent) if out.tangent is not None else Moment(mean, out.var, out.full)


@register(aten.native_layer_norm.default)
def native_layer_norm(ctx: RuleContext, x, normalized_shape, weight, bias, eps: float):
    """``native_layer_norm`` returns (out, mean, rstd); the statistics are those of the mean input."""
    x_mean = x.mean if is_random(x) else x
    _, centre, inv_std = aten.native_layer_norm.default(x_mean, normalized_shape, mean_of(weight), mean_of(bias), eps)
    return layer_norm(ctx, x, normalized_shape, weight, bias, eps), centre, inv_std
