"""Moment rules, one module per op family; importing this package fills the rule table."""

from . import (  # noqa: F401  (registration)
    activations, attention, data_movement, elementwise, linear, normalisation, spatial,
)
from . import heads
from .moment import Moment
from .registry import RULES, Rule, RuleContext, kept_whole, lookup, register

__all__ = ["Moment", "RULES", "Rule", "RuleContext", "heads", "kept_whole", "lookup", "register"]
