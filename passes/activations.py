"""Elementwise nonlinearities by local linearisation at the mean (the paper's rule).

For ``y = f(x)`` with ``x ~ N(m, v)``: mean ``f(m)`` (not corrected, so the compiled mean is the plain forward
pass at the posterior mean) and variance ``f'(m)^2 v`` (full: ``J Sigma J`` with ``J = diag f'(m)``).
Every rule here is ``def_deriv(op, f')``: the derivative in closed form, because autograd inside the graph
cannot be exported.  Derivatives receive the input mean ``x``, the output mean ``y`` and the op's extra
arguments, and scale the value's maps (``Moment.scaled``), so chains of these ops are linearised as one function
and values that share noise stay correlated.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .moment import Moment
from .registry import RuleContext, register

aten = torch.ops.aten


def def_deriv(op, derivative: Callable[..., Tensor | float]) -> Callable:
    """Register the linearisation rule of the elementwise ``op`` from its derivative ``f'(x, y, *args)``."""

    def rule(ctx: RuleContext, x: Moment, *args, **kwargs) -> Moment:
        y = op(x.mean, *args, **kwargs)
        return x.scaled(y, derivative(x.mean, y, *args, **kwargs))

    rule.__name__ = f"linearise_{op.__name__.replace('.', '_')}"
    rule.__doc__ = f"{op}: mean f(m); every map scaled by f'(m)."
    register(op, whole=True)(rule)
    return rule


def _step(condition: Tensor, x: Tensor) -> Tensor:
    """A 0/1 derivative, kept boolean: the variance is then masked, not multiplied by the mask squared."""
    return condition


def _gelu_derivative(x: Tensor, y: Tensor, approximate: str = "none") -> Tensor:
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        inner = c * (x + 0.044715 * x**3)
        t = torch.tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)
    cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + x * pdf


def _elu_derivative(x, y, alpha=1.0, scale=1.0, input_scale=1.0):
    # y = scale * (alpha * (exp(input_scale x) - 1)) for x <= 0, scale * x otherwise
    negative = scale * alpha * input_scale * torch.exp(x * input_scale)
    return torch.where(x > 0, torch.full_like(x, scale), negative)


def _softplus_derivative(x, y, beta=1.0, threshold=20.0):
    return torch.where(x * beta > threshold, torch.ones_like(x), torch.sigmoid(x * beta))


def _mish_derivative(x, y):
    sp = torch.nn.functional.softplus(x)
    t = torch.tanh(sp)
    return t + x * (1.0 - t * t) * torch.sigmoid(x)


def _hardtanh_derivative(x, y, min_val=-1.0, max_val=1.0):
    return _step((x > min_val) & (x < max_val), x)


def _clamp_derivative(x, y, min=None, max=None):
    inside = torch.ones_like(x, dtype=torch.bool)
    if min is not None:
        inside = inside & (x > min)
    if max is not None:
        inside = inside & (x < max)
    return _step(inside, x)


def _sigmoid_derivative(x, y):
    return y * (1.0 - y)


def _silu_derivative(x, y):
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _hardswish_derivative(x, y):
    return torch.where(x < -3.0, torch.zeros_like(x), torch.where(x > 3.0, torch.ones_like(x), (2.0 * x + 3.0) / 6.0))


def _hardsigmoid_derivative(x, y):
    return ((x > -3.0) & (x < 3.0)).to(x.dtype) / 6.0


relu = def_deriv(aten.relu.default, lambda x, y: y > 0)  # from y: the plain Gemm+Relu fusion survives
leaky_relu = def_deriv(
    aten.leaky_relu.default, lambda x, y, negative_slope=0.01: torch.where(x > 0, 1.0, negative_slope).to(x.dtype)
)
elu = def_deriv(aten.elu.default, _elu_derivative)
gelu = def_deriv(aten.gelu.default, _gelu_derivative)
tanh = def_deriv(aten.tanh.default, lambda x, y: 1.0 - y * y)
sigmoid = def_deriv(aten.sigmoid.default, _sigmoid_derivative)
silu = def_deriv(aten.silu.default, _silu_derivative)
mish = def_deriv(aten.mish.default, _mish_derivative)
softplus = def_deriv(aten.softplus.default, _softplus_derivative)
hardtanh = def_deriv(aten.hardtanh.default, _hardtanh_derivative)
hardswish = def_deriv(aten.hardswish.default, _hardswish_derivative)
hardsigmoid = def_deriv(aten.hardsigmoid.default, _hardsigmoid_derivative)
clamp = def_deriv(aten.clamp.default, _clamp_derivative)
clamp_min = def_deriv(aten.clamp_min.default, lambda x, y, min: _step(x > min, x))
clamp_max = def_deriv(aten.clamp_max.default, lambda x, y, max: _step(x < max, x))
exp = def_deriv(aten.exp.default, lambda x, y: y)
expm1 = def_deriv(aten.expm1.default, lambda x, y: y + 1.0)
log = def_deriv(aten.log.default, lambda x, y: 1.0 / x)
log1p = def_deriv(aten.log1p.default, lambda x, y: 1.0 / (1.0 + x))
sqrt = def_deriv(aten.sqrt.default, lambda x, y: 0.5 / y)
rsqrt = def_deriv(aten.rsqrt.default, lambda x, y: -0.5 * y * y * y)
reciprocal = def_deriv(aten.reciprocal.default, lambda x, y: -y * y)
sin = def_deriv(aten.sin.default, lambda x, y: torch.cos(x))
cos = def_deriv(aten.cos.default, lambda x, y: -torch.sin(x))
erf = def_deriv(aten.erf.default, lambda x, y: (2.0 / math.sqrt(math.pi)) * torch.exp(-x * x))
abs_ = def_deriv(aten.abs.default, lambda x, y: torch.sign(x))
square = def_deriv(aten.square.default, lambda x, y: 2.0 * x)
