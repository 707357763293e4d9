"""Latency of momentprop-compiled CNNs against the plain model, on ONNX Runtime CPU, measured side by side.

Models:

1. EfficientNet-Lite0 with its ImageNet weights (``benchmarks/efficientnet.py``; a 10-class head), 224x224 RGB
   images, three posteriors (a variance of 1e-6 per random parameter):

   | random parameters | target |
   |---|---|
   | last layer (the head) | <= 1.05x |
   | last stage + head (block 15, the 1x1 head conv, its batch norm, the head) | <= 1.3x |
   | every weight, diag | <= 3.2x |

   The last row's floor is about 3x: a random convolution with a random input costs its mean convolution plus
   one convolution over twice the channels (``conv(m^2, S) + conv(v, M^2 + S)``, the two as one grouped call
   where the export merges them, else two).
2. The small ResNet of the tests (``tests/oracles.py``: skips, batch norm, global average pooling) on 28x28
   images, every weight random (no target; reported).

Batch 1 and 32.  Both files are exported with a dynamic batch; the plain one with ``torch.onnx.export(dynamo=True)``.
Timing follows ``bench_mlp.py`` (whose helpers it imports): identical SessionOptions (``--threads`` intra-op
threads, default 2, sequential execution, no spinning), warm-up, then plain and compiled interleaved and medians
compared.  Where a target is missed, ``--profile`` prints the compiled graph's ops by time (ONNX Runtime's
profiler) for that case.

Run ``python benchmarks/bench_cnn.py`` (several minutes on 2 cores: exporting Lite0 four times dominates), or
``--quick`` for a smoke run (fewer rounds).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from bench_mlp import (  # noqa: E402
    Row, export_plain, format_table, interleaved, make_session, median_ms, pair_ratio, quiet_process, session_call,
)

from benchmarks.efficientnet import LAST_STAGE, lite0, variance_posterior  # noqa: E402

VARIANCE = 1e-6


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (and torch threads)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds at batch 32 (default 15)")
    parser.add_argument("--quick", action="store_true", help="few rounds, for a smoke run")
    parser.add_argument("--profile", action="store_true", help="print the slowest ops of a case that misses")
    parser.add_argument("--keep", metavar="DIR", default=None, help="write the ONNX files to DIR")
    return parser.parse_args(argv)


def export_compiled(model, posterior, example: torch.Tensor, path: str) -> str:
    import momentprop as mp

    return str(mp.compile(model, posterior, (example,), covariance="diag").to_onnx(path))


def profile(path: str, x: np.ndarray, threads: int, top: int = 12) -> str:
    """The ops of the file that took the most time in a few profiled runs."""
    import onnxruntime as ort

    from bench_mlp import session_options

    options = session_options(threads, False)
    options.enable_profiling = True
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, {session.get_inputs()[0].name: x})
    trace = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / 3e3
    total = sum(per_op.values())
    lines = [f"    {op:<24} {ms:8.2f} ms  {100 * ms / total:5.1f}%" for op, ms in
             sorted(per_op.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 15)
    quiet_process(args.threads)
    import onnxruntime as ort
    from oracles import make_cnn

    start = time.perf_counter()
    lite = lite0()
    resnet = make_cnn("resnet")
    cases = [  # (model name, case, posterior, target)
        ("lite0", "last layer", variance_posterior(lite, VARIANCE, ("_fc.",)), 1.05),
        ("lite0", "last stage + head", variance_posterior(lite, VARIANCE, LAST_STAGE), 1.3),
        ("lite0", "every weight, diag", variance_posterior(lite, VARIANCE), 3.2),
        ("resnet", "every weight, diag", variance_posterior(resnet, VARIANCE), None),
    ]
    models = {"lite0": (lite, 224, 3), "resnet": (resnet, 28, 1)}
    rows: list[Row] = []
    profiles: list[str] = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="momentprop-bench-cnn-") as tmp:
        out_dir = args.keep or tmp
        os.makedirs(out_dir, exist_ok=True)
        plain = {}
        for name, (model, size, channels) in models.items():
            path = export_plain(copy.deepcopy(model), torch.randn(2, channels, size, size),
                                os.path.join(out_dir, f"{name}.onnx"))
            plain[name] = make_session(path, args.threads, False)
        setup_s = time.perf_counter() - start
        for i, (name, case, posterior, target) in enumerate(cases):  # one compiled session alive at a time
            model, size, channels = models[name]
            t0 = time.perf_counter()
            path = export_compiled(model, posterior, torch.randn(2, channels, size, size),
                                   os.path.join(out_dir, f"{name}-{i}.onnx"))
            session = make_session(path, args.threads, False)
            setup_s += time.perf_counter() - t0
            for batch in (1, 32):
                x = rng.standard_normal((batch, channels, size, size), dtype=np.float32)
                n = repeats * (8 if batch == 1 else 1)
                t_plain, t_comp = interleaved([session_call(plain[name], x), session_call(session, x)], n,
                                              warmup=max(2, n // 10))
                ratio = median_ms(t_comp) / median_ms(t_plain)
                ok = target is None or ratio <= target
                rows.append(Row(f"{name}: {case}", batch, median_ms(t_plain), median_ms(t_comp), ratio,
                                f"<= {target:g}x" if target else "-", ok,
                                f"paired {pair_ratio(t_comp, t_plain):.2f}x, n={n}"))
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)
                if not ok and args.profile:
                    profiles.append(f"{name}: {case}, batch {batch}:\n{profile(path, x, args.threads)}")
            del session
            gc.collect()

    print(f"momentprop CNN benchmark: onnxruntime {ort.__version__}, torch {torch.__version__}, "
          f"threads={args.threads}, cpu count={os.cpu_count()}; Lite0 at 224x224x3, ResNet at 28x28x1; "
          f"variance {VARIANCE:g} per random parameter")
    print("ratio = median compiled / median plain over interleaved runs; 'paired' = median of per-round ratios")
    if args.quick:
        print("(--quick: few rounds; the figures are a smoke test, not a measurement)")
    print(format_table(rows))
    for p in profiles:
        print(p)
    print(f"setup (compile + export + sessions) {setup_s:.1f} s, total {time.perf_counter() - start:.1f} s")
    return rows


if __name__ == "__main__":
    main()
