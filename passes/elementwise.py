"""Elementwise arithmetic: add, sub, mul, div, pow, where, and ops whose output carries no variance.

Every rule is linear in the maps of its operands (``combine``: each operand's maps scaled by its partial
derivative), so operands that share noise, whatever path they took, are combined exactly.  A product of two
random values is the bilinear family: its two partial products are the JVP, and under ``predictive="suq"`` the
family adds the Gaussian second-order term.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .moment import Moment, Noise, RowCovarianceNoise, combine, is_random, mean_of
from .registry import RuleContext, register

aten = torch.ops.aten


def second_order_product(ctx: RuleContext, mean: Tensor, a: Moment, b: Moment) -> Moment | None:
    """The part of ``a * b`` beyond its JVP for independent operands: ``Var(da db) = p q`` per entry (full:
    ``Cov_ij = Sa_ij Sb_ij``), a fresh noise, uncorrelated with the JVP's terms (third moments vanish); the paper's
    ``v S`` term of a random weight times a random input.  Operands that share noise (``x * sigmoid(x)``, a GRU's
    gates) are one function of that noise and are linearised as one, as the activations are: their product gets
    no second-order term.  None under ``predictive="glm"``."""
    if ctx.first_order or _shares_noise(a, b):
        return None
    if not ctx.keeps_maps:
        return Moment.diagonal(mean, (a.variance() * b.variance()).expand(mean.shape))
    if a.has_operator_maps or b.has_operator_maps:  # a convolution network's: as the convolution's own term
        return Moment.diagonal(mean, (a.propagated_variance() * b.propagated_variance()).expand(mean.shape))
    cov = a.covariance() * b.covariance()
    return Moment.of_noise(mean, RowCovarianceNoise(cov.expand(*mean.shape, mean.shape[-1])))


def _shares_noise(a: Moment, b: Moment) -> bool:
    groups = {id(t.noise.group) for t in a.terms}
    return any(id(t.noise.group) in groups for t in b.terms)


def defbilinear(op, product: Callable[..., Tensor], left_partial, right_partial) -> Callable:
    """Register a product ``op(a, b)``: ``left_partial(b_mean)`` scales ``a``'s maps and ``right_partial(a_mean)``
    scales ``b``'s (elementwise partial derivatives); with both operands random the family adds
    :func:`second_order_product` under ``predictive="suq"``."""

    def rule(ctx: RuleContext, a, b) -> Moment | Tensor:
        mean = product(mean_of(a), mean_of(b))
        out = combine(mean, [(left_partial(mean_of(b)), a), (right_partial(mean_of(a)), b)])
        if is_random(a) and is_random(b):
            extra = second_order_product(ctx, mean, a, b)
            if extra is not None:
                out = out.plus(*extra.terms) if is_random(out) else extra
        return out

    rule.__name__ = f"bilinear_{op.__name__.replace('.', '_')}"
    rule.__doc__ = f"{op}: bilinear; JVP ``b da + a db``, plus the second-order term under suq."
    register(op, reads="entrywise")(rule)
    return rule


def _as_tensor(x) -> Tensor | float:
    return x if isinstance(x, Tensor) else float(x)


mul = defbilinear(aten.mul.Tensor, aten.mul.Tensor, _as_tensor, _as_tensor)
register(aten.mul.Scalar, reads="entrywise")(mul)


@register(aten.add.Tensor, aten.add.Scalar, reads="entrywise")
def add(ctx: RuleContext, a, b, alpha=1) -> Moment:
    """``a + alpha b``: linear; maps of shared noises add (exact)."""
    return combine(aten.add.Tensor(mean_of(a), mean_of(b), alpha=alpha), [(1.0, a), (float(alpha), b)])


@register(aten.sub.Tensor, aten.sub.Scalar, reads="entrywise")
def sub(ctx: RuleContext, a, b, alpha=1) -> Moment:
    """``a - alpha b``: linear (exact)."""
    return combine(aten.sub.Tensor(mean_of(a), mean_of(b), alpha=alpha), [(1.0, a), (-float(alpha), b)])


@register(aten.rsub.Scalar, aten.rsub.Tensor, whole=True, reads="entrywise")
def rsub(ctx: RuleContext, a, b, alpha=1) -> Moment:
    """``b - alpha a``."""
    return sub(ctx, b, a, alpha)


@register(aten.neg.default, reads="entrywise")
def neg(ctx: RuleContext, a: Moment) -> Moment:
    """``-a``: linear (exact)."""
    return a.scaled(-a.mean, -1.0)


@register(aten.div.Tensor, aten.div.Scalar, reads="entrywise")
def div(ctx: RuleContext, a, b) -> Moment:
    """``a / b`` linearised: d/da = 1/m_b, d/db = -m_a/m_b^2 (exact when only ``a`` is random)."""
    mean = aten.div.Tensor(mean_of(a), mean_of(b))
    inv_b = 1.0 / _as_tensor(mean_of(b))
    return combine(mean, [(inv_b, a), (-mean * inv_b, b)])


@register(aten.pow.Tensor_Scalar)
def pow_scalar(ctx: RuleContext, a: Moment, exponent) -> Moment:
    """``a^p`` linearised: derivative p a^(p-1)."""
    mean = aten.pow.Tensor_Scalar(a.mean, exponent)
    return a.scaled(mean, exponent * aten.pow.Tensor_Scalar(a.mean, exponent - 1))


@register(aten.pow.Tensor_Tensor)
def pow_tensor(ctx: RuleContext, a, b) -> Moment:
    """``a^b`` linearised in both operands: d/da = b a^(b-1), d/db = a^b log a."""
    mean = aten.pow.Tensor_Tensor(mean_of(a), mean_of(b))
    d_a = mean_of(b) * aten.pow.Tensor_Tensor(mean_of(a), mean_of(b) - 1) if is_random(a) else 0.0
    d_b = mean * torch.log(mean_of(a)) if is_random(b) else 0.0
    return combine(mean, [(d_a, a), (d_b, b)])


@register(aten.where.self, reads="entrywise")
def where(ctx: RuleContext, condition: Tensor, a, b) -> Moment:
    """``where(c, a, b)`` selects elementwise; the selected operand's maps pass unchanged (exact)."""
    condition = mean_of(condition)
    mean = aten.where.self(condition, mean_of(a), mean_of(b))
    return combine(mean, [(condition.to(mean.dtype), a), ((~condition).to(mean.dtype), b)])


