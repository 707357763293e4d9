"""Linear layers and matrix products: Gaussian moment matching (the paper's rule for ``h = W a + b``).

Written for ``h = a @ w + b`` with ``a: (..., k)`` the activation, ``w: (k, m)`` the right operand (``linear``
passes ``W.T``), both independent, ``w`` with elementwise variance ``S`` and mean ``M``:

* mean ``m_a @ M + m_b`` (the plain op at the means);
* diag: ``Var h = m_a^2 @ S + v_a @ (M^2 + S) + s_b`` (exact for independent Gaussian operands);
* full (``Sigma_a`` over ``k``): ``Cov h = M^T Sigma_a M + diag((m_a^2 + diag Sigma_a) @ S + s_b)``.

With ``predictive="glm"`` the terms ``v_a S`` (input variance times weight variance, second order in the
weights) are dropped: full-covariance propagation is then exactly the linearised-Laplace (GLM) predictive for a
posterior that is block-diagonal across layers.

A diagonal input with a full output (the last layer under ``output_covariance=True``) uses
``M^T diag(v_a) M`` without forming ``diag(v_a)``.  A random right operand whose rows carry a full covariance
(the values in attention) adds ``Cov(out_j, out_l) = sum_k E[a_k^2] Sigma_w[k, j, l]`` instead of the
diagonal term (the paper's rule for ``softmax(QK^T) V`` when the attention weights are deterministic).
Weights with correlated entries (Kronecker factors, dense blocks of a full posterior; ``weights.py``) go through
``structured_linear``.  A result whose covariance is exactly diagonal stays a diagonal moment even in full mode.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .moment import MatrixTangent, Moment, broadcast_to, diagonal_matrix, is_random, mean_of
from .registry import RuleContext, register
from .shared_weight import SharedNoise
from .weights import DenseWeight, FullVector, KronWeight

aten = torch.ops.aten


def product_moment(ctx: RuleContext, mean: Tensor, a, w, bias=None, alpha: float = 1.0, beta: float = 1.0):
    """Moments of ``beta * bias + alpha * (a @ w)`` whose mean the caller computed with the plain op."""
    if _extends_tangent(ctx, a, w, bias):  # every noise's tangent J <- w^T J on its own root (see moment.py)
        return a.left_multiplied(mean, w.mT if alpha == 1.0 else alpha * w.mT)
    if _adds_weight_noise_part(ctx, a, w, bias) and not w.full and w.mean.dim() == 2:
        noise = _second_moment(ctx, a) @ w.variance()
        left = w.mean.mT
        if alpha != 1.0:
            noise, left = (alpha * alpha) * noise, alpha * left
        if is_random(bias):
            noise = noise + (bias.variance() if beta == 1.0 else (beta * beta) * bias.variance())
        return a.left_multiplied(mean, left).plus_parts(Moment(mean, noise, False))
    a, w, bias = (t.materialised() if is_random(t) else t for t in (a, w, bias))
    full_out = ctx.covariance == "full" or any(is_random(t) and t.full for t in (a, w))
    if alpha != 1.0:
        a = _scaled(a, alpha)
    elementwise, cov = _bias_terms(bias, beta, full_out)
    a_mean, w_mean = mean_of(a), mean_of(w)
    a_diag = is_random(a) and not a.full

    if is_random(w) and not is_random(a) and w.shared is not None and w.shared.usable_as_right_operand():
        # rows mixed by a deterministic a (attention): the row-shared weight noise, exactly
        return _finish(mean, _accumulate(elementwise, w.shared.averaged_variance(a)), cov, full_out)
    if is_random(w) and w.full:
        cov = _accumulate(cov, torch.einsum("...ik,...kjl->...ijl", _second_moment(ctx, a), w.var))
    elif is_random(w) and (not is_random(a) or (a_diag and not full_out)) and w_mean.dim() == 2 and cov is None:
        # a weight times a deterministic or diagonal input: m_a^2 S + v_a (M^2 + S) (glm: v_a M^2) stays
        # diagonal; the weight-noise part is kept as row-shared noise for a later product that mixes rows
        w_var = w.variance()
        elementwise = _accumulate(elementwise, (a_mean * a_mean) @ w_var)
        rest = None
        if is_random(a):
            rest = a.var @ (w_mean * w_mean if ctx.first_order else w_mean * w_mean + w_var)
        out = _finish(mean, _accumulate(elementwise, rest) if rest is not None else elementwise, None, False)
        bias_var = None if not is_random(bias) else (bias.variance() if beta == 1.0 else beta * beta * bias.variance())
        shared = SharedNoise.of_projection(a_mean, w_var, bias_var, rest, mean.shape)
        return Moment(out.mean, out.var, False, shared=shared)
    elif is_random(w):
        elementwise = _accumulate(elementwise, _second_moment(ctx, a) @ w.variance())
    elementwise, cov = _input_terms(a, w_mean, elementwise, cov, full_out)
    return _finish(mean, elementwise, cov, full_out)


def _extends_tangent(ctx: RuleContext, a, w, bias) -> bool:
    """Full covariance, a random input, deterministic weights: the input's tangent is extended instead."""
    if not is_random(a) or is_random(w) or is_random(bias) or w.dim() != 2:
        return False
    return ctx.covariance == "full" or a.full or a.tracked


def _adds_weight_noise_part(ctx: RuleContext, a, w, bias) -> bool:
    """Full covariance, a random input, random weights without correlations (or Kronecker-factored) and no bias
    covariance: the input's noises go through the mean weights and the weight noise is one more part."""
    return (
        ctx.covariance == "full" and is_random(a) and is_random(w) and not isinstance(w, DenseWeight)
        and not (is_random(bias) and bias.full)
    )


