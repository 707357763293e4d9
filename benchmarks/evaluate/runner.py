"""Runs every method on every posterior of one :class:`~.registry.Problem` and returns one record per
(posterior, method): metrics, time per 1,000 test points, peak extra memory, and the latent-variance error.

A *point* is one prediction: one input row for flat inputs, one position (token) for a sequence model whose
output is ``(N, T, C)``; times are per 1,000 points and the metrics average over points."""

from __future__ import annotations

import copy
import time
import warnings
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from . import methods as M
from .metrics import classification_metrics, gaussian_metrics, mixture_metrics, relative_error_stats
from .posteriors import Posterior, fit_laplace, ivon_posterior, residual_sigma, train_ivon, train_map
from .registry import Problem

# the compiled predictives: the defaults for the posterior (laplace-torch: its GLM; IVON: the paper's rule), the
# paper's rule in both modes, and the paper's rule with moment-matched activations; each also after calibrate, and
# the defaults after calibrate(choose=True), which picks among the predictives by validation NLPD
COMPILED = (
    ("compiled-default", {}),
    ("compiled-diag", {"covariance": "diag", "predictive": "suq", "activations": "linearised"}),
    ("compiled-full", {"covariance": "full", "predictive": "suq", "activations": "linearised"}),
    ("compiled-mm", {"covariance": "full", "predictive": "suq", "activations": "moment_matched"}),
)


def method_names(problem: Problem) -> list[str]:
    names = ["map"] + [f"mc-{n}" for n in problem.mc_samples] + ["glm"]
    for name, _ in COMPILED:
        names += [name, f"{name}+cal"]
    return names + ["compiled-choose"]


def steps(problem: Problem) -> int:
    """Progress-bar steps of one problem: fitting each posterior, each method, and the variance reference."""
    return len(problem.posteriors) * (len(method_names(problem)) + 2)


def _metrics(problem: Problem, pred, pred_ood, sigma: float | None) -> dict[str, float]:
    s = problem.split
    if problem.likelihood == "classification":
        return classification_metrics(pred, s.y_test.numpy(), pred_ood)
    if "samples" in pred:
        return mixture_metrics(pred["samples"], sigma, s.y_test.numpy(), s.y_scale)
    return gaussian_metrics(pred["mean"], pred["var"], s.y_test.numpy(), s.y_scale)


def _described(cm) -> str:
    """The compiled model's predictive, covariance and activation rule, e.g. "glm/full/linearised"."""
    o = cm.info.options
    return f"{o.predictive}/{o.covariance}/{o.activations}"


