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
    if likelihood == "classification":  # the mean over every point (every position of a sequence model)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
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
               progress: Callable | None = None, max_steps: int | None = None):
    """IVON (ess = number of training labels, cosine schedule, at most ``max_steps`` steps); returns the optimizer
    (the posterior).  Regression uses the Gaussian likelihood with noise ``sigma`` (in standardised units)."""
    import ivon

    epochs = cfg.epochs_for(len(split.x_train), ivon=True)
    # only the trainable parameters: a task that keeps some deterministic sets requires_grad=False on them
    opt = ivon.IVON([p for p in model.parameters() if p.requires_grad], ess=split.y_train.numel(), **cfg.ivon)
    steps = epochs * -(-len(split.x_train) // cfg.batch_size)
    steps = min(steps, max_steps) if max_steps else steps
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    done = 0
    for _ in range(epochs):
        for batch in torch.randperm(len(split.x_train), generator=g).split(cfg.batch_size):
            if done == steps:
                break
            done += 1
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


def tune_prior_precision(post: Posterior, x: torch.Tensor, y: torch.Tensor, grid: tuple[float, ...], samples: int,
                         seed: int) -> float:
    """Set ``post.laplace.prior_precision`` to the grid value with the lowest validation NLPD of the sampling
    predictive (``samples`` draws of laplace-torch's ``la.sample``, common random numbers), as ``fit_laplace``
    does; returns it."""
    scores = []
    for prec in grid:
        post.laplace.prior_precision = prec
        scores.append(_sampled_nlpd(post, x, y, samples, seed))
    best = grid[int(np.nanargmin(scores))]
    post.laplace.prior_precision = best
    post.prior_precision = best
    return best


def fit_laplace(model: nn.Module, split: Split, likelihood: str, structure: str, sigma: float | None = None,
                tune_points: int = 1000, tune_samples: int = 100, grid: tuple[float, ...] = PRIOR_GRID,
                seed: int = 0, tuning: str = "validation") -> Posterior:
    """laplace-torch, all weights, GGN (BackPack), ``hessian_structure`` diag or kron, fitted on the training set.
    ``tuning="validation"``: the scalar prior precision is the grid value with the lowest validation NLPD (up to
    ``tune_points`` validation points) of the sampling predictive with ``tune_samples`` draws from laplace-torch's
    ``la.sample``.  (Tuning with laplace-torch's GLM predictive instead was too slow for kron on Fashion-MNIST:
    minutes per grid value.)  ``tuning="marglik"``: laplace-torch's standard,
    ``la.optimize_prior_precision(method="marglik")`` (a scalar prior precision maximising the marginal
    likelihood); the posterior is then named ``laplace-<structure>-marglik``."""
    import laplace
    from laplace.curvature import BackPackGGN
    from torch.utils.data import DataLoader, TensorDataset

    kwargs = {"sigma_noise": sigma} if likelihood == "regression" else {}
    plain = copy.deepcopy(model)
    la = laplace.Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure,
                         backend=BackPackGGN, **kwargs)
    la.fit(DataLoader(TensorDataset(split.x_train, split.y_train), batch_size=256))
    use_plain_jacobians(la, plain)
    post = Posterior(laplace_name(structure, tuning), model, likelihood, la, la, sigma_noise=sigma, plain_model=plain)
    return tune(post, split, tuning, tune_points, grid, tune_samples, seed)


def laplace_name(structure: str, tuning: str) -> str:
    """``laplace-<structure>``, with ``-marglik`` when the prior precision is tuned by marginal likelihood."""
    return f"laplace-{structure}" + ("-marglik" if tuning == "marglik" else "")


def tune(post: Posterior, split: Split, tuning: str, tune_points: int, grid: tuple[float, ...], tune_samples: int,
         seed: int) -> Posterior:
    """The scalar prior precision of ``post.laplace``: laplace-torch's ``optimize_prior_precision(method="marglik")``
    for ``tuning="marglik"``, else :func:`tune_prior_precision` on the first ``tune_points`` validation points."""
    if tuning == "marglik":
        post.laplace.optimize_prior_precision(pred_type="glm", method="marglik", prior_structure="scalar")
        post.prior_precision = float(post.laplace.prior_precision.reshape(-1)[0])
    elif grid:
        tune_prior_precision(post, split.x_val[:tune_points], split.y_val[:tune_points], grid, tune_samples, seed)
    return post


