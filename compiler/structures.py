"""The posterior structures every adapter returns and the rules consume: per parameter a variance tensor of the
parameter's shape, or a structured block (Kronecker factors, a dense block, a full covariance)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch


@dataclass(frozen=True)
class Kron:
    """A weight (out, in) with ``Cov vec(W) = (Q_out ⊗ Q_in) diag(vec d) (Q_out ⊗ Q_in)^T``."""

    q_out: torch.Tensor
    q_in: torch.Tensor
    d: torch.Tensor


@dataclass(frozen=True)
class Dense:
    """A weight (out, in) with a dense covariance ``block`` (out, n, out, n) over ``[W | b]`` (n = in + 1,
    ``with_bias``) or over ``W`` (n = in)."""

    block: torch.Tensor
    with_bias: bool


@dataclass(frozen=True)
class FullCovariance:
    """A 1-D parameter (a bias) with a dense covariance ``cov`` (numel, numel)."""

    cov: torch.Tensor


ParameterPosterior = Union[torch.Tensor, Kron, Dense, FullCovariance]
# {canonical parameter name: a variance tensor of the parameter's shape, or a structured block}
Posterior = dict[str, ParameterPosterior]


def split_flat(flat: torch.Tensor, params: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A flat vector over ``params`` (each tensor row-major, in order) as ``{name: tensor of its shape}``."""
    result, offset = {}, 0
    for name, p in params:
        result[name] = flat[offset: offset + p.numel()].reshape(p.shape)
        offset += p.numel()
    return result
