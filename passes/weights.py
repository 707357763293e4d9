"""Weight posteriors with correlations: Kronecker-factored and dense blocks.

Each is a diagonal :class:`Moment` (its ``var`` holds the exact marginal variances, so any rule that does not
know the structure still gets the right diagonal) plus the structure the linear rule uses to propagate the
correlations.  For ``h = W a`` with ``a`` independent of ``W`` the weight noise adds, per sample,

    E_a[Cov(W a | a)]   (full over the outputs; its diagonal in diag mode),

and the input noise adds ``M Cov(a) M^T`` as for a deterministic weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .moment import MatrixTangent, Moment, broadcast_to, diagonal_matrix


def second_moment_input(a: object) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The mean of ``a`` and its (co)variance as (mean, elementwise var or None, covariance or None)."""
    if not isinstance(a, Moment):
        return a, None, None
    if not any(p.full for p in a.all_parts()):  # the diagonal alone, without forming a covariance
        return a.mean, a.variance(), None
    a = a.materialised()
    return (a.mean, None, a.var) if a.full else (a.mean, a.var, None)


@dataclass(frozen=True, eq=False)
class KronWeight(Moment):
    """``W`` (out, in) with ``Cov vec(W) = (Q_out ⊗ Q_in) diag(vec D) (Q_out ⊗ Q_in)^T`` (row-major vec).

    laplace-torch's Kronecker-factored posterior: ``D = 1 / (l_out l_in^T + delta)`` (undamped) or
    ``1 / ((l_out + sqrt(delta)) (l_in + sqrt(delta))^T)`` (damped).  For an input ``a``:
    ``E_a[Cov(W a | a)] = Q_out diag(D E[(Q_in^T a)^2]) Q_out^T`` with
    ``E[(Q_in^T a)^2] = (Q_in^T m)^2 + diag(Q_in^T Sigma_a Q_in)``: only matrix products.
    """

    q_out: Tensor = field(kw_only=True)
    q_in: Tensor = field(kw_only=True)
    d: Tensor = field(kw_only=True)

    @staticmethod
    def marginal_variance(q_out: Tensor, q_in: Tensor, d: Tensor) -> Tensor:
        return (q_out * q_out) @ d @ (q_in * q_in).T

    def noise(self, a: object, full_out: bool) -> Tensor:
        g = self.eigen_noise(a)
        if full_out:
            return (self.q_out * g.unsqueeze(-2)) @ self.q_out.T
        return g @ (self.q_out * self.q_out).T

    def eigen_noise(self, a: object) -> Tensor:
        """``D E[(Q_in^T a)^2]``: the variances of the weight noise in the output eigenbasis ``Q_out``."""
        mean, var, cov = second_moment_input(a)
        projected = mean @ self.q_in
        z2 = projected * projected
        if var is not None:
            z2 = z2 + var @ (self.q_in * self.q_in)
        if cov is not None:
            z2 = z2 + ((cov @ self.q_in) * self.q_in).sum(-2)
        return z2 @ self.d.T


@dataclass(frozen=True, eq=False)
class FullVector(Moment):
    """A 1-D parameter (a bias) with a dense covariance ``var = Q diag(values) Q^T``; ``Q`` and ``values`` are
    computed once at compile time."""

    q: Tensor = field(kw_only=True)
    values: Tensor = field(kw_only=True)

    @staticmethod
    def prepare(cov: Tensor) -> dict[str, Tensor]:
        values, q = torch.linalg.eigh(cov.double())
        return {"var": cov, "q": q.to(cov.dtype), "values": values.clamp_min(0.0).to(cov.dtype)}

    def noise_part(self, mean: Tensor) -> Moment:
        """Its noise added to ``mean`` (..., C), as a part: a diagonal root per row in the eigenbasis ``Q``, so no
        (C, C) covariance is formed per row."""
        return Moment(mean, broadcast_to(self.values, mean.shape), False, MatrixTangent.of(self.q))


@dataclass(frozen=True, eq=False)
class DenseWeight(Moment):
    """``W`` (out, in) with a dense covariance ``C`` of shape (out, n, out, n) over ``W~ = [W | b]``
    (``n = in + 1`` when the bias is part of the block, else ``n = in``), a block of a full posterior.
    ``E_a[Cov(W~ a~ | a)]_kl = sum_ij E[a~_i a~_j] C[k, i, l, j]`` with ``a~ = [a, 1]``."""

    full_block: Tensor = field(kw_only=True)  # C rearranged to (i, j) x (k, l): (n * n, out * out)
    diag_block: Tensor = field(kw_only=True)  # C[k, i, k, j] arranged (i, j) x k: (n * n, out)
    with_bias: bool = field(kw_only=True)

    @staticmethod
    def prepare(block: Tensor, n_in: int) -> dict[str, Tensor]:
        """What the rule needs from ``C`` (out, n, out, n), computed once at compile time: the two
        rearrangements and the marginal variances of ``W``."""
        out, n = block.shape[0], block.shape[1]
        diag = torch.diagonal(block, dim1=0, dim2=2)  # [i, j, k] = C[k, i, k, j]
        return {
            "full_block": block.permute(1, 3, 0, 2).reshape(n * n, out * out).contiguous(),
            "diag_block": diag.reshape(n * n, out).contiguous(),
            "var": torch.diagonal(diag, dim1=0, dim2=1)[:, :n_in].contiguous(),  # C[k, i, k, i]
        }

    def noise(self, a: object, full_out: bool) -> Tensor:
        mean, var, cov = second_moment_input(a)
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
        flat = second.flatten(-2)
        if full_out:
            out = self.diag_block.shape[1]
            return (flat @ self.full_block).reshape(*second.shape[:-2], out, out)
        return flat @ self.diag_block
