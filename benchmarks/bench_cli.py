"""Start-up of the command line on the runtime-only path: ``momentprop --help`` and ``momentprop predict`` on the
fully Bayesian 784-1024-1024-10 MLP's file (256 rows from a .npy file, outputs to .npz), end to end in a fresh
process each time (targets: under 0.5 s and under 1 s), next to ``python -c pass`` as the interpreter's own floor.

    python benchmarks/bench_cli.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import momentprop as mp


def seconds(argv: list[str], repeats: int) -> float:
    """Median wall time of ``argv`` in a fresh process."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                                torch.nn.ReLU(), torch.nn.Linear(1024, 10))
    posterior = {name: torch.full_like(p, 1e-4) for name, p in model.named_parameters()}
    cli = [str(Path(sys.executable).with_name("momentprop"))]
    with tempfile.TemporaryDirectory() as tmp:
        path = mp.compile(model, posterior, (torch.randn(4, 784),), likelihood="classification",
                          covariance="diag").to_onnx(Path(tmp) / "mlp.onnx")
        np.save(Path(tmp) / "x.npy", np.random.default_rng(0).standard_normal((256, 784)).astype(np.float32))
        floor = seconds([sys.executable, "-c", "pass"], args.repeats)
        help_s = seconds(cli + ["--help"], args.repeats)
        predict_s = seconds(cli + ["predict", str(path), str(Path(tmp) / "x.npy"), "-o", str(Path(tmp) / "o.npz")],
                            args.repeats)
    print(f"median of {args.repeats} fresh processes, load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
    print(f"python -c pass:                      {floor:.2f} s")
    print(f"momentprop --help:                   {help_s:.2f} s (target < 0.5 s)")
    print(f"momentprop predict (784-wide MLP):   {predict_s:.2f} s (target < 1 s)")


if __name__ == "__main__":
    main()
