"""Independent oracles for the exactness claims (issue 12). Nothing here imports momentprop or its test helpers.

- :func:`jacobian_covariance`: the exact first-order (linearised, GLM) predictive covariance over the last dim of a
  model's first output, ``J diag(S) Jᵀ`` with ``J = d out / d params`` from ``torch.func.jacrev`` in float64.
- :func:`monte_carlo_moments`: mean, variance and covariance (over the last dim) of the first output with the
  weights sampled from ``N(params, diag(posterior))``, float64, ``vmap`` over chunks of samples.
- assertion helpers with the tolerances the exactness tests use.

Both oracles run the model itself (a float64 deep copy in eval mode), so ``x.detach()`` inside a model would be a
gradient stop for :func:`jacobian_covariance` but not for moments: models given to it must not use ``detach``.
"""

from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap


def _inputs64(x) -> tuple:
    xs = x if isinstance(x, (tuple, list)) else (x,)
    return tuple(t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in xs)


def _first(out):
    """The model's first output tensor (a tuple, a list, a dict or an object with fields: its first tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        return _first(next(iter(out.values())))
    if isinstance(out, (tuple, list)):
        return _first(out[0])
    if hasattr(out, "to_tuple"):
        return _first(out.to_tuple()[0])
    raise TypeError(f"cannot find the first output tensor of a {type(out).__name__}")


def _float64_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double().eval()


def _check_posterior(model: nn.Module, posterior: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    out = {}
    for name, var in posterior.items():
        assert name in params, f"posterior names {name!r}, which is not a parameter of the model"
        if hasattr(var, "q_out"):  # Kronecker factors (mp.Kron): the dense covariance over the flattened entries
            factor = torch.kron(var.q_out.double(), var.q_in.double())
            out[name] = factor @ torch.diag(var.d.double().reshape(-1)) @ factor.T
            assert out[name].shape[0] == params[name].numel(), f"{name}: Kronecker factors of the wrong size"
            continue
        var = torch.as_tensor(var, dtype=torch.float64)
        shape = tuple(params[name].shape)
        assert var.shape == shape, f"{name}: variance shape {tuple(var.shape)} != {shape}"
        assert (var >= 0).all(), f"{name}: negative variance"
        out[name] = var
    return out


def jacobian_covariance(
    model: nn.Module, posterior: Mapping[str, torch.Tensor], x
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact linearised predictive of the model's first output ``out`` (shape ``(..., C)``), in float64.

    For every parameter ``p`` named in ``posterior`` (elementwise variances ``S_p``, or ``mp.Kron`` factors: the
    dense Kronecker covariance over its flattened entries; the others are fixed),
    ``J_p = d out / d p`` by reverse-mode autodiff, and

        cov[..., i, j] = sum_p sum_k J_p[..., i, k] S_p[k] J_p[..., j, k].

    Returns ``(out, cov)`` with ``cov.shape == out.shape + (C,)``. ``x`` is a tensor or a tuple of inputs (any rank,
    features last). The model runs as a float64 deep copy in eval mode; the original is not touched.
    """
    m64 = _float64_copy(model)
    inputs = _inputs64(x)
    variances = _check_posterior(m64, posterior)
    fixed = {n: p.detach() for n, p in m64.named_parameters()}
    fixed.update({n: b for n, b in m64.named_buffers()})
    random = {n: fixed[n] for n in variances}

    def forward(rand):
        return _first(functional_call(m64, {**fixed, **rand}, inputs, strict=False))

    with torch.no_grad():
        out = forward(random)
    C = out.shape[-1]
    cov = torch.zeros(*out.shape, C, dtype=torch.float64)
    if not random:
        return out, cov
    jac = jacrev(forward)(random)
    for name, j in jac.items():
        j = j.reshape(*out.shape, -1)  # (..., C, P)
        s = variances[name]
        if s.dim() == 2 and s.shape[0] == s.shape[1] == j.shape[-1] and s.numel() != j.shape[-1]:  # dense
            cov = cov + torch.einsum("...ik,kl,...jl->...ij", j, s, j)
        else:
            cov = cov + torch.einsum("...ik,k,...jk->...ij", j, s.reshape(-1), j)
    return out, cov


