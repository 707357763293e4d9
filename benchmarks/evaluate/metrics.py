"""Metrics, written out here (numpy / scikit-learn), independent of momentprop's own heads and calibration code;
the expected calibration error is the demo's (the same definition in both places)."""

from __future__ import annotations

import math

import numpy as np

from examples.demo import ece  # the demo's expected calibration error (15 equal-width bins)


def as_points(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities ``(..., C)`` and labels ``(...)`` as ``(points, C)`` and ``(points,)``: for a sequence model
    every position (token) is one classification point."""
    probs = np.asarray(probs)
    return probs.reshape(-1, probs.shape[-1]), np.asarray(labels).reshape(-1)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(-1) == labels).mean())


def class_nlpd(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> float:
    """Mean of ``-log p(label)`` over all points (all tokens of all sequences)."""
    probs, labels = as_points(probs, labels)
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], eps, None)).mean())


def entropy(probs: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    return -(probs * np.log(np.clip(probs, eps, None))).sum(-1)


def ood_auroc(probs_in: np.ndarray, probs_out: np.ndarray) -> float:
    """AUROC of telling out-of-distribution from test points by predictive entropy (OOD = positive class)."""
    from sklearn.metrics import roc_auc_score

    scores_in, scores_out = entropy(probs_in).reshape(-1), entropy(probs_out).reshape(-1)
    scores = np.concatenate([scores_in, scores_out])
    truth = np.concatenate([np.zeros(len(scores_in)), np.ones(len(scores_out))])
    return float(roc_auc_score(truth, scores))


def classification_metrics(probs: np.ndarray, labels: np.ndarray, probs_ood: np.ndarray | None) -> dict[str, float]:
    """Accuracy, NLPD and ECE over all points (a sequence model's tokens each count once); OOD AUROC if given."""
    probs, labels = as_points(probs, labels)
    out = {"acc": accuracy(probs, labels), "nlpd": class_nlpd(probs, labels), "ece": ece(probs, labels)}
    if probs_ood is not None:
        out["auroc"] = ood_auroc(probs, probs_ood)
    return out


def gaussian_metrics(mean: np.ndarray, var: np.ndarray, y: np.ndarray, y_scale: float) -> dict[str, float]:
    """RMSE and NLPD of a Gaussian predictive N(mean, var) (standardised units), reported in the original units:
    RMSE * y_scale, NLPD + log(y_scale)."""
    mean, var, y = (np.asarray(a, np.float64).reshape(-1) for a in (mean, var, y))
    nlpd = 0.5 * (np.log(2 * math.pi * var) + (y - mean) ** 2 / var)
    return {"rmse": float(np.sqrt(((mean - y) ** 2).mean()) * y_scale), "nlpd": float(nlpd.mean() + math.log(y_scale))}


def mixture_metrics(f: np.ndarray, sigma: float, y: np.ndarray, y_scale: float) -> dict[str, float]:
    """RMSE (of the mixture mean) and NLPD of the Monte Carlo predictive: the equal-weight mixture of
    N(f_s(x), sigma^2) over weight samples ``f`` of shape (S, N), standardised units in, original units out."""
    f = np.asarray(f, np.float64).reshape(len(f), -1)
    y = np.asarray(y, np.float64).reshape(-1)
    log_comp = -0.5 * (np.log(2 * math.pi * sigma**2) + (y[None] - f) ** 2 / sigma**2)
    top = log_comp.max(0)
    log_mix = top + np.log(np.exp(log_comp - top).mean(0))
    mean = f.mean(0)
    return {"rmse": float(np.sqrt(((mean - y) ** 2).mean()) * y_scale),
            "nlpd": float(-log_mix.mean() + math.log(y_scale))}


def relative_error_stats(approx: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Median and 90th percentile of |approx - reference| / reference over all entries."""
    rel = np.abs(np.asarray(approx, np.float64) - reference) / np.asarray(reference, np.float64)
    rel = rel[np.isfinite(rel)]
    return {"median": float(np.median(rel)), "p90": float(np.percentile(rel, 90))}