def _quietly(fn, *args, **kwargs):
    """``fn`` with its warnings silenced (calibrate's bound warnings; the record keeps ``at_bound``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def fit_posteriors(problem: Problem, tick: Callable[[str], None]) -> list[Posterior]:
    """Train the MAP network (shared by the laplace-torch posteriors) and the IVON network, fit the posteriors."""
    s, lik, cfg = problem.split, problem.likelihood, problem.train
    train_map_fn = problem.train_map or train_map
    train_ivon_fn = problem.train_ivon or train_ivon
    fit_laplace_fn = problem.fit_laplace or fit_laplace
    ivon_posterior_fn = problem.ivon_posterior or ivon_posterior
    out: list[Posterior] = []
    map_model, sigma = None, None
    for name in problem.posteriors:
        t0 = time.perf_counter()
        if name.startswith("laplace-") or (lik == "regression" and sigma is None):
            if map_model is None:
                map_model = train_map_fn(problem.make_model(problem.seed), s, lik, cfg, problem.seed)
                sigma = residual_sigma(map_model, s.x_val, s.y_val) if lik == "regression" else None
        if name.startswith("laplace-"):
            structure, *tuning = name.split("-")[1:]  # laplace-kron, laplace-kron-marglik
            extra = {"tuning": tuning[0]} if tuning else {}
            post = fit_laplace_fn(copy.deepcopy(map_model), s, lik, structure, sigma=sigma,
                                  tune_points=problem.tune_points, seed=problem.seed, **extra)
        elif name == "ivon":
            model = problem.make_model(problem.seed)
            train_sigma = max(sigma, cfg.ivon_noise_floor) if lik == "regression" else 1.0
            opt = train_ivon_fn(model, s, lik, cfg, problem.seed, sigma=train_sigma)
            ivon_sigma = residual_sigma(model, s.x_val, s.y_val) if lik == "regression" else None
            post = ivon_posterior_fn(model, opt, lik, s.x_train, ivon_sigma)
        else:
            raise ValueError(f"unknown posterior {name!r}")
        post.fit_s = time.perf_counter() - t0  # type: ignore[attr-defined]
        out.append(post)
        tick(f"fit {name}")
    return out


def run_problem(problem: Problem, tick: Callable[[str], None] = lambda _: None) -> list[dict]:
    s = problem.split
    records: list[dict] = []
    posteriors = fit_posteriors(problem, tick)
    with torch.no_grad():
        example_out = posteriors[0].model(s.x_test[:1])
    n_out = int(example_out.shape[-1])  # outputs per point (classes)
    positions = int(example_out[0].numel()) // n_out  # points per input row (tokens per sequence; 1 for flat inputs)
    test_points = len(s.x_test) * positions
    x_ref = s.x_test[: problem.reference_points]
    x_cal, y_cal = s.x_val[: problem.calibration_points], s.y_val[: problem.calibration_points]
    calibration = DataLoader(TensorDataset(x_cal, y_cal), batch_size=problem.predict_chunk or len(x_cal))
    for post in posteriors:
        base = dict(task=problem.task, dataset=problem.dataset, seed=problem.seed, posterior=post.name,
                    n_test=len(s.x_test), n_train=len(s.x_train), n_test_points=test_points, n_outputs=n_out,
                    n_train_points=len(s.x_train) * positions, reference_samples=problem.reference_samples,
                    prior_precision=post.prior_precision,
                    sigma_noise=None if post.sigma_noise is None else post.sigma_noise * s.y_scale)
        # the Monte Carlo reference of the latent variance (10,000 samples, on x_ref)
        t0 = time.perf_counter()
        ref_var = M.mc_latent_variance(post, x_ref, problem.reference_samples, seed=10_000 + problem.seed,
                                       vectorised=problem.mc_vectorised)
        ref_s = time.perf_counter() - t0
        tick(f"{post.name}: MC-{problem.reference_samples} reference")
        latent: dict[str, np.ndarray] = {}

        def record(method: str, measured: M.Measured | None, ood=None, sigma=post.sigma_noise, **extra) -> None:
            row = dict(base, method=method, **extra)
            if measured is not None:
                row.update(_metrics(problem, measured.prediction, ood, sigma))
                row.update(ms_per_1000=measured.ms_per_1000, peak_mib=measured.peak_mib,
                           finite=M.is_finite_prediction(measured.prediction))
            if method in latent:
                row.update({f"var_err_{k}": v for k, v in relative_error_stats(latent[method], ref_var).items()})
            records.append(row)
            tick(f"{post.name}: {method}")

        def run(method: str, predict, **extra) -> None:
            measured = M.measure(predict, s.x_test, test_points)
            ood = predict(s.x_ood) if (s.x_ood is not None and problem.likelihood == "classification") else None
            record(method, measured, ood, **extra)

        run("map", M.map_predictor(post))
        for n in problem.mc_samples:
            if n == 1000:
                latent[f"mc-{n}"] = M.mc_latent_variance(post, x_ref, n, seed=problem.seed,
                                                         vectorised=problem.mc_vectorised)
            run(f"mc-{n}", M.mc_predictor(post, n, seed=problem.seed, vectorised=problem.mc_vectorised))
        fits, why = M.glm_fits(post, problem.glm_chunk, n_out * positions)
        if fits:
            latent["glm"] = M.glm_latent_variance(post, x_ref, problem.glm_chunk)
            run("glm", M.glm_predictor(post, problem.glm_chunk))
        else:
            record("glm", None, note=f"not run: {why}")
        for name, options in COMPILED:
            t0 = time.perf_counter()
            cm = M.compile_posterior(post, s.x_train[:2], **options)
            compile_s = time.perf_counter() - t0
            covariance = cm.info.options.covariance
            predictor = M.compiled_predictor(cm, problem.likelihood, problem.predict_chunk)
            t0 = time.perf_counter()
            latent[name] = M.compiled_latent_variance(cm, x_ref, problem.predict_chunk)
            per_row_s = (time.perf_counter() - t0) / len(x_ref)
            projected_s = per_row_s * (2 * len(s.x_test) + len(x_cal))
            if covariance == "full" and problem.full_budget_s is not None and projected_s > problem.full_budget_s:
                # time it (and its memory) on the reference rows only; the record says why the rest was not run
                on_ref = M.measure(predictor, x_ref, len(x_ref) * positions)
                note = (f"not run on the test set: with the full {n_out:,} x {n_out:,} output covariance per point, "
                        f"the test set twice and calibration would take longer than the {problem.full_budget_s:,.0f} "
                        f"s allowed per posterior and seed (time and memory measured on the "
                        f"{len(x_ref) * positions:,} reference points, where its latent variance is checked)")
                record(name, None, note=note, setup_s=compile_s, ms_per_1000=on_ref.ms_per_1000,
                       peak_mib=on_ref.peak_mib, projected_s=projected_s)
                record(f"{name}+cal", None, note=note, projected_s=projected_s)
                continue
            run(name, predictor, setup_s=compile_s, predictive=_described(cm))
            chosen = copy.deepcopy(cm) if name == "compiled-default" else None  # uncalibrated, for calibrate(choose)
            t0 = time.perf_counter()
            scale = _quietly(cm.calibrate, calibration)
            run(f"{name}+cal", predictor, setup_s=time.perf_counter() - t0, variance_scale=scale,
                at_bound=cm.calibration.at_bound)
            if chosen is not None:
                t0 = time.perf_counter()
                scale = _quietly(chosen.calibrate, calibration, choose=True)
                run("compiled-choose", M.compiled_predictor(chosen, problem.likelihood, problem.predict_chunk),
                    setup_s=time.perf_counter() - t0, variance_scale=scale, predictive=_described(chosen),
                    at_bound=chosen.calibration.at_bound)
        for row in records:
            if row["posterior"] == post.name:
                row.setdefault("fit_s", post.fit_s)  # type: ignore[attr-defined]
                row.setdefault("reference_s", ref_s)
    return records
