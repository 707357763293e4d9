"""Shared fixtures. The oracles and model builders live in ``tests/oracles.py`` (``from oracles import ...``)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from oracles import make_mlp


def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _seed_every_module():
    """Module-scoped fixtures (built before the first test of a module) see the same global random state too."""
    _seed()


@pytest.fixture(autouse=True)
def _seed_every_test():
    """Every test starts from the same global random state, whatever ran before it (torch, numpy, random)."""
    _seed()


@pytest.fixture
def mlp() -> nn.Sequential:
    return make_mlp([6, 16, 16, 4], nn.Tanh)


@pytest.fixture
def inputs() -> torch.Tensor:
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
