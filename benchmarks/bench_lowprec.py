"""Low-precision variance branch: the fully Bayesian 784-1024-1024-10 MLP (classification, diag) at batch 256, or
EfficientNet-Lite0 with every weight random at batch 32 (``--model lite0``), with ONNX Runtime on CPU. The plain
float32 ONNX model against the compiled file in float32, with every matrix product and convolution in int8
(``momentprop convert --precision int8``) and with only the variance branch in int8 (``--quantize-variance-only``:
the mean stays float32 and bit-exact). Each compiled file is timed beside the plain model (interleaved, median of
the per-round ratios; one compiled session at a time), and its errors are measured against the float32 compiled
file on the same inputs.

Targets for the variance-only int8 file: <= 1.8x the plain float32 model, variance relative error <= 2%,
probabilities within 0.5%.

    python benchmarks/bench_lowprec.py [--threads 2] [--repeats 60] [--batch 256]
    python benchmarks/bench_lowprec.py --model lite0 --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from bench_mlp import (  # noqa: E402
    export_plain, interleaved, make_mlp, make_posterior, make_session, median_ms, pair_ratio,
)

import momentprop as mp  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--batch", type=int, default=None, help="default: 256 (mlp), 32 (lite0)")
    parser.add_argument("--model", choices=["mlp", "lite0"], default="mlp",
                        help="lite0: EfficientNet-Lite0 at 224x224, every weight random (variance 1e-6)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model == "lite0":
        from benchmarks.efficientnet import lite0, variance_posterior

        model, batch = lite0(), args.batch or 32
        posterior = variance_posterior(model, 1e-6)
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    else:
        model, batch = make_mlp(), args.batch or 256
        posterior = make_posterior(model)
        x = torch.randn(batch, 784, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain = export_plain(model, x[:4], str(tmp / "plain.onnx"))
        cm = mp.compile(model, posterior, (x[:4],), likelihood="classification", covariance="diag")
        fp32 = cm.to_onnx(tmp / "fp32.onnx")
        print("compiled and exported", flush=True)
        del cm, model  # the moment graph and the model hold gigabytes for EfficientNet-Lite0
        gc.collect()
        files = {"fp32": fp32, "int8 (all products)": mp.convert(fp32, tmp / "int8.onnx", precision="int8"),
                 "int8 (variance branch only)": mp.convert(fp32, tmp / "int8v.onnx", precision="int8",
                                                           quantize_variance_only=True)}
        # one compiled session at a time beside the plain one (EfficientNet-Lite0's every-weight sessions hold
        # gigabytes each at batch 32), each pair interleaved
        plain_session = make_session(plain, args.threads, False)
        feeds = x.numpy()
        run_plain = lambda: plain_session.run(None, {plain_session.get_inputs()[0].name: feeds})  # noqa: E731
        outputs, times = {}, {}
        print("converted", flush=True)
        for name, path in files.items():
            session = make_session(str(path), args.threads, False)
            print(f"timing {name}", flush=True)
            run = lambda s=session: s.run(None, {s.get_inputs()[0].name: feeds})  # noqa: E731
            outputs[name] = dict(zip([o.name for o in session.get_outputs()], run()))
            times["plain", name], times[name] = interleaved([run_plain, run], args.repeats, warmup=2)
            del session, run
            gc.collect()
    reference = outputs["fp32"]
    print(f"{args.model}, batch {batch}, {args.threads} ORT threads, {args.repeats} interleaved rounds, load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| file | ms | ratio to plain fp32 | mean bit-exact | variance rel. error (median / max-norm) | "
          "probs max abs error |")
    print("|---|---|---|---|---|---|")
    print(f"| plain fp32 | {median_ms(times['plain', 'fp32']):.2f} | 1.00 | – | – | – |")
    for name in files:
        out = outputs[name]
        relative = np.abs(out["variance"] - reference["variance"]) / np.abs(reference["variance"])
        norm = np.abs(out["variance"] - reference["variance"]).max() / np.abs(reference["variance"]).max()
        print(f"| {name} | {median_ms(times[name]):.2f} | {pair_ratio(times[name], times['plain', name]):.2f} | "
              f"{'yes' if np.array_equal(out['mean'], reference['mean']) else 'no'} | "
              f"{np.median(relative):.2%} / {norm:.2%} | {np.abs(out['probs'] - reference['probs']).max():.2e} |")


if __name__ == "__main__":
    main()
