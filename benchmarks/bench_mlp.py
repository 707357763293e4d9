"""Latency of a momentprop-compiled MLP against the plain model and against Monte Carlo.

Three comparisons, each measured side by side in one run (warm-up, then the compared runs interleaved
A, B, A, B, ... and medians taken), on CPU:

1. fully Bayesian MLP 784-1024-1024-10 (ReLU; a variance on every weight and bias): compiled ONNX latency /
   plain ONNX latency at batch 1 and 256 (target <= 2.8x at batch 256; the arithmetic floor is ~2.5x:
   one product per layer for the mean, two more for the variance, except the first layer whose input is
   deterministic);
2. the same MLP with only the last layer Bayesian (target <= 1.15x);
3. compiled ONNX (ONNX Runtime) against Monte Carlo with 100 weight samples in PyTorch at batch 256
   (target >= 30x speed-up).  Two Monte Carlo implementations are timed, interleaved with the compiled
   model: ``torch.func.vmap`` over ``functional_call`` with the 100 weight sets stacked, and a loop of 100
   forward passes; the faster one is compared and named.  The weight samples are drawn once, before
   timing (the most favourable setting for Monte Carlo: a fixed ensemble); drawing them is not timed.

Every ONNX Runtime session is created with the same SessionOptions (``--threads`` intra-op threads,
sequential execution).  Thread-pool spinning is off by default: with two sessions run alternately, a
spinning pool of the session that just ran steals cores from the one that runs next.  ``--spin`` turns it on.

Run ``python benchmarks/bench_mlp.py`` (about 1-2 minutes on 2 cores), ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

SIZES = (784, 1024, 1024, 10)
VARIANCE = 1e-3
MC_SAMPLES = 100


@dataclass
class Row:
    case: str
    batch: int
    plain_ms: float
    compiled_ms: float
    ratio: float
    target: str
    ok: bool
    note: str = ""


def make_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(SIZES) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def make_posterior(model: nn.Module, names: Sequence[str] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Diagonal variances, uniform in [0.5, 1.5] * VARIANCE, for ``names`` (default: every parameter)."""
    g = torch.Generator().manual_seed(seed)
    return {
        n: VARIANCE * (0.5 + torch.rand(p.shape, generator=g))
        for n, p in model.named_parameters()
        if names is None or n in names
    }


def session_options(threads: int, spin: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return options


def make_session(path: str, threads: int, spin: bool):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads, spin), providers=["CPUExecutionProvider"])


def export_plain(model: nn.Module, x: torch.Tensor, path: str) -> str:
    torch.onnx.export(
        model,
        (x,),
        path,
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        input_names=["input"],
        output_names=["logits"],
        verbose=False,
    )
    return path


def export_compiled(model: nn.Module, posterior, x: torch.Tensor, path: str) -> str:
    import momentprop as mp

    cm = mp.compile(model, posterior, example_inputs=(x,))
    return str(cm.to_onnx(path))


def session_call(session, x: np.ndarray) -> Callable[[], object]:
    name = session.get_inputs()[0].name
    feeds = {name: x}
    run = session.run
    return lambda: run(None, feeds)


def interleaved(fns: Sequence[Callable[[], object]], repeats: int, warmup: int) -> list[list[float]]:
    """Warm each function up, then time them in turn (A, B, ..., A, B, ...) ``repeats`` times; seconds."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    clock = time.perf_counter
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = clock()
            fn()
            times[i].append(clock() - t0)
    return times


def median_ms(ts: Sequence[float]) -> float:
    return 1e3 * statistics.median(ts)


def quantile_ratio(num: Sequence[float], den: Sequence[float], q: float = 0.1) -> float:
    """Ratio of a low quantile of each (less exposed to preemption by other tenants than the median)."""
    return float(np.quantile(num, q) / np.quantile(den, q))


def pair_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of the per-round ratios (each round ran both back to back)."""
    return statistics.median(a / b for a, b in zip(num, den))


# ----------------------------------------------------------------------------------------- Monte Carlo


