"""Latency and memory of a momentprop-compiled laplace-torch posterior against laplace-torch's own predictives.

One MLP 784-128-128-10 (ReLU), trained briefly (a few epochs of Adam on 512 random points labelled by a random
linear teacher), then an all-weights laplace-torch posterior fitted on the same 512 points for
``hessian_structure`` "diag" and "kron" (BackPack GGN backend, prior precision 1e3).  For each structure the
same fitted ``Laplace`` object is

* compiled with ``momentprop.compile(model, la)`` into one ONNX graph (classification head: probit), run with
  ONNX Runtime, and compared at batch 32 and 256 with
* (a) laplace-torch's linearised predictive, ``la(x, pred_type="glm", link_approx="probit")``
  (target at batch 256: compiled >= 100x faster), and
* (b) its sampling predictive, ``la(x, pred_type="nn", link_approx="mc", n_samples=100)``, under
  ``torch.no_grad()`` (target at batch 256: compiled >= 20x faster).  laplace-torch draws fresh weight samples
  from the posterior inside every call (for kron through the Kronecker eigenbases); that is part of its cost.

Timing follows ``bench_mlp.py``: in one process, for each (structure, batch) the three predictors run once
each as warm-up, then interleaved (compiled, GLM, sampling, compiled, ...) for ``--repeats`` rounds (twice as
many at batch 32), and medians are compared.  The ONNX Runtime session uses bench_mlp's SessionOptions
(``--threads`` intra-op threads, sequential execution, thread-pool spinning off unless ``--spin``); torch uses
the same number of threads.

Peak memory: the extra resident memory (RSS) a predictor touches during one call, measured on its first call
(the warm-up) as ``VmHWM`` after the call minus ``VmRSS`` before it, read from ``/proc/self/status``.  Before
the call the kernel's high-water mark is reset (``echo 5 > /proc/self/clear_refs``) and freed heap memory is
handed back to the kernel (glibc ``malloc_trim(0)``), so memory cached from earlier calls cannot hide new
allocations.  Each (structure, batch) case gets a fresh ONNX Runtime session, so its arena growth counts.
Memory held before the call (model, posterior, session and its initializers) is not counted for any predictor.
``tracemalloc`` is not used: torch and ONNX Runtime allocate outside Python's allocator; nor is
``ru_maxrss``, a lifetime maximum of the process.  Without Linux's ``clear_refs`` the columns read n/a.

The compiled probabilities are compared with the GLM probit ones (max abs difference, printed, not asserted):
they differ by design, since laplace-torch linearises the network in all weights jointly while moment
propagation approximates layer by layer.

Run ``python benchmarks/bench_laplace.py`` (about 2 minutes on 2 cores), ``--quick`` for a smoke run (~30 s).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_mlp import interleaved, make_session, median_ms, quiet_process, session_call

SIZES = (784, 128, 128, 10)
N_TRAIN = 512
PRIOR_PRECISION = 1e3  # moderate uncertainty: probit probabilities between the MAP's and uniform
MC_SAMPLES = 100
STRUCTURES = ("diag", "kron")
TARGETS = {"glm": 100.0, "nn": 20.0}  # compiled speed-up at batch 256
TARGET_BATCH = 256


@dataclass
class Row:
    case: str
    batch: int
    laplace_ms: float
    compiled_ms: float
    speedup: float
    laplace_mib: float | None
    compiled_mib: float | None
    target: str
    ok: bool
    note: str = ""


# ---------------------------------------------------------------------------------------- model, posterior


def make_mlp(seed: int = 0, sizes: Sequence[int] = SIZES) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_data(seed: int = 0, sizes: Sequence[int] = SIZES) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN, sizes[0], generator=g)
    teacher = torch.randn(sizes[0], sizes[-1], generator=g)
    return x, (x @ teacher).argmax(1)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 5) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i: i + 64]), y[i: i + 64]).backward()
            opt.step()
    return model.eval()


def fit_laplace(model: nn.Module, x: torch.Tensor, y: torch.Tensor, structure: str):
    import laplace
    from laplace.curvature import BackPackGGN
    from torch.utils.data import DataLoader, TensorDataset

    la = laplace.Laplace(
        model, "classification", subset_of_weights="all", hessian_structure=structure,
        backend=BackPackGGN, prior_precision=PRIOR_PRECISION,
    )
    la.fit(DataLoader(TensorDataset(x, y), batch_size=64))
    return la


def export_compiled(model: nn.Module, la, x: torch.Tensor, path: str, **options) -> str:
    """``momentprop.compile(model, la, example_inputs=(x,), **options)`` written to ``path`` as ONNX."""
    import momentprop as mp

    cm = mp.compile(model, la, example_inputs=(x,), **options)
    return str(cm.to_onnx(path))


# ------------------------------------------------------------------------------------------------ memory


def _status_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS high-water mark (Linux >= 4.0)
        return True
    except OSError:
        return False


try:
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
    _malloc_trim = None


def memory_supported() -> bool:
    return os.path.exists("/proc/self/status") and _reset_peak()


def with_memory(fn: Callable[[], object], into: dict, key: str) -> Callable[[], object]:
    """``fn`` whose first call records into ``into[key]`` its peak extra RSS in MiB (None where unsupported).
    Later calls add no overhead beyond one flag check."""
    done = False

    def run():
        nonlocal done
        if done:
            return fn()
        done = True
        if _malloc_trim is not None:
            _malloc_trim(0)
        before = _status_kib()["VmRSS"] if memory_supported() else None
        result = fn()
        into[key] = None if before is None else (_status_kib()["VmHWM"] - before) / 1024
        return result

    return run


# ------------------------------------------------------------------------------------------- predictors


def compiled_probs(session) -> Callable[[np.ndarray], np.ndarray]:
    index = [o.name for o in session.get_outputs()].index("probs")
    return lambda x: session.run(None, {session.get_inputs()[0].name: x})[index]


def glm_call(la, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: la(x, pred_type="glm", link_approx="probit")


def nn_call(la, x: torch.Tensor, n_samples: int) -> Callable[[], torch.Tensor]:
    def run():
        with torch.no_grad():
            return la(x, pred_type="nn", link_approx="mc", n_samples=n_samples)

    return run


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (and torch threads)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved rounds at batch 256, twice as many at batch 32 (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="batch 32 only, 2 rounds and 10 samples, for a smoke run")
    parser.add_argument("--spin", action="store_true", help="let ONNX Runtime thread pools spin (off by default)")
    parser.add_argument("--keep", metavar="DIR", default=None,
                        help="write the ONNX files to DIR instead of a temporary directory")
    return parser.parse_args(argv)


def _mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def format_table(rows: Sequence[Row]) -> str:
    head = (f"{'case':<22} {'batch':>5} {'laplace ms':>11} {'compiled ms':>12} {'speed-up':>9} {'laplace MiB':>12} "
            f"{'compiled MiB':>13} {'target':>8}  {'result':<6} note")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.case:<22} {r.batch:>5} {r.laplace_ms:>11.1f} {r.compiled_ms:>12.3f} {r.speedup:>8.0f}x "
            f"{_mib(r.laplace_mib):>12} {_mib(r.compiled_mib):>13} {r.target:>8}  "
            f"{'pass' if r.ok else 'FAIL':<6} {r.note}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    n_samples = 10 if args.quick else MC_SAMPLES
    batches = (32,) if args.quick else (32, TARGET_BATCH)
    quiet_process(args.threads)
    from importlib.metadata import version

    import onnxruntime as ort

    start = time.perf_counter()
    load_start = load_average()
    x_train, y_train = make_data()
    model = train(make_mlp(), x_train, y_train)
    example = x_train[:2]
    rows: list[Row] = []
    setup_s = 0.0
    sizes: dict[str, int] = {}
    session_mib: dict[str, float | None] = {}

    with tempfile.TemporaryDirectory(prefix="momentprop-bench-") as tmp:
        out_dir = args.keep or tmp
        os.makedirs(out_dir, exist_ok=True)
        for structure in STRUCTURES:
            t0 = time.perf_counter()
            la = fit_laplace(model, x_train, y_train, structure)
            path = export_compiled(model, la, example, os.path.join(out_dir, f"laplace_{structure}.onnx"))
            sizes[structure] = os.path.getsize(path)
            setup_s += time.perf_counter() - t0

            for batch in batches:
                xt = torch.randn(batch, SIZES[0], generator=torch.Generator().manual_seed(batch))
                held: dict[str, float | None] = {}  # a fresh session per batch, so that its arena growth is measured
                session = with_memory(lambda: make_session(path, args.threads, args.spin), held, "session")()
                session_mib.setdefault(structure, held["session"])
                mem: dict[str, float | None] = {}
                outs: dict[str, object] = {}

                def keep(key: str, fn: Callable[[], object]) -> Callable[[], object]:
                    def run():
                        outs[key] = fn()
                        return outs[key]

                    return run

                fns = [
                    with_memory(session_call(session, xt.numpy()), mem, "compiled"),
                    with_memory(keep("glm", glm_call(la, xt)), mem, "glm"),
                    with_memory(keep("nn", nn_call(la, xt, n_samples)), mem, "nn"),
                ]
                n = repeats * (2 if batch < TARGET_BATCH else 1)
                t_comp, t_glm, t_nn = interleaved(fns, n, warmup=1)
                probs = compiled_probs(session)(xt.numpy())
                glm_probs, nn_probs = outs["glm"].numpy(), outs["nn"].numpy()
                for kind, times, reference in (("glm", t_glm, glm_probs), ("nn", t_nn, nn_probs)):
                    speedup = median_ms(times) / median_ms(t_comp)
                    target_applies = batch == TARGET_BATCH and (kind == "glm" or n_samples == MC_SAMPLES)
                    label = "GLM probit" if kind == "glm" else f"NN MC-{n_samples}"
                    rows.append(
                        Row(
                            f"{structure}: {label}", batch, median_ms(times), median_ms(t_comp), speedup,
                            mem.get(kind), mem.get("compiled"),
                            f">= {TARGETS[kind]:g}x" if target_applies else "-",
                            speedup >= TARGETS[kind] if target_applies else True,
                            f"max|p_compiled - p_{kind}| {np.abs(probs - reference).max():.4f}, n={n}",
                        )
                    )
                del session
            del la

    print(
        f"momentprop laplace-torch benchmark: MLP {'-'.join(map(str, SIZES))} ReLU, all-weights Laplace "
        f"(BackPack GGN, prior precision {PRIOR_PRECISION:g}, fitted on {N_TRAIN} points), laplace-torch "
        f"{version('laplace-torch')}, onnxruntime {ort.__version__}, torch {torch.__version__}, "
        f"threads={args.threads}, spinning={'on' if args.spin else 'off'}, cpu count={os.cpu_count()}"
    )
    print("speed-up = median laplace-torch / median compiled ONNX over interleaved runs (pass/fail uses it; target "
          f"at batch {TARGET_BATCH}).\nMiB = extra peak RSS during a predictor's first call (VmHWM after minus VmRSS "
          "before, high-water mark reset and malloc_trim before the call; fresh ORT session per row pair).\n"
          "note: max abs difference of class probabilities, compiled vs laplace-torch (differ by design; not "
          "asserted). ONNX files: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items())
          + "; creating an ORT session "
          "adds (not counted above) " + ", ".join(f"{k} {_mib(v)} MiB" for k, v in session_mib.items()) + " RSS.")
    if args.quick:
        print(f"(--quick: batch 32 only, {2 * repeats} rounds, {n_samples} samples; figures are a smoke test, "
              "not a measurement)")
    print(format_table(rows))
    print(f"setup (fit + compile + export) {setup_s:.1f} s, total {time.perf_counter() - start:.1f} s; "
          + load_note(load_start, args.threads))
    return rows


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def load_note(load_start: float, threads: int) -> str:
    """The 1-minute load average at start and now, plus a warning line when other processes used the CPUs."""
    load_end = load_average()
    note = f"1-min load average {load_start:.1f} at start, {load_end:.1f} at end"
    if max(load_start, load_end - threads) > max(1.0, 0.5 * (os.cpu_count() or 1)):
        # the load at the end includes this benchmark's own threads
        note += ("\nwarning: other processes were using the CPUs; torch's thread pool suffers most from that (many "
                 "short parallel regions wait for a descheduled thread), so laplace-torch times and speed-ups are "
                 "inflated")
    return note


if __name__ == "__main__":
    main()
    sys.exit(0)
