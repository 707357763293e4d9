"""The end-to-end demo: IVON on scikit-learn digits, compiled to ONNX, against MAP and Monte Carlo.

Trains a 64-128-64-10 MLP with IVON, compiles model and posterior into one moment graph, writes it to
``<output_dir>/digits_mlp.onnx``, runs that file with ONNX Runtime and prints accuracy, NLPD, ECE and latency
next to the plain model at the posterior mean (MAP) and Monte Carlo over the weight posterior.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import momentprop as mp

from momentprop.posterior import read_posterior

if TYPE_CHECKING:
    import ivon

ONNX_NAME = "digits_mlp.onnx"
HIDDEN = (128, 64)
BATCH_SIZE = 64
ECE_BINS = 15
# IVON settings that train well on digits (see the project notes, section 4).
IVON_SETTINGS = dict(lr=0.2, beta2=0.9995, hess_init=0.5)

Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------- metrics

def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose most probable class is the label."""
    return float((probs.argmax(-1) == labels).mean())


def nlpd(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> float:
    """Negative log predictive density: mean of ``-log p(label)``."""
    picked = probs[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, eps, None)).mean())


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: equal-width confidence bins ``(lo, hi]``, |accuracy - confidence| weighted
    by the fraction of points in each bin."""
    confidence = probs.max(-1)
    correct = probs.argmax(-1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(total)


def evaluate(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"accuracy": accuracy(probs, labels), "nlpd": nlpd(probs, labels), "ece": ece(probs, labels)}


# ------------------------------------------------------------------------------------------------- data and model

def load_data(seed: int, test_size: float = 0.2) -> Data:
    """scikit-learn digits (ships with the package), seeded stratified split, standardised on the train part."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(x_train)
    as_x = lambda a: torch.as_tensor(scaler.transform(a), dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


def build_mlp(n_in: int = 64, n_out: int = 10, hidden: tuple[int, ...] = HIDDEN) -> nn.Sequential:
    """A ReLU MLP ``n_in -> hidden... -> n_out``."""
    sizes = (n_in, *hidden, n_out)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def train_ivon(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, progress: bool = True
) -> "ivon.IVON":
    """Train ``model`` with IVON (ess = number of training points, cosine schedule); return the optimizer,
    which holds the posterior (the model's parameters are its mean)."""
    import ivon
    from tqdm import tqdm

    optimizer = ivon.IVON(model.parameters(), ess=len(x), **IVON_SETTINGS)
    steps_per_epoch = -(-len(x) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(epochs), desc="IVON training", unit="epoch", disable=not progress)
    for _ in bar:
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for batch in order.split(BATCH_SIZE):
            with optimizer.sampled_params(train=True):
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x[batch]), y[batch])
                loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        bar.set_postfix(loss=f"{total / len(x):.4f}")
    return optimizer


# -------------------------------------------------------------------------------------------------- predictors

