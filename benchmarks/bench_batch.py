"""Batch scoring throughput: 1M table rows through an exported regression MLP (16-64-64-1, every weight random,
full covariance), one process (``momentprop predict`` on a Parquet folder, one ONNX Runtime session) against Ray
Data on a local Ray cluster (``momentprop.batch.score_with_ray``, one session per actor), side by side in one run.

    python benchmarks/bench_batch.py [--rows 1000000] [--actors 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import momentprop as mp
from momentprop.batch import predict_table, score_with_ray

FEATURES = 16


def write_dataset(folder: Path, rows: int, parts: int = 8) -> None:
    x = np.random.default_rng(0).standard_normal((rows, FEATURES)).astype(np.float32)
    folder.mkdir(parents=True)
    for i, part in enumerate(np.array_split(np.arange(rows), parts)):
        pq.write_table(pa.table({"id": part, **{f"x{j}": x[part, j] for j in range(FEATURES)}}),
                       folder / f"part{i}.parquet")


def exported_mlp(path: Path) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 1))
    posterior = {name: torch.full_like(p, 1e-3) for name, p in model.named_parameters()}
    cm = mp.compile(model, posterior, (torch.randn(4, FEATURES),), likelihood="regression", sigma_noise=0.1)
    return cm.to_onnx(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per actor")
    args = parser.parse_args()
    import ray

    columns = [f"x{j}" for j in range(FEATURES)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_dataset(tmp / "data", args.rows)
        path = exported_mlp(tmp / "mlp.onnx")
        t0 = time.perf_counter()
        rows = predict_table(path, tmp / "data", tmp / "one.parquet", columns=columns, keep=["id"],
                             threads=args.actors * args.threads, progress=False)
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray.init(num_cpus=args.actors * args.threads + 1, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        started = time.perf_counter() - t0
        t0 = time.perf_counter()
        dataset = ray.data.read_parquet(str(tmp / "data"), override_num_blocks=4 * args.actors)
        score_with_ray(path, dataset, columns, ["id"], actors=args.actors,
                       threads_per_actor=args.threads).write_parquet(str(tmp / "ray"))
        on_ray = time.perf_counter() - t0
        ray.shutdown()
        assert pq.read_table(tmp / "ray").num_rows == rows
    print(f"{rows:,} rows, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, python {sys.version.split()[0]}")
    print(f"one process ({args.actors * args.threads} ORT threads): {one:.1f} s, {rows / one:,.0f} rows/s")
    print(f"Ray Data ({args.actors} actors x {args.threads} thread): {on_ray:.1f} s, {rows / on_ray:,.0f} rows/s "
          f"(cluster start {started:.1f} s not included); ratio {one / on_ray:.2f}x the one process's throughput")


if __name__ == "__main__":
    main()