def _second_moment(ctx: RuleContext, a) -> Tensor:
    """``E[a^2]`` for the weight-noise term; first order in the weights (glm) keeps only ``m_a^2``."""
    a_mean = mean_of(a)
    if not is_random(a) or ctx.first_order:
        return a_mean * a_mean
    return a_mean * a_mean + a.variance()


def _bias_terms(bias, beta: float, full_out: bool) -> tuple[Tensor | None, Tensor | None]:
    """The bias (co)variance as the first term of the sums (a runtime then fuses each product with its addition,
    a Gemm with C, as it does for the plain layer)."""
    if not is_random(bias):
        return None, None
    scale = 1.0 if beta == 1.0 else beta * beta
    if bias.full and full_out:
        return None, scale * bias.var if scale != 1.0 else bias.var
    var = bias.variance()
    return (scale * var if scale != 1.0 else var), None


def _input_terms(a, w_mean: Tensor, elementwise, cov, full_out: bool):
    """Input noise through the mean weight: ``M^T Sigma_a M`` (or its diagonal ``v_a @ M^2``)."""
    if not is_random(a):
        return elementwise, cov
    # a batched right operand (..., k, m) meets a covariance (..., n, k, k) of each of the n rows of a
    w_rows = w_mean if w_mean.dim() == 2 else w_mean.unsqueeze(-3)
    if a.full:
        cov = _accumulate(cov, w_rows.mT @ a.var @ w_rows)
    elif full_out:
        cov = _accumulate(cov, (w_rows.mT * a.var.unsqueeze(-2)) @ w_rows)
    else:
        elementwise = _accumulate(elementwise, a.var @ (w_mean * w_mean))
    return elementwise, cov


def structured_linear(ctx: RuleContext, mean: Tensor, x, weight: KronWeight | DenseWeight, bias) -> Moment:
    """``x W^T + b`` for a weight with correlated entries: the weight noise ``E_x[Cov(W x | x)]`` from its
    structure, plus the input noise and the bias as for any weight."""
    if isinstance(weight, KronWeight) and ctx.covariance == "full":
        # the weight noise as a part: diagonal in the output eigenbasis Q_out, so no (C, C) covariance is formed
        parts = [Moment(mean, weight.eigen_noise(mean_of(x) if ctx.first_order else x), False, MatrixTangent.of(weight.q_out))]
        if isinstance(bias, FullVector):  # a dense bias covariance: a part in its own eigenbasis
            parts.append(bias.noise_part(mean))
        elif is_random(bias):
            parts.append(Moment(mean, bias.variance(), False))
        if not is_random(x):
            return parts[0].plus_parts(*parts[1:])
        return x.left_multiplied(mean, weight.mean).plus_parts(*parts)
    x = x.materialised() if is_random(x) else x
    full_out = ctx.covariance == "full" or (is_random(x) and x.full)
    joint_bias = isinstance(weight, DenseWeight) and weight.with_bias
    elementwise, cov = _bias_terms(None if joint_bias else bias, 1.0, full_out)
    noise = weight.noise(mean_of(x) if ctx.first_order else x, full_out)
    if full_out:
        cov = _accumulate(cov, noise)
    else:
        elementwise = _accumulate(elementwise, noise)
    elementwise, cov = _input_terms(x, weight.mean.mT, elementwise, cov, full_out)
    return _finish(mean, elementwise, cov, full_out)


def _finish(mean: Tensor, elementwise: Tensor | None, cov: Tensor | None, full_out: bool) -> Moment | Tensor:
    if elementwise is None and cov is None:  # nothing random reached the product
        return mean
    if cov is None:  # exactly diagonal (say, a deterministic input): keep it diagonal, never form diag_embed
        full_out = False
    if not full_out:
        return Moment(mean, broadcast_to(elementwise, mean.shape), False)
    if elementwise is not None:
        cov = _accumulate(cov, diagonal_matrix(broadcast_to(elementwise, mean.shape)))
    return Moment(mean, broadcast_to(cov, (*mean.shape, mean.shape[-1])), True)


def _accumulate(total: Tensor | None, part: Tensor) -> Tensor:
    return part if total is None else part + total


def _scaled(a, alpha: float):
    if not is_random(a):
        return alpha * a
    return Moment(alpha * a.mean, alpha * alpha * a.var, a.full)


def _transposed(w):
    """``W.T`` for a weight stored (out, in), as a plain tensor or a moment with elementwise variance."""
    if not is_random(w):
        return w.mT
    return Moment(w.mean.mT, w.variance().mT, False)


@register(aten.linear.default, raw=True)
def linear(ctx: RuleContext, x, weight, bias=None) -> Moment:
    """``x W^T + b`` (torch layout: W is (out, in))."""
    mean = aten.linear.default(mean_of(x), mean_of(weight), mean_of(bias))
    if isinstance(weight, (KronWeight, DenseWeight)):
        return structured_linear(ctx, mean, x, weight, bias)
    return product_moment(ctx, mean, x, _transposed(weight), bias)


@register(aten.addmm.default, raw=True)
def addmm(ctx: RuleContext, bias, a, w, beta=1, alpha=1) -> Moment:
    """``beta b + alpha (a @ w)`` (GPT-2's Conv1D stores w as (in, out))."""
    mean = aten.addmm.default(mean_of(bias), mean_of(a), mean_of(w), beta=beta, alpha=alpha)
    return product_moment(ctx, mean, a, w, bias, alpha=float(alpha), beta=float(beta))


@register(aten.mm.default, aten.bmm.default, aten.matmul.default, raw=True)
def matmul(ctx: RuleContext, a, w) -> Moment:
    """``a @ w`` with independent operands; a random left operand's covariance is over its last dim."""
    mean = torch.matmul(mean_of(a), mean_of(w))
    return product_moment(ctx, mean, a, w)
