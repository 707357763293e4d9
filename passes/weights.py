"""Weight noises with correlations: Kronecker factors and dense blocks (laplace-torch's kron and full).

Each is a :class:`~momentprop.passes.moment.Noise` whose ``variance`` holds the exact marginal variances of the
weight (what any rule that does not know the structure sees), plus what the linear rule needs to propagate the
correlations.  For ``h = W a`` the weight noise adds, per row, ``E_a[Cov(W a | a)]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .moment import Noise, diagonal_matrix


class KronNoise(Noise):
    """``W`` (out, in) with ``Cov vec(W) = (Q_out ⊗ Q_in) diag(vec D) (Q_out ⊗ Q_in)^T`` (row-major vec), i.e.
    ``dW = Q_out Z Q_in^T`` with ``Z`` independent entries of variance ``D``.

    laplace-torch's Kronecker-factored posterior: ``D = 1 / (l_out l_in^T + delta)`` (undamped) or
    ``1 / ((l_out + sqrt(delta)) (l_in + sqrt(delta))^T)`` (damped).  So ``dW a = Q_out (Z (Q_in^T a))``: the noise
    ``Z`` applied to the rotated input, then ``Q_out``: only matrix products."""

    def __init__(self, q_out: Tensor, q_in: Tensor, d: Tensor, variance: Tensor):
        super().__init__(variance)
        self.q_out, self.q_in, self.d = q_out, q_in, d

    @staticmethod
    def marginal_variance(q_out: Tensor, q_in: Tensor, d: Tensor) -> Tensor:
        return (q_out * q_out) @ d @ (q_in * q_in).T

    def eigen_variance(self, second_moment_rotated: Tensor) -> Tensor:
        """``D E[(Q_in^T a)^2]``: the variances of the weight noise in the output eigenbasis ``Q_out``."""
        return second_moment_rotated @ self.d.T


class DenseBlockNoise(Noise):
    """``W`` (out, in) with a dense covariance ``C`` of shape (out, n, out, n) over ``W~ = [W | b]``
    (``n = in + 1`` when the bias is part of the block, else ``n = in``), a block of a full posterior.
    ``E_a[Cov(W~ a~ | a)]_kl = sum_ij E[a~_i a~_j] C[k, i, l, j]`` with ``a~ = [a, 1]``."""

    def __init__(self, full_block: Tensor, with_bias: bool, variance: Tensor):
        super().__init__(variance)
        self.full_block, self.with_bias = full_block, with_bias

    @staticmethod
    def prepare(block: Tensor, n_in: int) -> dict[str, Tensor]:
        """What the rule needs from ``C`` (out, n, out, n), computed once at compile time: ``C`` rearranged to
        (i, j) x (k, l) and the marginal variances of ``W``."""
        out, n = block.shape[0], block.shape[1]
        diag = torch.diagonal(block, dim1=0, dim2=2)  # [i, j, k] = C[k, i, k, j]
        return {
            "full_block": block.permute(1, 3, 0, 2).reshape(n * n, out * out).contiguous(),
            "var": torch.diagonal(diag, dim1=0, dim2=1)[:, :n_in].contiguous(),  # C[k, i, k, i]
        }

    def covariance(self, mean: Tensor, var: Tensor | None, cov: Tensor | None) -> Tensor:
        """``E_a[Cov(W~ a~ | a)]`` (..., out, out) for an input with mean ``mean`` and (co)variance."""
        if self.with_bias:
            ones = torch.ones_like(mean[..., :1])
            mean = torch.cat([mean, ones], dim=-1)
            var = None if var is None else torch.cat([var, torch.zeros_like(ones)], dim=-1)
            cov = None if cov is None else torch.nn.functional.pad(cov, (0, 1, 0, 1))
        second = mean.unsqueeze(-1) * mean.unsqueeze(-2)
        if var is not None:
            second = second + diagonal_matrix(var)
        if cov is not None:
            second = second + cov
        out = self.variance.shape[0]
        return (second.flatten(-2) @ self.full_block).reshape(*second.shape[:-2], out, out)
