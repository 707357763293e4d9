"""Linear layers and matrix products: the bilinear family for ``h = a @ w + b``.

Written for ``a: (..., k)`` the activation and ``w: (k, m)`` the right operand (``linear`` passes ``W.T``):

* mean ``m_a @ M + m_b`` (the plain op at the means);
* JVP: the input's maps through the mean weight (``J <- M^T J``, exact), the weight noise applied to the mean
  input (a :class:`~momentprop.passes.moment.WeightUse`: ``Var = m_a^2 @ S`` per row, correlated with every other
  use of the same weight), the bias noise broadcast to the rows;
* second order (``predictive="suq"``, the paper's moment matching): ``Var(da @ dW) = v_a @ S``, a fresh noise.

So the diagonal variance is the paper's ``m_a^2 S + v_a (M^2 + S) + s_b``, computed in that closed form when
matrix maps are collapsed (``covariance="diag"``), and with ``predictive="glm"`` and ``covariance="full"`` the
output is exactly the linearised (GLM) predictive, ``J S J^T``, for any posterior that is block-diagonal across
parameter tensors.  Weights with correlated entries (Kronecker factors, dense blocks; ``weights.py``) go through
``structured_linear``.  A random right operand that is not a weight (the values in attention) mixes rows:
``A @ V`` with deterministic ``A`` uses the values' row-shared weight noise where it is known
(``shared_weight.py``), else ``sum_s A_ts^2 Cov(V_s)`` (the paper's rule), as a fresh noise.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .moment import (
    MatrixTangent, Moment, Noise, RowCovarianceNoise, Term, WeightUse, _squared, _times, broadcast_to, diagonal_matrix,
    expand_move, is_random, mean_of, merged, permute_move, same_shape, squares_times,
)
from .registry import RuleContext, register
from .shared_weight import SharedNoise
from .weights import DenseBlockNoise, KronNoise

aten = torch.ops.aten


def _as_left(w: Tensor) -> Tensor:
    """A right operand (k, m) or (..., k, m) as the map over the last dim of a's rows: (m, k) or (..., 1, m, k)."""
    return w.mT if w.dim() == 2 else w.mT.unsqueeze(-3)


def _accumulate(total: Tensor | None, part: Tensor) -> Tensor:
    return part if total is None else total + part


def _is_weight(w: Moment) -> bool:
    """A 2-D right operand whose maps are elementwise on diagonal noises (a parameter, possibly transposed)."""
    return w.mean.dim() == 2 and all(
        t.jacobian is None and t.noise.row_covariance is None and type(t.noise) is Noise for t in w.terms
    )


def _shared_of(w: Moment) -> SharedNoise | None:
    """The row-shared record of a projection's output that accounts for every noise of ``w``, if any."""
    noises = {id(t.noise) for t in w.terms}
    for t in w.terms:
        if t.shared is not None and t.shared.usable_as_right_operand() and noises <= t.shared.covers:
            return t.shared
    return None


def _bias_terms(mean: Tensor, bias: Moment, beta: float) -> tuple[Term, ...]:
    if not same_shape(bias.mean.shape, mean.shape):
        bias = bias.moved(mean, expand_move(bias.mean.shape, mean.shape))
    moved = bias
    return moved.scaled(mean, beta).terms if beta != 1.0 else moved.terms


def product(ctx: RuleContext, mean: Tensor, a, w, bias=None, alpha: float = 1.0, beta: float = 1.0):
    """Moments of ``beta * bias + alpha * (a @ w)`` whose mean the caller computed with the plain op."""
    if not ctx.keeps_maps:
        return _collapsed_product(ctx, mean, a, w, bias, alpha, beta)
    terms: list[Term] = []
    if is_random(a):
        left = _as_left(mean_of(w))
        terms.extend(a.left_multiplied(mean, left if alpha == 1.0 else alpha * left).terms)
    bias_terms = _bias_terms(mean, bias, beta) if is_random(bias) else ()
    if is_random(w):
        weight_terms = _weight_terms(ctx, mean, a, w, alpha)
        if not is_random(a) and len(weight_terms) == 1 and isinstance(weight_terms[0].noise, WeightUse):
            # a projection of a deterministic input: keep its row-shared record for attention
            use = weight_terms[0].noise
            bias_var = None if not bias_terms else _variance_of(mean, bias_terms)[(0,) * (mean.dim() - 1)]
            shared = SharedNoise.of_projection(use.inputs, use.weight_var, bias_var, None, mean.shape,
                                               {id(t.noise) for t in (*weight_terms, *bias_terms)})
            weight_terms = [replace(weight_terms[0], shared=shared)]
        terms.extend(weight_terms)
    terms.extend(bias_terms)
    return merged(mean, terms)