def per_sample_jacobians(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Jacobians ``(N, outputs, P)`` of the outputs with respect to the random (requires_grad) parameters, flat in
    ``model.parameters()`` order, and the outputs ``(N, outputs)``: ``torch.func.jacrev`` on one input at a time,
    vmapped over the batch.  The same Jacobians as laplace-torch's ``CurvatureInterface.jacobians`` (one
    ``jacrev`` of all outputs of the batch, which back-propagates every output row through the whole batch: 20 s
    per 256 images on a 2-block ViT, against 0.15 s here).  The model must treat the points of a batch
    independently (eval mode, no batch normalisation)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def one(p, xi):
        out = torch.func.functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)
        return out, out

    js, out = torch.func.vmap(torch.func.jacrev(one, has_aux=True), in_dims=(None, 0))(params, x)
    return torch.cat([j.flatten(start_dim=2) for j in js.values()], dim=-1).detach(), out.detach()


def use_plain_jacobians(la, plain: nn.Module) -> None:
    """Make laplace-torch's GLM predictive take its Jacobians by :func:`per_sample_jacobians` on ``plain``, a copy
    of the network made before BackPACK extended it.  With several fitted networks in one process, BackPACK's own
    ``jacobians`` raised ``AttributeError: 'Parameter' object has no attribute 'grad_batch'`` on all but one of
    them (laplace-torch 0.3, backpack-for-pytorch 1.7.1), and torch.func refuses the extended network itself (its
    backward hooks are autograd.Functions without ``setup_context``).  Same Jacobian, at the same (mean) weights,
    and faster than BackPACK's (250 points of the 784-64-32-10 MLP, 1 thread: 0.39 s against 0.86 s), so the GLM
    baseline is not slowed down by this replacement."""

    def jacobians(x, enable_backprop: bool = False):
        return per_sample_jacobians(plain, x)

    la.backend.jacobians = jacobians


def ivon_variances(optimizer) -> torch.Tensor:
    """IVON's posterior variance, flat in parameter order: 1 / (ess * (hess + weight_decay)) per parameter group,
    exactly as IVON's ``_sample_params`` draws its noise."""
    parts = [1.0 / (g["ess"] * (g["hess"] + g["weight_decay"])) for g in optimizer.param_groups]
    return torch.cat(parts).detach().clone()


def ivon_posterior(model: nn.Module, optimizer, likelihood: str, x_example: torch.Tensor,
                   sigma: float | None = None, backend=None, view: Callable[[nn.Module], nn.Module] | None = None,
                   laplace_input: Callable | None = None) -> Posterior:
    """IVON's mean-field posterior, with a laplace-torch DiagLaplace carrying the same diagonal precision (zero
    Hessian, per-parameter prior precision 1 / variance) for laplace-torch's GLM predictive.

    The DiagLaplace uses BackPACK's GGN on ``model`` itself unless a ``backend`` is given (laplace-torch refuses
    BackPACK when some parameters are frozen) and, for sequence models, on ``view(model)`` (one output row per
    point) with ``laplace_input`` turning test inputs into that view's points."""
    import laplace
    from laplace.curvature import BackPackGGN

    var = ivon_variances(optimizer)
    mean = parameters_to_vector([p for p in model.parameters() if p.requires_grad]).detach().clone()
    kwargs = {"sigma_noise": sigma} if likelihood == "regression" else {}
    plain = copy.deepcopy(model) if backend is None else None
    la = laplace.Laplace(model if view is None else view(model), likelihood, subset_of_weights="all",
                         hessian_structure="diag", backend=backend or BackPackGGN, prior_precision=1.0 / var, **kwargs)
    la.mean = mean
    if plain is not None:
        use_plain_jacobians(la, plain)
    with torch.no_grad():  # what la.fit would set: the backend's Jacobians loop over the outputs
        la.model.output_size = int(model(x_example[:1]).shape[-1])
    assert torch.allclose(la.posterior_variance, var, rtol=1e-5), "DiagLaplace does not carry IVON's variance"
    std = var.sqrt()

    def sampler(n: int, generator: torch.Generator) -> torch.Tensor:
        return mean + std * torch.randn(n, len(mean), generator=generator)

    post = Posterior("ivon", model, likelihood, la, optimizer, sigma_noise=sigma, sampler=sampler, plain_model=plain)
    if laplace_input is not None:
        post.laplace_input = laplace_input  # type: ignore[attr-defined]
    return post


