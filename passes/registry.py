"""The rule table: one small function per ATen op, looked up by the rewrite driver.

A rule has the signature ``rule(ctx, *args, **kwargs)`` mirroring the op's ATen schema, where every tensor
argument is either a plain tensor (deterministic) or a :class:`~momentprop.passes.moment.Moment`.  The driver only
calls a rule when at least one argument is random, and applies the covariance policy to what the rule returns, so
rules never test for ``diag`` or ``full``.  Rules come in families, each a constructor in its module:

* ``defzero`` (``elementwise.py``): the output carries no variance (comparisons, rounding, shapes);
* ``def_structural`` (``data_movement.py``): data movement, the maps move with the mean;
* ``def_deriv`` (``activations.py``): an elementwise function given by its derivative;
* ``defbilinear`` (``elementwise.py`` and ``linear.py``): a product, given by its two partial products; the family
  adds the second-order term under ``predictive="suq"``;
* composites (``normalisation.py``): written with the other rules.

Registering an op twice is an error.  ``whole=True`` marks a composite that capture must not decompose.
``reads`` tells the rewrite how a rule uses its random operands, so that under ``covariance="diag"`` a value whose
noises nothing downstream tells apart can be carried as one variance (``compiler/prepass.py``):

* ``"entrywise"``: each output entry depends only on the entry at the same position of each operand shaped like the
  output (elementwise ops, copies);
* ``"moves"``: data movement that puts each entry of its first operand in at most one place (padding);
* ``"variance"``: under the diag policy the rule reads its first operand only through its elementwise variance (a
  convolution's paper rule);
* ``None``: anything else (reductions, matrix products, ...): the operand's maps and noises may matter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

Covariance = Literal["diag", "full"]
Reads = Literal["entrywise", "moves", "variance", None]


@dataclass(frozen=True)
class RuleContext:
    """What a rule may need beyond its arguments.

    ``covariance``: ``"full"`` keeps every map (exact linearisation), ``"diag"`` collapses matrix maps into fresh
    diagonal noises where they are formed (the paper's diagonal variant).  Rules read it only through
    ``keeps_maps``, where a cheaper closed form of the collapsed variance exists.
    ``attention`` is ``"paper"`` (attention weights from the means) or ``"linearised"`` (see attention.py).
    ``predictive`` is ``"suq"`` (the paper's moment matching) or ``"glm"`` (first order in the weights).
    ``attention_weights``: the node is a softmax whose result weighs values in a matrix product (attention).
    ``activations``: ``"linearised"`` (the paper: ``f'(m)`` at the mean) or ``"moment_matched"`` (each activation's
    Gaussian moments, ``activations.py``).
    """

    covariance: Covariance = "diag"
    attention: str = "paper"
    predictive: str = "suq"
    attention_weights: bool = False
    activations: str = "linearised"

    @property
    def first_order(self) -> bool:
        """``predictive="glm"``: keep only terms first order in the weights (the linearised-Laplace predictive),
        dropping the second-order terms of the paper's moment matching."""
        return self.predictive == "glm"

    @property
    def keeps_maps(self) -> bool:
        return self.covariance == "full"


@dataclass(frozen=True)
class Rule:
    fn: Callable
    whole: bool
    reads: Reads = None


RULES: dict[object, Rule] = {}


class DuplicateRuleError(ValueError):
    """An op was registered twice."""


def register(*ops: object, whole: bool = False, reads: Reads = None) -> Callable[[Callable], Callable]:
    """Register ``fn`` as the moment rule of ``ops`` (OpOverloads, OpOverloadPackets or Python callables).
    ``whole``: capture keeps the op whole instead of decomposing it (its rule linearises it as one function);
    ``reads``: how the rule uses its random operands (see the module)."""

    def decorate(fn: Callable) -> Callable:
        for op in ops:
            if op in RULES:
                raise DuplicateRuleError(f"a moment rule for {op} is already registered ({RULES[op].fn.__qualname__})")
            RULES[op] = Rule(fn, whole, reads)
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
    return [op for op, rule in RULES.items() if rule.whole and isinstance(op, torch._ops.OpOverload)]
