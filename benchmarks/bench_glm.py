"""Compiled ``predictive="glm"`` ONNX model against laplace-torch's own GLM predictive, same posterior.

One MLP 784-128-64-10 (ReLU, 109,386 parameters), trained briefly as in ``bench_laplace.py`` (whose model, data,
posterior, memory and predictor helpers this script imports), with an all-weights laplace-torch posterior
(``hessian_structure`` "diag" and "kron", BackPack GGN backend, prior precision 1e3) fitted on its 512 training
points.  For each structure the same fitted ``Laplace`` object is

* compiled with ``momentprop.compile(model, la, example_inputs=..., covariance="full", predictive="glm")`` into
  one ONNX graph (outputs "mean", "covariance", "probs"), run with ONNX Runtime on all ``--points`` test points
  (default 1,000) in ONE call, and
* evaluated by laplace-torch as ``la(x, pred_type="glm", link_approx="probit")`` on the same points in chunks of
  ``--chunk`` points (default 250; laplace-torch builds the full Jacobian, points x classes x parameters, which is
  about 1.1 GB at 250 points and 4.4 GB at 1,000, and more for kron's intermediate products).

Both compute the same quantity, the linearised predictive with probit link, so the probabilities must agree to
float32 precision: their max abs difference is printed and the row FAILs above 1e-4.  Targets: compiled
>= 1,000x faster and >= 100x less peak extra memory.

Timing: one laplace-torch call per chunk, timed once over all chunks (it takes seconds to minutes, so its one-time
costs do not matter and repeating it would not fit the time budget).  The compiled model is called once as a
warm-up (that call measures its memory), then ``--repeats`` times before and ``--repeats`` times after the
laplace-torch call; its median is used.  The ONNX Runtime session uses bench_mlp's SessionOptions.

Memory: as in ``bench_laplace.py``, the extra peak RSS during the (first) call: ``VmHWM`` after minus ``VmRSS``
before, with the high-water mark reset and ``malloc_trim(0)`` just before.  For laplace-torch this is the peak over
its whole chunk loop.  Memory held before the call (model, posterior, ORT session) is not counted; the RSS that
creating the ORT session adds is printed separately.

Run ``python benchmarks/bench_glm.py`` (1-2 minutes on 2 cores), ``--quick`` for a smoke run (under a minute:
250 points, one chunk).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_laplace import (
    PRIOR_PRECISION, STRUCTURES, N_TRAIN, _mib, compiled_probs, export_compiled, fit_laplace, glm_call, load_average,
    load_note, make_data, make_mlp, train, with_memory,
)
from bench_mlp import make_session, median_ms, quiet_process, session_call

SIZES = (784, 128, 64, 10)
SPEED_TARGET = 1000.0
MEMORY_TARGET = 100.0
PROB_TOLERANCE = 1e-4
MIB_FLOOR = 4 / 1024  # one page: a compiled peak below it counts as one page in the memory ratio


@dataclass
class GlmRow:
    structure: str
    points: int
    chunk: int
    laplace_s: float
    compiled_ms: float
    speedup: float
    laplace_mib: float | None
    compiled_mib: float | None
    memory_ratio: float | None
    max_prob_diff: float
    ok_speed: bool
    ok_memory: bool | None
    ok_probs: bool


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=None, help="test points (default 1000; 250 with --quick)")
    parser.add_argument("--chunk", type=int, default=250, help="points per laplace-torch call (default 250)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (and torch threads)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed compiled calls before and again after the laplace-torch call (default 5)")
    parser.add_argument("--quick", action="store_true", help="250 points (one laplace-torch chunk), for a smoke run")
    parser.add_argument("--spin", action="store_true", help="let ONNX Runtime thread pools spin (off by default)")
    parser.add_argument("--keep", metavar="DIR", default=None,
                        help="write the ONNX files to DIR instead of a temporary directory")
    return parser.parse_args(argv)


def laplace_glm_chunks(la, x: torch.Tensor, chunk: int):
    """laplace-torch's GLM probit predictive on ``x``, ``chunk`` points per call, concatenated."""
    calls = [glm_call(la, x[i: i + chunk]) for i in range(0, len(x), chunk)]
    return lambda: torch.cat([call().detach() for call in calls])


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def format_table(rows: Sequence[GlmRow]) -> str:
    head = (f"{'posterior':<9} {'points':>6} {'chunk':>5} {'laplace s':>10} {'compiled ms':>12} {'speed-up':>9} "
            f"{'laplace MiB':>12} {'compiled MiB':>13} {'mem ratio':>10} {'max|dp|':>9}  result")
    lines = [head, "-" * len(head)]
    for r in rows:
        checks = [("speed", r.ok_speed), ("memory", r.ok_memory), ("probs", r.ok_probs)]
        failed = [name for name, ok in checks if ok is False]
        result = "pass" if not failed else "FAIL (" + ", ".join(failed) + ")"
        ratio = "n/a" if r.memory_ratio is None else f"{r.memory_ratio:.0f}x"
        lines.append(
            f"{r.structure:<9} {r.points:>6} {r.chunk:>5} {r.laplace_s:>10.2f} {r.compiled_ms:>12.1f} "
            f"{r.speedup:>8.0f}x "
            f"{_mib(r.laplace_mib):>12} {_mib(r.compiled_mib):>13} {ratio:>10} {r.max_prob_diff:>9.1e}  {result}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[GlmRow]:
    args = parse_args(argv)
    points = args.points or (250 if args.quick else 1000)
    chunk = min(args.chunk, points)
    quiet_process(args.threads)
    from importlib.metadata import version

    import onnxruntime as ort

    start = time.perf_counter()
    load_start = load_average()
    x_train, y_train = make_data(sizes=SIZES)
    model = train(make_mlp(sizes=SIZES), x_train, y_train)
    n_params = sum(p.numel() for p in model.parameters())
    x_test = torch.randn(points, SIZES[0], generator=torch.Generator().manual_seed(points))
    feed = x_test.numpy()
    rows: list[GlmRow] = []
    setup_s = 0.0
    sizes: dict[str, int] = {}
    session_mib: dict[str, float | None] = {}

    with tempfile.TemporaryDirectory(prefix="momentprop-bench-glm-") as tmp:
        out_dir = args.keep or tmp
        os.makedirs(out_dir, exist_ok=True)
        for structure in STRUCTURES:
            t0 = time.perf_counter()
            la = fit_laplace(model, x_train, y_train, structure)
            path = export_compiled(model, la, x_train[:2], os.path.join(out_dir, f"glm_{structure}.onnx"),
                                   covariance="full", predictive="glm")
            sizes[structure] = os.path.getsize(path)
            setup_s += time.perf_counter() - t0

            held: dict[str, float | None] = {}
            session = with_memory(lambda: make_session(path, args.threads, args.spin), held, "session")()
            session_mib[structure] = held["session"]
            mem: dict[str, float | None] = {}
            compiled = with_memory(session_call(session, feed), mem, "compiled")
            compiled()  # warm-up; measures memory
            t_comp = [timed(compiled)[1] for _ in range(args.repeats)]
            laplace_probs, laplace_s = timed(with_memory(laplace_glm_chunks(la, x_test, chunk), mem, "laplace"))
            t_comp += [timed(compiled)[1] for _ in range(args.repeats)]
            probs = compiled_probs(session)(feed)

            compiled_ms = median_ms(t_comp)
            speedup = 1e3 * laplace_s / compiled_ms
            lap_mib, comp_mib = mem.get("laplace"), mem.get("compiled")
            ratio = None if lap_mib is None or comp_mib is None else lap_mib / max(comp_mib, MIB_FLOOR)
            diff = float(np.abs(probs - laplace_probs.numpy()).max())
            rows.append(GlmRow(
                structure, points, chunk, laplace_s, compiled_ms, speedup, lap_mib, comp_mib, ratio, diff,
                speedup >= SPEED_TARGET, None if ratio is None else ratio >= MEMORY_TARGET, diff <= PROB_TOLERANCE,
            ))
            del session, compiled, la

    print(
        f"momentprop GLM benchmark: MLP {'-'.join(map(str, SIZES))} ReLU ({n_params:,} parameters), "
        "all-weights Laplace "
        f"(BackPack GGN, prior precision {PRIOR_PRECISION:g}, fitted on {N_TRAIN} points), laplace-torch "
        f"{version('laplace-torch')}, onnxruntime {ort.__version__}, torch {torch.__version__}, "
        f"threads={args.threads}, spinning={'on' if args.spin else 'off'}, cpu count={os.cpu_count()}"
    )
    print(f"compiled: predictive='glm', covariance='full', ONNX Runtime, all {points} points in one call, median of "
          f"{2 * args.repeats} calls after a warm-up.\nlaplace-torch: la(x, pred_type='glm', link_approx='probit') in "
          f"chunks of {chunk} points, one timed pass over all {points} points (total seconds).\n"
          f"speed-up = laplace-torch time / compiled time (target >= {SPEED_TARGET:g}x); mem ratio = laplace MiB / "
          f"compiled MiB (target >= {MEMORY_TARGET:g}x).\nMiB = extra peak RSS during the first call (VmHWM after "
          "minus VmRSS before, high-water mark reset and malloc_trim before the call).\n"
          f"max|dp| = max abs difference of the class probabilities, compiled vs laplace-torch (FAIL above "
          f"{PROB_TOLERANCE:g}). ONNX files: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items())
          + "; creating an ORT session adds (not counted above) "
          + ", ".join(f"{k} {_mib(v)} MiB" for k, v in session_mib.items()) + " RSS.")
    if args.quick:
        print(f"(--quick: {points} points; a smoke test, not a measurement)")
    print(format_table(rows))
    print(f"setup (fit + compile + export) {setup_s:.1f} s, total {time.perf_counter() - start:.1f} s; "
          + load_note(load_start, args.threads))
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