# ------------------------------------------------------------------------------------------- sequence (token) models
# Models that map token ids (N, T) to logits (N, T, V) with a label per position (N, T): every position is one
# classification point.  Only the parameters with requires_grad are random; training the MAP network trains all.

def train_map_all_parameters(model: nn.Module, split: Split, likelihood: str, cfg: TrainConfig, seed: int
                             ) -> nn.Module:
    """:func:`train_map` over ALL parameters (the deterministic ones included); afterwards each parameter's
    requires_grad is as it was."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(True)
    try:
        return train_map(model, split, likelihood, cfg, seed)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


class TokenPoints(nn.Module):
    """A sequence model seen as a per-token classifier, for laplace-torch (which wants one output row per data
    point): input ``(B, T + 1)``, the token ids and, in the last column, the position whose logits to return
    ``(B, V)``.  Shares its parameters with the wrapped model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids_and_position: torch.Tensor) -> torch.Tensor:
        ids, position = ids_and_position[:, :-1], ids_and_position[:, -1]
        return self.model(ids)[torch.arange(len(ids)), position]


def fit_laplace_tokens(model: nn.Module, split: Split, likelihood: str, structure: str, sigma: float | None = None,
                       tune_points: int = 8, seed: int = 0, fit_tokens: int = 2048, tune_samples: int = 30,
                       grid: tuple[float, ...] = PRIOR_GRID, tuning: str = "validation") -> Posterior:
    """laplace-torch ``DiagLaplace`` over the random parameters of a sequence model.

    The curvature is laplace-torch's ``CurvlinopsEF`` backend (per-example gradients, ``torch.func``) on
    ``fit_tokens`` seeded (training sequence, position) points seen through :class:`TokenPoints`, with each label
    drawn from the network's own predictive at that position: the empirical Fisher on sampled labels is the
    one-sample Monte Carlo Fisher, an unbiased estimate of the GGN diagonal.  ``temperature`` = fit tokens /
    training tokens scales that subsample's curvature to the whole training set (laplace-torch's posterior
    precision is curvature / temperature + prior precision).  laplace-torch's exact GGN (``CurvlinopsGGN``, and
    ``stochastic=True`` too) materialises every point's Jacobian (outputs x parameters: the vocabulary times
    all random parameters), and BackPACK has no extension for transformers' ``Conv1D`` or attention, so neither
    fits here.  Prior precision: tuned as ``fit_laplace`` does (:func:`tune`)."""
    import laplace
    from laplace.curvature import CurvlinopsEF
    from torch.utils.data import DataLoader, TensorDataset

    assert likelihood == "classification" and structure == "diag", (likelihood, structure)
    rng = np.random.default_rng(seed)
    n, length = split.x_train.shape
    rows = torch.as_tensor(rng.integers(0, n, fit_tokens))
    positions = torch.as_tensor(rng.integers(0, length, fit_tokens))
    points = torch.cat([split.x_train[rows], positions[:, None]], 1)
    wrapped = TokenPoints(model).eval()
    with torch.no_grad():
        probs = torch.softmax(torch.cat([wrapped(c) for c in points.split(256)]), -1)
    sampled = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)
    la = laplace.Laplace(wrapped, "classification", subset_of_weights="all", hessian_structure="diag",
                         backend=CurvlinopsEF, temperature=fit_tokens / split.y_train.numel())
    la.fit(DataLoader(TensorDataset(points, sampled), batch_size=128))
    post = Posterior(laplace_name(structure, tuning), model, likelihood, la, la)
    post.laplace_input = token_points  # type: ignore[attr-defined]  (how laplace-torch's GLM sees test sequences)
    return tune(post, split, tuning, tune_points, grid, tune_samples, seed)