def _variance_of(mean: Tensor, terms) -> Tensor:
    return Moment(mean, tuple(terms)).variance()


def _weight_terms(ctx: RuleContext, mean: Tensor, a, w: Moment, alpha: float) -> list[Term]:
    a_mean = mean_of(a)
    inputs = a_mean if alpha == 1.0 else alpha * a_mean
    if _is_weight(w):
        terms, second = [], None
        for t in w.terms:
            weight_var = t.layout.apply(t.noise.variance)
            if not (isinstance(t.scale, float) and t.scale == 1.0):
                weight_var = _times(_squared(t.scale), weight_var)
            key = (t.layout.key, id(t.scale) if isinstance(t.scale, Tensor) else t.scale)
            terms.append(Term(WeightUse(t.noise, inputs, weight_var, key)))
            if is_random(a) and not ctx.first_order:
                part = a.propagated_variance() @ weight_var
                second = _accumulate(second, part if alpha == 1.0 else (alpha * alpha) * part)
        if second is not None:
            terms.append(Term(Noise(second)))
        return terms
    # a computed random right operand (values): its rows mixed by a, taken independent across rows (the paper's
    # sum_s E[a_ts^2] Cov(V_s)), or with their row-shared weight noise where it is known
    if not is_random(a) and (shared := _shared_of(w)) is not None:
        return [Term(Noise(shared.averaged_variance(inputs)))]
    second = inputs * inputs
    if is_random(a) and not ctx.first_order:
        second = second + (alpha * alpha) * a.variance()
    return [Term(RowCovarianceNoise(torch.einsum("...ts,...sij->...tij", second, w.covariance())))]


def _collapsed_product(ctx: RuleContext, mean: Tensor, a, w, bias, alpha: float, beta: float) -> Moment | Tensor:
    """The paper's diagonal rule in closed form: ``m_a^2 S + v_a (M^2 + S) + s_b`` (glm: without ``v_a S``), as
    one fresh noise, with the weight noise kept as row-shared noise (``SharedNoise``) for a later product that
    mixes rows (attention)."""
    a_mean, w_mean = mean_of(a), mean_of(w)
    scale = alpha * alpha
    var, v_a, rest, shared = None, None, None, None
    if is_random(a):
        v_a = a.variance()
        rest = v_a @ (w_mean * w_mean)
        var = rest if scale == 1.0 else scale * rest
    if is_random(w):
        shared_in = _shared_of(w)
        if shared_in is not None and not is_random(a):
            var = _accumulate(var, shared_in.averaged_variance(a_mean if alpha == 1.0 else alpha * a_mean))
        else:
            w_var = w.variance()
            part = squares_times(a_mean, w_var, extra=None if (v_a is None or ctx.first_order) else v_a)
            var = _accumulate(var, part if scale == 1.0 else scale * part)
            if w_mean.dim() == 2 and alpha == 1.0:
                bias_var = None
                if is_random(bias):
                    bias_var = bias.variance() if beta == 1.0 else beta * beta * bias.variance()
                if rest is not None and not ctx.first_order:
                    rest = rest + v_a @ w_var
                if bias_var is None or bias_var.dim() == 1:
                    shared = (a_mean, w_var, bias_var, rest, mean.shape)
    if is_random(bias):
        b_var = bias.variance()
        var = _accumulate(var, b_var if beta == 1.0 else beta * beta * b_var)
    if var is None:
        return mean
    noise = Noise(broadcast_to(var, mean.shape))
    if shared is not None:
        shared = SharedNoise.of_projection(*shared, {id(noise)})
    return Moment(mean, (Term(noise, shared=shared),))