def sample_weights(
    model: nn.Module, posterior: dict[str, torch.Tensor], n: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """``n`` weight sets from N(params, diag(posterior)), stacked on a new leading dim."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():
        p = p.detach()
        if name in posterior:
            std = posterior[name].sqrt()
            out[name] = p + std * torch.randn((n, *p.shape), generator=g)
        else:
            out[name] = p.expand(n, *p.shape)
    return out


def mc_vmap(model: nn.Module, samples: dict[str, torch.Tensor], x: torch.Tensor) -> Callable[[], torch.Tensor]:
    from torch.func import functional_call, vmap

    def one(params, x):
        return functional_call(model, params, (x,))

    batched = vmap(one, in_dims=(0, None))

    def run():
        with torch.inference_mode():
            out = batched(samples, x)  # (S, B, C)
            return out.mean(0), out.var(0)

    return run


def mc_loop(model: nn.Module, samples: dict[str, torch.Tensor], x: torch.Tensor) -> Callable[[], torch.Tensor]:
    from torch.func import functional_call

    n = next(iter(samples.values())).shape[0]
    per_sample = [{k: v[i] for k, v in samples.items()} for i in range(n)]

    def run():
        with torch.inference_mode():
            outs = torch.stack([functional_call(model, params, (x,)) for params in per_sample])
            return outs.mean(0), outs.var(0)

    return run


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (and torch threads)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved rounds per latency case (default 300; 30 with --quick)")
    parser.add_argument("--mc-repeats", type=int, default=None,
                        help="interleaved rounds for Monte Carlo (default 7; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="few repeats and 10 MC samples, for a smoke run")
    parser.add_argument("--spin", action="store_true", help="let ONNX Runtime thread pools spin (off by default)")
    parser.add_argument("--keep", metavar="DIR", default=None,
                        help="write the ONNX files to DIR instead of a temporary directory")
    return parser.parse_args(argv)


def quiet_process(threads: int) -> None:
    """torch threads as ONNX Runtime's; no warnings or exporter log lines between the table rows."""
    import logging

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def format_table(rows: Sequence[Row]) -> str:
    head = (f"{'case':<26} {'batch':>5} {'plain ms':>10} {'compiled ms':>12} {'ratio':>8} {'target':>8}  "
            f"{'result':<6} note")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.case:<26} {r.batch:>5} {r.plain_ms:>10.3f} {r.compiled_ms:>12.3f} {r.ratio:>7.2f}x {r.target:>8}  "
            f"{'pass' if r.ok else 'FAIL':<6} {r.note}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    repeats = args.repeats or (30 if args.quick else 300)
    mc_repeats = args.mc_repeats or (2 if args.quick else 7)
    mc_samples = 10 if args.quick else MC_SAMPLES
    quiet_process(args.threads)
    import onnxruntime as ort

    start = time.perf_counter()
    model = make_mlp()
    full_post = make_posterior(model)
    last = f"{len(model) - 1}."
    last_post = make_posterior(model, names=[n for n in dict(model.named_parameters()) if n.startswith(last)])
    example = torch.randn(2, SIZES[0])

    with tempfile.TemporaryDirectory(prefix="momentprop-bench-") as tmp:
        out_dir = args.keep or tmp
        os.makedirs(out_dir, exist_ok=True)
        paths = {
            "plain": export_plain(copy.deepcopy(model), example, os.path.join(out_dir, "plain.onnx")),
            "full": export_compiled(model, full_post, example, os.path.join(out_dir, "full_bayes.onnx")),
            "last": export_compiled(model, last_post, example, os.path.join(out_dir, "last_layer.onnx")),
        }
        sessions = {k: make_session(p, args.threads, args.spin) for k, p in paths.items()}
        setup_s = time.perf_counter() - start

        rows: list[Row] = []
        rng = np.random.default_rng(0)
        for case, key, limit in (("fully Bayesian", "full", 2.8), ("last layer Bayesian", "last", 1.15)):
            for batch in (1, 256):
                x = rng.standard_normal((batch, SIZES[0]), dtype=np.float32)
                n = repeats * (4 if batch == 1 else 1)  # batch-1 calls are sub-millisecond: more rounds
                t_plain, t_comp = interleaved(
                    [session_call(sessions["plain"], x), session_call(sessions[key], x)], n, warmup=max(5, n // 10)
                )
                ratio = median_ms(t_comp) / median_ms(t_plain)
                target_applies = batch == 256
                rows.append(
                    Row(
                        case, batch, median_ms(t_plain), median_ms(t_comp), ratio,
                        f"<= {limit:g}x" if target_applies else "-",
                        ratio <= limit if target_applies else True,
                        f"paired {pair_ratio(t_comp, t_plain):.2f}x, p10 {quantile_ratio(t_comp, t_plain):.2f}x, n={n}",
                    )
                )

        # Monte Carlo, batch 256: compiled ONNX vs vmap vs loop, interleaved.
        batch = 256
        xt = torch.randn(batch, SIZES[0], generator=torch.Generator().manual_seed(1))
        samples = sample_weights(model, full_post, mc_samples)
        fns = [session_call(sessions["full"], xt.numpy()), mc_vmap(model, samples, xt), mc_loop(model, samples, xt)]
        t_comp, t_vmap, t_loop = interleaved(fns, mc_repeats, warmup=1)
        vmap_faster = median_ms(t_vmap) <= median_ms(t_loop)
        mc_name, t_mc = ("vmap+functional_call", t_vmap) if vmap_faster else ("loop of forwards", t_loop)
        speedup = median_ms(t_mc) / median_ms(t_comp)
        rows.append(
            Row(
                f"MC-{mc_samples} torch vs compiled", batch, median_ms(t_mc), median_ms(t_comp), speedup,
                ">= 30x" if mc_samples == MC_SAMPLES else "-", speedup >= 30 or mc_samples != MC_SAMPLES,
                f"MC = {mc_name} (vmap {median_ms(t_vmap):.1f} ms, loop {median_ms(t_loop):.1f} ms), n={mc_repeats}",
            )
        )
        del samples

    print(
        f"momentprop MLP benchmark: MLP {'-'.join(map(str, SIZES))} ReLU, onnxruntime {ort.__version__}, "
        f"torch {torch.__version__}, threads={args.threads}, spinning={'on' if args.spin else 'off'}, "
        f"cpu count={os.cpu_count()}"
    )
    print("ratio = median compiled / median plain over interleaved runs (pass/fail uses it); note: 'paired' = "
          "median of per-round ratios, 'p10' = ratio of 10th percentiles.\nMC row: 'plain ms' = Monte Carlo, "
          "'compiled ms' = compiled ONNX, ratio = speed-up of compiled over MC (weight samples drawn before timing)")
    if args.quick:
        print("(--quick: few repeats and 10 MC samples; figures are a smoke test, not a measurement)")
    print(format_table(rows))
    print(f"setup (compile + export + sessions) {setup_s:.1f} s, total {time.perf_counter() - start:.1f} s")
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