def map_predict(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Softmax of the plain model at the posterior mean."""
    with torch.no_grad():
        return torch.softmax(model(x), -1).numpy()


def mc_predictor(
    model: nn.Module, variances: dict[str, torch.Tensor], samples: int, seed: int, x: torch.Tensor
) -> Callable[[], np.ndarray]:
    """A thunk returning the softmax on ``x`` averaged over ``samples`` weight draws from N(mean, diag(var));
    each call draws afresh (same seed), so its timing includes the sampling."""
    means = {n: p.detach() for n, p in model.named_parameters()}
    stds = {n: v.sqrt() for n, v in variances.items()}
    forward = torch.func.vmap(lambda params, x: functional_call(model, params, (x,)), in_dims=(0, None))

    def predict() -> np.ndarray:
        g = torch.Generator().manual_seed(seed)
        draws = {
            n: m + stds[n] * torch.randn((samples, *m.shape), generator=g) if n in stds else m.expand(samples, *m.shape)
            for n, m in means.items()
        }
        with torch.no_grad():
            return torch.softmax(forward(draws, x), -1).mean(0).numpy()

    return predict


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads: a model this small gains nothing from more, and spinning threads
    on a busy machine slow training down by orders of magnitude."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def latency_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


# ---------------------------------------------------------------------------------------------------- report

ROWS = (
    ("map", "MAP (plain model)", "torch"),
    ("mc", "Monte Carlo", "torch"),
    ("onnx", "momentprop ONNX", "onnxruntime"),
)


def format_table(results: dict[str, dict[str, float]], samples: int, n_test: int) -> str:
    """The side-by-side table of the three predictors and the speed ratios."""
    lines = [
        f"{'method':<28}{'runtime':<13}{'accuracy':>9}{'NLPD':>9}{'ECE':>9}{'latency ms':>12}",
        "-" * 80,
    ]
    for key, label, runtime in ROWS:
        r = results[key]
        label = f"{label} ({samples} samples)" if key == "mc" else label
        lines.append(
            f"{label:<28}{runtime:<13}{r['accuracy']:>9.4f}{r['nlpd']:>9.4f}{r['ece']:>9.4f}{r['latency_ms']:>12.3f}"
        )
    ratios = results["ratios"]
    lines += [
        "-" * 80,
        f"latency per test-set batch of {n_test}; ECE with {ECE_BINS} bins",
        f"ONNX / plain latency: {ratios['onnx_over_plain']:.2f}x    MC / ONNX latency: {ratios['mc_over_onnx']:.1f}x",
    ]
    return "\n".join(lines)


def run_demo(
    output_dir: str | os.PathLike = "exported",
    epochs: int = 60,
    seed: int = 0,
    samples: int = 100,
    progress: bool = True,
    verbose: bool = True,
    threads: int = 1,
) -> dict[str, object]:
    """Train, compile, export and compare; print the table and return the metrics.

    ``threads`` is the intra-op thread count of torch and ONNX Runtime alike, so the latencies compare.
    Returns ``{"map"|"mc"|"onnx": {"accuracy", "nlpd", "ece", "latency_ms"}, "ratios": {"onnx_over_plain",
    "mc_over_onnx"}, "max_abs_diff_onnx_vs_torch", "onnx_path", "n_test", "wall_s"}``.
    """
    start = time.perf_counter()
    with torch_threads(threads):
        torch.manual_seed(seed)
        x_train, y_train, x_test, y_test = load_data(seed)
        model = build_mlp(x_train.shape[1], int(y_train.max()) + 1)
        optimizer = train_ivon(model, x_train, y_train, epochs, seed, progress)
        model.eval()
        compiled = mp.compile(model, optimizer, example_inputs=(x_test[:2],), likelihood="classification")
        path = compiled.to_onnx(Path(output_dir) / ONNX_NAME)
        runner = mp.OnnxRunner(path, threads=threads)
        predictors = {
            "map": lambda: map_predict(model, x_test),
            "mc": mc_predictor(model, read_posterior(model, optimizer), samples, seed, x_test),
            "onnx": lambda: runner(x_test.numpy())["probs"],
        }
        results = compare(predictors, y_test.numpy())
        torch_probs = compiled.predict(x_test).numpy()
        results["max_abs_diff_onnx_vs_torch"] = float(np.abs(predictors["onnx"]() - torch_probs).max())
    results.update(onnx_path=str(path), n_test=len(x_test), wall_s=time.perf_counter() - start)
    if verbose:
        print_report(results, samples, threads)
    return results


def compare(predictors: dict[str, Callable[[], np.ndarray]], labels: np.ndarray) -> dict[str, object]:
    """Metrics and latency of each predictor (a thunk returning test-set probabilities), and the speed ratios."""
    results: dict[str, object] = {
        key: {**evaluate(predict(), labels), "latency_ms": latency_ms(predict)} for key, predict in predictors.items()
    }
    results["ratios"] = {
        "onnx_over_plain": results["onnx"]["latency_ms"] / results["map"]["latency_ms"],
        "mc_over_onnx": results["mc"]["latency_ms"] / results["onnx"]["latency_ms"],
    }
    return results


def print_report(results: dict[str, object], samples: int, threads: int) -> None:
    print(f"\nwrote {results['onnx_path']}  (ONNX vs compiled torch graph: max |diff| in probs "
          f"{results['max_abs_diff_onnx_vs_torch']:.2e})\n")
    print(format_table(results, samples, results["n_test"]))
    print(f"\ndemo wall time: {results['wall_s']:.1f} s ({threads} thread{'s' * (threads != 1)})")
