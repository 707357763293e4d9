"""The rule table: one small function per ATen op, looked up by the rewrite driver.

A rule has the signature ``rule(ctx, *args, **kwargs)`` mirroring the op's ATen schema, where every tensor
argument is either a plain tensor (deterministic) or a :class:`Moment`.  The driver only calls a rule when at
least one argument is a moment; ops on deterministic values run unchanged.  Rules registered with
``raw=True`` receive moments as they are (possibly with a pending tangent) and fold or extend the tangent
themselves; all others receive materialised moments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

Covariance = Literal["diag", "full"]


@dataclass(frozen=True)
class RuleContext:
    """What a rule may need beyond its arguments.

    ``covariance`` is the kind of the node's random outputs where a rule creates one from parameters (a
    Bayesian linear layer on a deterministic input); rules that transform a moment keep its kind.
    ``attention`` is ``"paper"`` (attention weights from the means) or ``"linearised"`` (see attention.py).
    ``predictive`` is ``"suq"`` (the paper's moment matching) or ``"glm"`` (first order in the weights).
    ``attention_weights``: the node is a softmax whose result weighs values in a matrix product (attention).
    """

    covariance: Covariance = "diag"
    attention: str = "paper"
    predictive: str = "suq"
    attention_weights: bool = False

    @property
    def first_order(self) -> bool:
        """``predictive="glm"``: keep only terms first order in the weights (the linearised-Laplace predictive),
        dropping the input-variance x weight-variance terms of the paper's moment matching."""
        return self.predictive == "glm"


@dataclass(frozen=True)
class Rule:
    fn: Callable
    raw: bool


RULES: dict[object, Rule] = {}


def register(*ops: object, raw: bool = False) -> Callable[[Callable], Callable]:
    """Register ``fn`` as the moment rule of ``ops`` (OpOverloads, OpOverloadPackets or Python callables)."""

    def decorate(fn: Callable) -> Callable:
        for op in ops:
            RULES[op] = Rule(fn, raw)
        return fn

    return decorate


def lookup(op: object) -> Rule | None:
    """The rule for ``op``: an exact overload first, then its overload packet."""
    rule = RULES.get(op)
    if rule is None and isinstance(op, torch._ops.OpOverload):
        rule = RULES.get(op.overloadpacket)
    return rule


def kept_whole() -> list[torch._ops.OpOverload]:
    """Ops with a rule that must survive decomposition (composites we linearise as one function)."""
    return [op for op in RULES if isinstance(op, torch._ops.OpOverload)]