def defzero(*ops) -> None:
    """Ops whose output is deterministic given the mean (comparisons, rounding, sign, argmax, shapes): a
    linearisation has zero derivative there, so the op runs on the means."""
    for op in ops:

        def rule(ctx: RuleContext, *args, _op=op, **kwargs):
            return _op(*(mean_of(a) for a in args), **kwargs)

        rule.__name__ = f"zero_{op.__name__.replace('.', '_')}"
        rule.__doc__ = f"{op}: evaluated at the mean; carries no variance."
        register(op, whole=True)(rule)


defzero(
    aten.gt.Scalar, aten.gt.Tensor, aten.ge.Scalar, aten.ge.Tensor, aten.lt.Scalar, aten.lt.Tensor,
    aten.le.Scalar, aten.le.Tensor, aten.eq.Scalar, aten.eq.Tensor, aten.ne.Scalar, aten.ne.Tensor,
    aten.sign.default, aten.floor.default, aten.ceil.default, aten.round.default, aten.trunc.default,
    aten.argmax.default, aten.argmin.default, aten.isnan.default, aten.isinf.default,
    aten.logical_not.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
    aten.empty_like.default, aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int,
)

__all__ = ["Noise", "add", "defbilinear", "defzero", "div", "mul", "neg", "sub", "where"]