@torch.no_grad()
def monte_carlo_moments(
    model: nn.Module,
    posterior: Mapping[str, torch.Tensor],
    x,
    n_samples: int = 4000,
    seed: int = 0,
    chunk: int = 500,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and covariance (over the last dim) of the model's first output under weights drawn from
    ``N(params, diag(posterior))`` (the parameters not in ``posterior`` fixed), float64, unbiased, seeded.

    Samples are drawn in chunks of ``chunk`` and the model runs on each chunk through ``vmap`` of
    ``functional_call``; the sums are accumulated around the unperturbed output (a shift that keeps the
    covariance free of cancellation)."""
    m64 = _float64_copy(model)
    inputs = _inputs64(x)
    variances = _check_posterior(m64, posterior)
    fixed = {n: p.detach() for n, p in m64.named_parameters()}
    fixed.update({n: b for n, b in m64.named_buffers()})
    stds = {n: v.sqrt() for n, v in variances.items()}
    gen = torch.Generator().manual_seed(seed)

    def forward(rand):
        return _first(functional_call(m64, {**fixed, **rand}, inputs, strict=False))

    shift = forward({})
    s1 = torch.zeros_like(shift)
    s2 = torch.zeros(*shift.shape, shift.shape[-1], dtype=torch.float64)
    done = 0
    while done < n_samples:
        k = min(chunk, n_samples - done)
        draws = {
            n: fixed[n] + stds[n] * torch.randn((k, *fixed[n].shape), generator=gen, dtype=torch.float64)
            for n in stds
        }
        out = _batched(forward, draws) - shift  # (k, ..., C)
        s1 += out.sum(0)
        s2 += torch.einsum("s...i,s...j->...ij", out, out)
        done += k
    mean = s1 / n_samples
    cov = (s2 - n_samples * mean.unsqueeze(-1) * mean.unsqueeze(-2)) / (n_samples - 1)
    return mean + shift, torch.diagonal(cov, dim1=-2, dim2=-1).clone(), cov


def _batched(forward, draws: dict[str, torch.Tensor]) -> torch.Tensor:
    """``forward`` over the leading dim of ``draws``: vmap, or a loop for ops without a batching rule (aten.lstm)."""
    try:
        return vmap(forward)(draws)
    except RuntimeError as exc:
        if "Batching rule not implemented" not in str(exc):
            raise
    k = next(iter(draws.values())).shape[0]
    return torch.stack([forward({n: d[i] for n, d in draws.items()}) for i in range(k)])


# ---------------------------------------------------------------------------------------------------------------
# assertions (float64 comparisons)
# ---------------------------------------------------------------------------------------------------------------


def compare_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4, atol_scale: float = 1e-5
) -> str | None:
    """None where ``|a - e| <= atol_scale * max|e| + rtol * |e|`` everywhere, else a one-line summary: the worst
    entry and the ratio ``|a - e| / (atol + rtol |e|)`` (> 1 fails)."""
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape:
        return f"shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    if not torch.isfinite(a).all():
        return f"non-finite entries: {int((~torch.isfinite(a)).sum())}"
    scale = e.abs().max().item() if e.numel() else 0.0
    atol = atol_scale * max(scale, 1e-30)
    err = (a - e).abs()
    ratio = err / (atol + rtol * e.abs())
    if (ratio <= 1).all():
        return None
    i = int(ratio.argmax())
    idx = tuple(int(t) for t in torch.unravel_index(torch.tensor(i), a.shape))
    rel = (err.max() / max(scale, 1e-30)).item()
    return (
        f"worst entry {idx}: got {a.flatten()[i].item():.6g}, expected {e.flatten()[i].item():.6g} "
        f"(tolerance ratio {ratio.max().item():.3g}; max abs error / max|expected| = {rel:.3g}; "
        f"{int((ratio > 1).sum())}/{ratio.numel()} entries off)"
    )


def assert_close64(actual, expected, rtol: float = 1e-4, atol_scale: float = 1e-5, what: str = "") -> None:
    problem = compare_close(actual, expected, rtol, atol_scale)
    assert problem is None, f"{what}: {problem}"


def psd_problem(cov: torch.Tensor, rel_tol: float = 1e-5) -> str | None:
    """None where ``cov`` (covariances over the last two dims) is symmetric, PSD to ``rel_tol`` times the
    largest entry, with nonnegative variances; else what is wrong."""
    cov = cov.detach().double()
    if not torch.isfinite(cov).all():
        return "non-finite entries"
    scale = max(cov.abs().max().item(), 1e-30)
    asym = (cov - cov.mT).abs().max().item()
    if asym > 1e-6 * scale:
        return f"not symmetric: max |C - Cᵀ| = {asym:.3g} ({asym / scale:.3g} x max|C|)"
    variances = torch.diagonal(cov, dim1=-2, dim2=-1)
    if (variances < -rel_tol * scale).any():
        return f"negative variance {variances.min().item():.3g}"
    eig = torch.linalg.eigvalsh(0.5 * (cov + cov.mT))
    if (eig < -rel_tol * scale).any():
        return f"not PSD: min eigenvalue {eig.min().item():.3g} ({eig.min().item() / scale:.3g} x max|C|)"
    return None


def median_relative_error(actual: torch.Tensor, expected: torch.Tensor, floor_scale: float = 1e-3) -> float:
    """Median over entries of ``|a - e| / max(|e|, floor_scale * max|e|)``."""
    a, e = actual.detach().double().flatten(), expected.detach().double().flatten()
    floor = floor_scale * max(e.abs().max().item(), 1e-30)
    return ((a - e).abs() / e.abs().clamp_min(floor)).median().item()


def relative_posterior(
    model: nn.Module,
    scale: float | tuple[float, float],
    generator: torch.Generator,
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal variances ``rel * U(0.5, 1.5) * mean(p²)`` (``rel`` log-uniform in ``scale`` when a range) for
    ``names`` (default: every parameter), all draws from ``generator``."""
    post = {}
    for name, p in model.named_parameters():
        if names is not None and name not in names:
            continue
        if isinstance(scale, tuple):
            lo, hi = torch.log(torch.tensor(scale, dtype=torch.float64))
            rel = torch.exp(lo + (hi - lo) * torch.rand((), generator=generator, dtype=torch.float64)).item()
        else:
            rel = scale
        ms = p.detach().double().square().mean().item() + 1e-4
        post[name] = (rel * ms * (0.5 + torch.rand(p.shape, generator=generator, dtype=torch.float64))).float()
    return post
