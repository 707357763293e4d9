"""Low-precision variance branch: the fully Bayesian 784-1024-1024-10 MLP (classification, diag) at batch 256 with
ONNX Runtime on CPU, plain float32 ONNX against the compiled file in float32, with every matrix product in int8
(``momentprop convert --precision int8``) and with only the variance branch in int8
(``--quantize-variance-only``: the mean stays float32 and bit-exact), timed side by side (interleaved, medians of
per-round ratios), with their errors against the float32 compiled file on the same inputs.

Targets for the variance-only int8 file: <= 1.8x the plain float32 model, variance relative error <= 2%,
probabilities within 0.5%.

    python benchmarks/bench_lowprec.py [--threads 2] [--repeats 60] [--batch 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mlp import export_plain, interleaved, make_mlp, make_posterior, make_session, median_ms, pair_ratio

import momentprop as mp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = make_mlp()
    x = torch.randn(args.batch, 784, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain = export_plain(model, x[:4], str(tmp / "plain.onnx"))
        cm = mp.compile(model, make_posterior(model), (x[:4],), likelihood="classification", covariance="diag")
        fp32 = cm.to_onnx(tmp / "fp32.onnx")
        files = {"fp32": fp32, "int8 (all products)": mp.convert(fp32, tmp / "int8.onnx", precision="int8"),
                 "int8 (variance branch only)": mp.convert(fp32, tmp / "int8v.onnx", precision="int8",
                                                           quantize_variance_only=True)}
        sessions = {"plain": make_session(plain, args.threads, False)}
        sessions.update({name: make_session(str(path), args.threads, False) for name, path in files.items()})
        feeds = x.numpy()
        outputs = {name: dict(zip([o.name for o in s.get_outputs()], s.run(None, {s.get_inputs()[0].name: feeds})))
                   for name, s in sessions.items()}
        calls = [(lambda s=s: s.run(None, {s.get_inputs()[0].name: feeds})) for s in sessions.values()]
        times = dict(zip(sessions, interleaved(calls, args.repeats, warmup=5)))
    reference = outputs["fp32"]
    print(f"batch {args.batch}, {args.threads} ORT threads, {args.repeats} interleaved rounds, load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| file | ms | ratio to plain fp32 | mean bit-exact | variance rel. error (median / max-norm) | "
          "probs max abs error |")
    print("|---|---|---|---|---|---|")
    print(f"| plain fp32 | {median_ms(times['plain']):.2f} | 1.00 | – | – | – |")
    for name in files:
        out = outputs[name]
        relative = np.abs(out["variance"] - reference["variance"]) / np.abs(reference["variance"])
        norm = np.abs(out["variance"] - reference["variance"]).max() / np.abs(reference["variance"]).max()
        print(f"| {name} | {median_ms(times[name]):.2f} | {pair_ratio(times[name], times['plain']):.2f} | "
              f"{'yes' if np.array_equal(out['mean'], reference['mean']) else 'no'} | "
              f"{np.median(relative):.2%} / {norm:.2%} | {np.abs(out['probs'] - reference['probs']).max():.2e} |")


if __name__ == "__main__":
    main()
