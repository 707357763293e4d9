"""Elementwise arithmetic: add, sub, mul, div, pow, where, and ops whose output carries no variance.

Operands of one root (the same random tensor reached along different paths) are combined exactly by the chain
rule on the pending tangent; operands of different roots are taken as independent (the paper's assumption for
residuals and products of random tensors).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .moment import Moment, is_random, linear_combination, merge_parts, promote, same_root
from .registry import RuleContext, register

aten = torch.ops.aten


def _combine(mean: Tensor, a: object, b: object, d_a, d_b) -> Moment:
    """Linearised combination of two operands: ``d_a``, ``d_b`` are the local partial derivatives."""
    if not (is_random(a) or is_random(b)):
        return mean
    if not is_random(b):
        return a.chained(mean, d_a)
    if not is_random(a):
        return b.chained(mean, d_b)
    if a.tracked or b.tracked or same_root(a, b):  # parts of one root combine by the chain rule, the rest add
        return merge_parts(mean, [(d_a, a), (d_b, b)])
    return linear_combination(mean, [(d_a, a), (d_b, b)])


def _mean(x: object) -> object:
    return x.mean if is_random(x) else x


@register(aten.add.Tensor, aten.add.Scalar, raw=True)
def add(ctx: RuleContext, a, b, alpha=1) -> Moment:
    """``a + alpha b``: mean adds; var_a + alpha^2 var_b for independent operands (exact)."""
    return _combine(aten.add.Tensor(_mean(a), _mean(b), alpha=alpha), a, b, 1.0, float(alpha))


@register(aten.sub.Tensor, aten.sub.Scalar, raw=True)
def sub(ctx: RuleContext, a, b, alpha=1) -> Moment:
    """``a - alpha b``: var_a + alpha^2 var_b for independent operands (exact)."""
    return _combine(aten.sub.Tensor(_mean(a), _mean(b), alpha=alpha), a, b, 1.0, -float(alpha))


@register(aten.rsub.Scalar, aten.rsub.Tensor, raw=True)
def rsub(ctx: RuleContext, a, b, alpha=1) -> Moment:
    """``b - alpha a``."""
    return sub(ctx, b, a, alpha)


@register(aten.neg.default, raw=True)
def neg(ctx: RuleContext, a: Moment) -> Moment:
    """``-a``: the variance is unchanged (exact)."""
    return a.chained(-a.mean, -1.0)


@register(aten.mul.Tensor, aten.mul.Scalar, raw=True)
def mul(ctx: RuleContext, a, b) -> Moment:
    """``a b``. With a constant c: c^2 var (exact).  Independent random operands: the exact product
    variance ``m_a^2 v_b + m_b^2 v_a + v_a v_b`` (full: the same with outer products and Hadamard products;
    first order, ``predictive="glm"``: without ``v_a v_b``)."""
    mean = aten.mul.Tensor(_mean(a), _mean(b))
    linear = _combine(mean, a, b, _mean(b), _mean(a))
    if not (is_random(a) and is_random(b)) or same_root(a, b) or ctx.first_order:
        return linear
    va, vb = promote(a, b)  # the second-order term, independent of both
    if linear.tracked:
        return linear.plus_parts(Moment(mean, va.var * vb.var, va.full))
    return Moment(mean, linear.var + va.var * vb.var, linear.full)


@register(aten.div.Tensor, aten.div.Scalar, raw=True)
def div(ctx: RuleContext, a, b) -> Moment:
    """``a / b`` linearised: d/da = 1/m_b, d/db = -m_a/m_b^2 (exact when only ``a`` is random)."""
    mean = aten.div.Tensor(_mean(a), _mean(b))
    inv_b = 1.0 / _mean(b)
    return _combine(mean, a, b, inv_b, -mean * inv_b if is_random(b) else 0.0)


@register(aten.pow.Tensor_Scalar, raw=True)
def pow_scalar(ctx: RuleContext, a: Moment, exponent) -> Moment:
    """``a^p`` linearised: derivative p a^(p-1)."""
    mean = aten.pow.Tensor_Scalar(a.mean, exponent)
    return a.chained(mean, exponent * aten.pow.Tensor_Scalar(a.mean, exponent - 1))


@register(aten.pow.Tensor_Tensor, raw=True)
def pow_tensor(ctx: RuleContext, a, b) -> Moment:
    """``a^b`` linearised in both operands: d/da = b a^(b-1), d/db = a^b log a."""
    mean = aten.pow.Tensor_Tensor(_mean(a), _mean(b))
    d_a = _mean(b) * aten.pow.Tensor_Tensor(_mean(a), _mean(b) - 1) if is_random(a) else 0.0
    d_b = mean * torch.log(_mean(a)) if is_random(b) else 0.0
    return _combine(mean, a, b, d_a, d_b)


@register(aten.where.self, raw=True)
def where(ctx: RuleContext, condition: Tensor, a, b) -> Moment:
    """``where(c, a, b)`` selects elementwise; the selected operand's variance passes unchanged (exact)."""
    if is_random(condition):
        condition = condition.mean
    mean = aten.where.self(condition, _mean(a), _mean(b))
    return _combine(mean, a, b, condition.to(mean.dtype), (~condition).to(mean.dtype))


def _no_variance(op):
    """Ops whose output is deterministic given the mean (comparisons, rounding, sign, argmax, shapes):
    a linearisation has zero derivative there, so the op runs on the mean."""

    def rule(ctx: RuleContext, *args, **kwargs):
        return op(*(_mean(a) for a in args), **kwargs)

    rule.__doc__ = f"{op}: evaluated at the mean; carries no variance."
    return rule


for _op in (
    aten.gt.Scalar, aten.gt.Tensor, aten.ge.Scalar, aten.ge.Tensor, aten.lt.Scalar, aten.lt.Tensor,
    aten.le.Scalar, aten.le.Tensor, aten.eq.Scalar, aten.eq.Tensor, aten.ne.Scalar, aten.ne.Tensor,
    aten.sign.default, aten.floor.default, aten.ceil.default, aten.round.default, aten.trunc.default,
    aten.argmax.default, aten.argmin.default, aten.isnan.default, aten.isinf.default,
    aten.logical_not.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
    aten.empty_like.default, aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int,
):
    register(_op, raw=True)(_no_variance(_op))