def ivon_posterior_tokens(model: nn.Module, optimizer, likelihood: str, x_example: torch.Tensor,
                          sigma: float | None = None) -> Posterior:
    """:func:`ivon_posterior` of a sequence model whose deterministic parameters have requires_grad=False: the
    DiagLaplace over :class:`TokenPoints` with laplace-torch's ``CurvlinopsGGN`` backend."""
    from laplace.curvature import CurvlinopsGGN

    return ivon_posterior(model, optimizer, likelihood, x_example, sigma, backend=CurvlinopsGGN, view=TokenPoints,
                          laplace_input=token_points)


def token_points(ids: torch.Tensor) -> torch.Tensor:
    """Sequences ``(N, T)`` as :class:`TokenPoints` inputs: ``(N * T, T + 1)``, each sequence once per position
    (position-major within a sequence), so laplace-torch's per-point outputs reshape to ``(N, T, V)``."""
    n, length = ids.shape
    positions = torch.arange(length).repeat(n)
    return torch.cat([ids.repeat_interleave(length, 0), positions[:, None]], 1)


# ------------------------------------------------------------- flat-input models with only some parameters random
# laplace-torch refuses BackPACK when some parameters have requires_grad=False; its torch.func backend
# (CurvlinopsGGN) takes Jacobians of the whole batch's outputs at once, which costs quadratically in the batch size.

def per_sample_ggn_backend():
    """laplace-torch's ``CurvlinopsGGN`` (GGN diagonal ``sum_n J_n^T H_n J_n`` from Jacobians, exact; the GLM
    predictive from the same Jacobians) with :func:`per_sample_jacobians`."""
    from laplace.curvature import CurvlinopsGGN

    class PerSampleJacobianGGN(CurvlinopsGGN):
        def jacobians(self, x, enable_backprop: bool = False):
            return per_sample_jacobians(self.model, x)

    return PerSampleJacobianGGN


def fit_laplace_subset(model: nn.Module, split: Split, likelihood: str, structure: str, sigma: float | None = None,
                       tune_points: int = 1000, seed: int = 0, tune_samples: int = 100,
                       grid: tuple[float, ...] = PRIOR_GRID, tuning: str = "validation") -> Posterior:
    """``fit_laplace`` for a model whose deterministic parameters have requires_grad=False: laplace-torch over the
    random parameters, GGN with :func:`per_sample_ggn_backend` (``structure`` diag), fitted on the whole training
    set; the prior precision tuned as ``fit_laplace`` does (on validation data by :func:`tune_prior_precision`, or
    by marginal likelihood with ``tuning="marglik"``)."""
    import laplace
    from torch.utils.data import DataLoader, TensorDataset

    kwargs = {"sigma_noise": sigma} if likelihood == "regression" else {}
    la = laplace.Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure,
                         backend=per_sample_ggn_backend(), **kwargs)
    la.fit(DataLoader(TensorDataset(split.x_train, split.y_train), batch_size=256))
    post = Posterior(laplace_name(structure, tuning), model, likelihood, la, la, sigma_noise=sigma)
    return tune(post, split, tuning, tune_points, grid, tune_samples, seed)


def ivon_posterior_subset(model: nn.Module, optimizer, likelihood: str, x_example: torch.Tensor,
                          sigma: float | None = None) -> Posterior:
    """:func:`ivon_posterior` for a model whose deterministic parameters have requires_grad=False (IVON then holds
    only the random ones), with :func:`per_sample_ggn_backend`."""
    return ivon_posterior(model, optimizer, likelihood, x_example, sigma, backend=per_sample_ggn_backend())
