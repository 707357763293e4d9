"""Training and the Gaussian weight posteriors every method is evaluated on.

A :class:`Posterior` is one fitted posterior over the trainable parameters of one model (its mean is the model's
parameters).  It exposes, all from the posterior library's own code or from its raw state, never from momentprop:

* ``sample(n, generator)``: weight samples, ``(n, P)`` flat in ``model.parameters()`` order (laplace-torch's own
  ``la.sample``; for IVON, mean + std * noise with the variance read from the optimizer's state as IVON's own
  ``_sample_params`` does);
* ``laplace``: a laplace-torch object whose GLM predictive (``la(x, pred_type="glm")``) is the GLM baseline (for IVON,
  a laplace-torch ``DiagLaplace`` whose posterior precision is set to IVON's: zero Hessian, prior precision the
  per-parameter IVON precision);
* ``compile_source``: what is handed to ``momentprop.compile`` (the laplace-torch object, or the IVON optimizer).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector

from .data import Split

# IVON settings that trained well on digits (project notes §4); used for every task unless a task overrides them.
IVON_DEFAULTS = dict(lr=0.2, beta2=0.9995, hess_init=0.5, weight_decay=1e-4)
PRIOR_GRID = tuple(float(v) for v in np.logspace(-2, 6, 25))  # laplace-torch prior precisions tried on validation


def build_mlp(n_in: int, hidden: tuple[int, ...], n_out: int, seed: int) -> nn.Sequential:
    """ReLU MLP ``n_in -> hidden... -> n_out`` with seeded initialisation."""
    torch.manual_seed(seed)
    sizes = (n_in, *hidden, n_out)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


@dataclass
class TrainConfig:
    """Optimisation settings of one problem (MAP with Adam; IVON with its own settings)."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    min_steps: int = 0  # small data sets: at least this many steps (epochs are raised to reach it)
    ivon: dict[str, Any] = field(default_factory=lambda: dict(IVON_DEFAULTS))
    ivon_epochs: int | None = None  # default: epochs
    ivon_mc: int = 1  # IVON training samples per step
    ivon_noise_floor: float = 0.0  # regression: IVON trains with noise max(MAP noise, this) (standardised units)

    def epochs_for(self, n: int, ivon: bool = False) -> int:
        epochs = (self.ivon_epochs or self.epochs) if ivon else self.epochs
        steps_per_epoch = -(-n // self.batch_size)
        return max(epochs, -(-self.min_steps // steps_per_epoch))


def _loss(likelihood: str, out: torch.Tensor, y: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    if likelihood == "classification":
        return F.cross_entropy(out, y)
    return 0.5 * F.mse_loss(out, y) / sigma**2


def train_map(model: nn.Module, split: Split, likelihood: str, cfg: TrainConfig, seed: int,
              progress: Callable | None = None) -> nn.Module:
    """Adam with L2 weight decay and a cosine schedule; returns the model in eval mode."""
    epochs = cfg.epochs_for(len(split.x_train))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = epochs * -(-len(split.x_train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(split.x_train), generator=g).split(cfg.batch_size):
            opt.zero_grad()
            _loss(likelihood, model(split.x_train[batch]), split.y_train[batch]).backward()
            opt.step()
            sched.step()
        if progress:
            progress()
    return model.eval()


def train_ivon(model: nn.Module, split: Split, likelihood: str, cfg: TrainConfig, seed: int, sigma: float = 1.0,
               progress: Callable | None = None):
    """IVON (ess = number of training points, cosine schedule); returns the optimizer (the posterior).  Regression
    uses the Gaussian likelihood with noise ``sigma`` (in standardised units)."""
    import ivon

    epochs = cfg.epochs_for(len(split.x_train), ivon=True)
    # only the trainable parameters: a task that keeps some deterministic sets requires_grad=False on them
    opt = ivon.IVON([p for p in model.parameters() if p.requires_grad], ess=len(split.x_train), **cfg.ivon)
    steps = epochs * -(-len(split.x_train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(split.x_train), generator=g).split(cfg.batch_size):
            for _ in range(cfg.ivon_mc):
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    _loss(likelihood, model(split.x_train[batch]), split.y_train[batch], sigma).backward()
            opt.step()
            sched.step()
        if not all(torch.isfinite(q).all() for q in model.parameters()):
            raise FloatingPointError(f"IVON diverged (non-finite weights) with settings {cfg.ivon}")
        if progress:
            progress()
    model.eval()
    return opt


def residual_sigma(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Observation noise (standardised units): the root mean squared residual of the mean network on ``x``."""
    with torch.no_grad():
        return float(torch.sqrt(((model(x) - y) ** 2).mean()))


# ------------------------------------------------------------------------------------------------------ posteriors

@dataclass
class Posterior:
    name: str  # "laplace-diag", "laplace-kron", "ivon"
    model: nn.Module
    likelihood: str
    laplace: Any  # laplace-torch object (the GLM baseline; for IVON a DiagLaplace carrying IVON's precision)
    compile_source: Any  # what momentprop.compile receives
    sigma_noise: float | None = None  # regression observation noise (standardised units)
    prior_precision: float | None = None  # laplace: the value tuned on validation data
    sampler: Callable[[int, torch.Generator], torch.Tensor] | None = None
    # a copy of the network for the sampled forward passes (None: ``model`` itself)
    plain_model: nn.Module | None = None

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.sampler is not None:
            return self.sampler(n, generator)
        return self.laplace.sample(n, generator=generator)

    @property
    def names(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if p.requires_grad]


def _sampled_nlpd(post: "Posterior", x: torch.Tensor, y: torch.Tensor, samples: int, seed: int) -> float:
    """Validation NLPD of the Monte Carlo predictive with laplace-torch's own sampler (``la.sample``) at the current
    prior precision; the same seed for every grid value (common random numbers)."""
    from torch.nn.utils import vector_to_parameters

    from .metrics import class_nlpd, mixture_metrics

    # as laplace-torch's own sampling predictive does: write each sample into the network, restore the mean after
    params = [p for p in post.model.parameters() if p.requires_grad]
    mean = parameters_to_vector(params).detach().clone()
    outs = []
    with torch.no_grad():
        for theta in post.sample(samples, torch.Generator().manual_seed(seed)):
            vector_to_parameters(theta, params)
            outs.append(post.model(x))
        vector_to_parameters(mean, params)
    f = torch.stack(outs)
    if post.likelihood == "classification":
        return class_nlpd(torch.softmax(f, -1).mean(0).numpy(), y.numpy())
    return mixture_metrics(f.numpy(), post.sigma_noise, y.numpy(), 1.0)["nlpd"]


def fit_laplace(model: nn.Module, split: Split, likelihood: str, structure: str, sigma: float | None = None,
                tune_points: int = 1000, tune_samples: int = 100, grid: tuple[float, ...] = PRIOR_GRID,
                seed: int = 0) -> Posterior:
    """laplace-torch, all weights, GGN (BackPack), ``hessian_structure`` diag or kron, fitted on the training set;
    the scalar prior precision is the grid value with the lowest validation NLPD (up to ``tune_points`` validation
    points) of the sampling predictive with ``tune_samples`` draws from laplace-torch's ``la.sample``.  (Tuning with
    laplace-torch's GLM predictive instead was too slow for kron on Fashion-MNIST: minutes per grid value.)"""
    import laplace
    from laplace.curvature import BackPackGGN
    from torch.utils.data import DataLoader, TensorDataset

    kwargs = {"sigma_noise": sigma} if likelihood == "regression" else {}
    plain = copy.deepcopy(model)
    la = laplace.Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure,
                         backend=BackPackGGN, **kwargs)
    la.fit(DataLoader(TensorDataset(split.x_train, split.y_train), batch_size=256))
    use_plain_jacobians(la, plain)
    post = Posterior(f"laplace-{structure}", model, likelihood, la, la, sigma_noise=sigma, plain_model=plain)
    xv, yv = split.x_val[:tune_points], split.y_val[:tune_points]
    scores = []
    for prec in grid:
        la.prior_precision = prec
        scores.append(_sampled_nlpd(post, xv, yv, tune_samples, seed))
    if not grid: return post
    best = grid[int(np.nanargmin(scores))]
    la.prior_precision = best
    post.prior_precision = best
    return post


def use_plain_jacobians(la, plain: nn.Module) -> None:
    """Make laplace-torch's GLM predictive take its Jacobians by ``torch.func.jacrev`` on ``plain``, a copy of the
    network made before BackPACK extended it (what laplace-torch's generic ``CurvatureInterface.jacobians`` does,
    on the un-extended copy).  With several fitted networks in one process, BackPACK's own ``jacobians`` raised
    ``AttributeError: 'Parameter' object has no attribute 'grad_batch'`` on all but one of them (laplace-torch 0.3,
    backpack-for-pytorch 1.7.1), and torch.func refuses the extended network itself (its backward hooks are
    autograd.Functions without ``setup_context``).  Same Jacobian, at the same (mean) weights."""

    def jacobians(x, enable_backprop: bool = False):
        params = {n: p.detach() for n, p in plain.named_parameters() if p.requires_grad}

        def f(p):
            out = torch.func.functional_call(plain, p, (x,))
            return out, out

        js, out = torch.func.jacrev(f, has_aux=True)(params)
        js = torch.cat([j.flatten(start_dim=out.dim()) for j in js.values()], dim=-1)
        return js.reshape(out.shape[0], -1, js.shape[-1]).detach(), out.detach()

    la.backend.jacobians = jacobians


def ivon_variances(optimizer) -> torch.Tensor:
    """IVON's posterior variance, flat in parameter order: 1 / (ess * (hess + weight_decay)) per parameter group,
    exactly as IVON's ``_sample_params`` draws its noise."""
    parts = [1.0 / (g["ess"] * (g["hess"] + g["weight_decay"])) for g in optimizer.param_groups]
    return torch.cat(parts).detach().clone()


def ivon_posterior(model: nn.Module, optimizer, likelihood: str, x_example: torch.Tensor,
                   sigma: float | None = None) -> Posterior:
    """IVON's mean-field posterior, with a laplace-torch DiagLaplace carrying the same diagonal precision (zero
    Hessian, per-parameter prior precision 1 / variance) for laplace-torch's GLM predictive."""
    import laplace
    from laplace.curvature import BackPackGGN

    var = ivon_variances(optimizer)
    mean = parameters_to_vector([p for p in model.parameters() if p.requires_grad]).detach().clone()
    kwargs = {"sigma_noise": sigma} if likelihood == "regression" else {}
    plain = copy.deepcopy(model)
    la = laplace.Laplace(model, likelihood, subset_of_weights="all", hessian_structure="diag", backend=BackPackGGN,
                         prior_precision=1.0 / var, **kwargs)
    la.mean = mean
    use_plain_jacobians(la, plain)
    with torch.no_grad():  # what la.fit would set: the backend's Jacobians loop over the outputs
        la.model.output_size = int(model(x_example[:1]).shape[-1])
    assert torch.allclose(la.posterior_variance, var, rtol=1e-5), "DiagLaplace does not carry IVON's variance"
    std = var.sqrt()

    def sampler(n: int, generator: torch.Generator) -> torch.Tensor:
        return mean + std * torch.randn(n, len(mean), generator=generator)

    return Posterior("ivon", model, likelihood, la, optimizer, sigma_noise=sigma, sampler=sampler, plain_model=plain)