def structured_linear(ctx: RuleContext, mean: Tensor, x, weight: Moment, bias) -> Moment:
    """``x W^T + b`` for a weight with correlated entries (Kronecker factors or a dense block): the weight noise
    ``E_x[Cov(W x | x)]`` from its structure, plus the input noise and the bias as for any weight.

    For ``dW = Q_out Z Q_in^T`` (Kronecker): ``E[Cov(dW x)] = Q_out diag(D E[(Q_in^T x)^2]) Q_out^T`` with
    ``E[(Q_in^T x)^2] = (Q_in^T m)^2 + diag(Q_in^T Sigma_x Q_in)``, exact for the input covariance ``Sigma_x``
    that full mode forms (only that diagonal enters, as the entries of ``Z`` are independent).  Diag mode has only
    the input variances and uses ``diag(Sigma_x)`` there, dropping the input's correlations (the paper's rule)."""
    noise = weight.terms[0].noise
    x_mean = mean_of(x)
    random_x = is_random(x)
    joint_bias = isinstance(noise, DenseBlockNoise) and noise.with_bias
    if not ctx.keeps_maps:
        var = None
        x_var = x.variance() if random_x else None
        if random_x:
            var = x_var @ (weight.mean * weight.mean).T
        if isinstance(noise, KronNoise):
            rotated = x_mean @ noise.q_in
            second = rotated * rotated
            if random_x and not ctx.first_order:
                second = second + x_var @ (noise.q_in * noise.q_in)
            var = _accumulate(var, noise.eigen_variance(second) @ (noise.q_out * noise.q_out).T)
        else:
            cov = noise.covariance(x_mean, None if (ctx.first_order or not random_x) else x_var, None)
            var = _accumulate(var, torch.diagonal(cov, dim1=-2, dim2=-1))
        if is_random(bias) and not joint_bias:
            var = var + bias.variance()
        return Moment.diagonal(mean, var.expand(mean.shape))
    terms: list[Term] = []
    if random_x:
        terms.extend(x.left_multiplied(mean, weight.mean).terms)
    if isinstance(noise, KronNoise):
        q_out = MatrixTangent.of(noise.q_out)
        rotated = x_mean @ noise.q_in
        terms.append(Term(WeightUse(noise, rotated, noise.d.T, ("kron",)), jacobian=q_out))
        if random_x and not ctx.first_order:  # E over dx of the weight noise: diag(Q_in^T Sigma_x Q_in) D^T
            if x.has_operator_maps:  # a convolution network's maps: their propagated variance, as products take it
                second = x.propagated_variance() @ (noise.q_in * noise.q_in)
            else:
                cov = x.covariance()
                second = ((cov @ noise.q_in) * noise.q_in).sum(-2)
            terms.append(Term(Noise(noise.eigen_variance(second)), jacobian=MatrixTangent.of(noise.q_out)))
    else:
        input_cov = None
        if random_x and not ctx.first_order:
            input_cov = diagonal_matrix(x.propagated_variance()) if x.has_operator_maps else x.covariance()
        cov = noise.covariance(x_mean, None, input_cov)
        terms.append(Term(RowCovarianceNoise(cov)))
    if is_random(bias) and not joint_bias:
        terms.extend(_bias_terms(mean, bias, 1.0))
    return merged(mean, terms)


def _structured(weight) -> bool:
    return (is_random(weight) and len(weight.terms) == 1
            and isinstance(weight.terms[0].noise, (KronNoise, DenseBlockNoise)))


def _transposed(w):
    """``W.T`` for a weight stored (out, in): a plain tensor, or a moment whose maps are moved."""
    if not is_random(w):
        return w.mT
    return w.moved(w.mean.mT, permute_move([1, 0]))


@register(aten.linear.default, whole=True)
def linear(ctx: RuleContext, x, weight, bias=None) -> Moment:
    """``x W^T + b`` (torch layout: W is (out, in))."""
    mean = aten.linear.default(mean_of(x), mean_of(weight), mean_of(bias))
    if _structured(weight):
        return structured_linear(ctx, mean, x, weight, bias)
    return product(ctx, mean, x, _transposed(weight), bias)


@register(aten.addmm.default, whole=True)
def addmm(ctx: RuleContext, bias, a, w, beta=1, alpha=1) -> Moment:
    """``beta b + alpha (a @ w)`` (GPT-2's Conv1D stores w as (in, out))."""
    mean = aten.addmm.default(mean_of(bias), mean_of(a), mean_of(w), beta=beta, alpha=alpha)
    return product(ctx, mean, a, w, bias, alpha=float(alpha), beta=float(beta))


@register(aten.mm.default, aten.bmm.default, aten.matmul.default, whole=True)
def matmul(ctx: RuleContext, a, w) -> Moment:
    """``a @ w``; a random left operand's maps act over its last dim."""
    mean = torch.matmul(mean_of(a), mean_of(w))
    return product(ctx, mean, a, w)


MATRIX_PRODUCTS = frozenset({aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default,
                             aten.matmul.default})
