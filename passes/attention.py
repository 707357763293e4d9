"""Attention: softmax and scaled dot-product attention.

The paper's rule (the default, ``ctx.attention == "paper"``): queries and keys are deterministic, computed from
the means, so the attention weights ``A = softmax(q k^T / sqrt(d) + mask)`` carry no variance and only the
values are random.  The paper then takes ``Var(o_t) = sum_s A_ts^2 Var(v_s)``, as if every token's value had its
own weight sample; values projected by one random ``W_v`` are correlated across tokens, and that equation is up
to T times too small.  The product ``A @ v`` therefore uses the value projection's row-shared weight noise where
it is known (``shared_weight.py``): ``Var(o_t) = sum_i (sum_s A_ts x_si)^2 S_di`` plus the bias and the
token-independent rest, exact for deterministic ``A``.  With ``attention="linearised"`` the softmax is linearised
instead, ``J = diag(p) - p p^T``, so uncertainty in queries and keys reaches the output too (beyond the paper).
Masked keys get ``A = 0``; a query that sees no key at all gets zero variance, never NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .linear import matmul
from .moment import Moment, diagonal_matrix, expand_move, is_random, mean_of, permute_move, reshape_move
from .registry import RuleContext, register

aten = torch.ops.aten


def _softmax_moment(ctx: RuleContext, x: Moment, dim: int, probs: Tensor) -> Moment:
    """Linearised softmax along ``dim``: ``J = diag(p) - p p^T``, applied to every map along the last dim; else
    (or collapsed) ``Var y_i = p_i^2 (v_i (1 - 2 p_i) + sum_j p_j^2 v_j)`` (exactly ``sum_j J_ij^2 v_j``)."""
    if ctx.keeps_maps and dim % probs.dim() == probs.dim() - 1:
        jac = diagonal_matrix(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
        return x.left_multiplied(probs, jac)
    v = x.variance()
    var = probs * probs * (v * (1.0 - 2.0 * probs) + (probs * probs * v).sum(dim, keepdim=True))
    return Moment.diagonal(probs, var.clamp_min(0.0))


SOFTMAXES = (aten._softmax.default, aten.softmax.int)


@register(*SOFTMAXES, whole=True)
def softmax(ctx: RuleContext, x: Moment, dim: int, half_or_dtype=None) -> Moment | Tensor:
    """Softmax linearised; attention weights under the paper's rule are taken at the mean instead."""
    probs = torch.softmax(x.mean, dim)
    if ctx.attention == "paper" and ctx.attention_weights:
        return probs
    return _softmax_moment(ctx, x, dim, probs)


@register(aten.scaled_dot_product_attention.default, whole=True)
def scaled_dot_product_attention(
    ctx: RuleContext, q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, scale=None,
    enable_gqa: bool = False,
) -> Moment:
    """``softmax(q k^T * scale + mask) v`` per head: the weights from the means (paper) or linearised; the
    values through the product rule (``A @ v`` with deterministic ``A``: the values' shared weight noise, or
    ``sum_s A_ts^2 Cov(v_s)`` for values without it)."""
    q_mean, k_mean, v_mean = mean_of(q), mean_of(k), mean_of(v)
    mean = aten.scaled_dot_product_attention.default(
        q_mean, k_mean, v_mean, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa
    )
    if enable_gqa and k_mean.shape[-3] != q_mean.shape[-3]:
        repeat = q_mean.shape[-3] // k_mean.shape[-3]
        k = _repeat_heads(k, repeat)
        v = _repeat_heads(v, repeat)
    scale = 1.0 / math.sqrt(q_mean.shape[-1]) if scale is None else scale
    scores = _scores(ctx, q, k, scale)
    bias = _mask_bias(attn_mask, is_causal, mean_of(scores))
    if bias is not None:
        scores = scores + bias if not is_random(scores) else scores.with_mean(scores.mean + bias)
    weights = softmax(ctx, scores, -1) if is_random(scores) else torch.softmax(scores, -1)
    out = matmul(ctx, _no_nan(ctx, weights), v)
    return out.with_mean(mean) if is_random(out) else mean


def _scores(ctx: RuleContext, q, k, scale: float):
    """``q k^T * scale``: deterministic under the paper's rule, else the product rule."""
    if ctx.attention == "paper" or not (is_random(q) or is_random(k)):
        return (mean_of(q) @ mean_of(k).mT) * scale
    n = mean_of(k).dim()
    k_t = k.moved(k.mean.mT, permute_move([*range(n - 2), n - 1, n - 2])) if is_random(k) else k.mT
    product = matmul(ctx, q, k_t)
    return product.scaled(product.mean * scale, scale) if is_random(product) else product * scale


def _mask_bias(attn_mask, is_causal: bool, scores: Tensor) -> Tensor | None:
    bias = None
    if is_causal:
        t, s = scores.shape[-2], scores.shape[-1]
        causal = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(diagonal=s - t)
        bias = torch.zeros_like(causal, dtype=scores.dtype).masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        mask = attn_mask
        if attn_mask.dtype == torch.bool:
            mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill(~attn_mask, float("-inf"))
        bias = mask if bias is None else bias + mask
    return bias


def _no_nan(ctx: RuleContext, weights):
    """Rows with every key masked are NaN in the mean; they must carry zero variance, not NaN."""
    if not is_random(weights):
        return torch.nan_to_num(weights)
    mean = torch.nan_to_num(weights.mean)
    if ctx.keeps_maps:
        return Moment.with_covariance(mean, torch.nan_to_num(weights.covariance()))
    return Moment.diagonal(mean, torch.nan_to_num(weights.variance()))


def _repeat_heads(x, repeat: int):
    """``repeat_interleave(repeat, dim=-3)`` (grouped-query attention) as data movement."""
    if not is_random(x):
        return x.repeat_interleave(repeat, dim=-3)
    *lead, heads, t, d = x.mean.shape
    mean = x.mean.repeat_interleave(repeat, dim=-3)
    unsqueezed = (*lead, heads, 1, t, d)
    expanded = (*lead, heads, repeat, t, d)
    y = x.moved(x.mean.reshape(unsqueezed), reshape_move(x.mean.shape, unsqueezed))
    y = y.moved(y.mean.expand(expanded), expand_move(unsqueezed, expanded))
    return y.moved(mean, reshape_move(expanded, mean.shape))
