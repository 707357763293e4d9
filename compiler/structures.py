"""The posterior structures every adapter returns and the rules consume: per parameter a variance tensor of the
parameter's shape, or a structured block (Kronecker factors, a dense block, a full covariance)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch

from momentprop.passes.moment import MatrixTangent, Noise
from momentprop.passes.weights import DenseBlockNoise, KronNoise

# what a structure's moment needs: its noise and, where the noise is not in the parameter's own basis, its map
Buffer = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class Kron:
    """A weight (out, in) with ``Cov vec(W) = (Q_out ⊗ Q_in) diag(vec d) (Q_out ⊗ Q_in)^T``; a convolution kernel
    (out, in / groups, *kernel) as its matrix (out, in / groups · prod(kernel)), as laplace-torch factors it."""

    q_out: torch.Tensor
    q_in: torch.Tensor
    d: torch.Tensor

    def expected_shapes(self, param: torch.Tensor) -> dict[str, tuple | None]:
        out, n_in = (param.shape[0], param[0].numel()) if param.dim() >= 2 else (None, None)
        return {"q_out": (out, out), "q_in": (n_in, n_in), "d": (out, n_in)}

    def buffers(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the rules need, computed once at compile time (stored as buffers of the moment graph)."""
        marginal = KronNoise.marginal_variance(self.q_out, self.q_in, self.d).reshape(param.shape)
        return {"var": marginal, "q_out": self.q_out, "q_in": self.q_in, "d": self.d}

    def noise(self, buffer: Buffer) -> tuple[Noise, MatrixTangent | None]:
        return KronNoise(buffer("q_out"), buffer("q_in"), buffer("d"), buffer("var")), None


@dataclass(frozen=True)
class Dense:
    """A weight (out, in) with a dense covariance ``block`` (out, n, out, n) over ``[W | b]`` (n = in + 1,
    ``with_bias``) or over ``W`` (n = in)."""

    block: torch.Tensor
    with_bias: bool

    def expected_shapes(self, param: torch.Tensor) -> dict[str, tuple | None]:
        out, n_in = param.shape if param.dim() == 2 else (None, None)
        n = n_in + 1 if self.with_bias and n_in is not None else n_in
        return {"block": (out, n, out, n)}

    def buffers(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return DenseBlockNoise.prepare(self.block, param.shape[1])

    def noise(self, buffer: Buffer) -> tuple[Noise, MatrixTangent | None]:
        return DenseBlockNoise(buffer("full_block"), self.with_bias, buffer("var")), None


@dataclass(frozen=True)
class FullCovariance:
    """A 1-D parameter (a bias) with a dense covariance ``cov`` (numel, numel)."""

    cov: torch.Tensor

    def expected_shapes(self, param: torch.Tensor) -> dict[str, tuple | None]:
        return {"cov": (param.numel(), param.numel()) if param.dim() == 1 else None}

    def buffers(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """A diagonal noise in the covariance's eigenbasis."""
        values, q = torch.linalg.eigh(self.cov.double())
        return {"var": values.clamp_min(0.0), "q": q}

    def noise(self, buffer: Buffer) -> tuple[Noise, MatrixTangent | None]:
        return Noise(buffer("var")), MatrixTangent.of(buffer("q"))


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
