"""Compile cost and latency of momentprop on full-size Hugging Face transformers: GPT-2 (small) and ViT-B/16.

Two models, random weights, built from their configs (no download):

1. ``GPT2LMHeadModel`` at the GPT-2 small size (12 layers, 768 wide, 12 heads, vocabulary 50257, 1024
   positions, ``use_cache=False``, SDPA attention), with a variance of 1e-6 on every weight of the last 2 blocks
   and on the LM head, twice: ``gpt2-untied`` with ``tie_word_embeddings=False`` (only those parameters random),
   and ``gpt2`` with the library's default tied head (``lm_head.weight is transformer.wte.weight``): there the
   posterior names ``transformer.wte.weight``, a tied posterior makes the embedding lookup random too, and the
   variance then flows through *every* block, not only the last two.
   Input: token ids, batch 8 x 128 tokens (batch and sequence length dynamic in both ONNX files).
2. ``ViTForImageClassification`` at the ViT-B/16 size (12 layers, 768 wide, 12 heads, MLP 3072, 224x224 images,
   patch 16, 1000 classes), a variance of 1e-6 on every weight of the last 2 blocks and of the classifier.
   Input: batch 8 of 224x224 RGB images (dynamic batch).

For each model the benchmark reports

* compile time (``momentprop.compile``) and ONNX export time (``CompiledModel.to_onnx``);
* peak extra resident memory of the process during compile + export: ``VmHWM`` after minus ``VmRSS`` before,
  from ``/proc/self/status``, with the kernel's high-water mark reset (``/proc/self/clear_refs``) and freed heap
  returned (``malloc_trim``) just before compiling (the method of ``bench_laplace.py``); where that is not
  available, the growth of ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which only sees growth beyond the
  process's earlier peak;
* the size of the compiled ONNX file (and of the plain model's);
* ONNX Runtime latency of the compiled model divided by that of the plain model, exported with
  ``torch.onnx.export(dynamo=True)`` of a wrapper that returns the logits (target <= 1.5x).

Timing follows ``bench_mlp.py`` (whose helpers it imports): identical SessionOptions for both sessions
(``--threads`` intra-op threads, sequential execution, spinning off unless ``--spin``), one warm-up call each,
then plain and compiled interleaved for ``--repeats`` rounds and medians compared.

Export of a 12-layer model takes minutes on 2 cores; ``--layers N`` builds N-layer models instead (still the
last 2 blocks random) and the output says which depth was used.  ONNX files (~0.5 GB each at 12 layers) go to a
temporary directory that is deleted at the end.

Run ``python benchmarks/bench_transformers.py`` (12 layers; several minutes on 2 cores), ``--quick`` for a smoke
run (4 layers, batch 2, 2 rounds).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_mlp import interleaved, make_session, median_ms, quiet_process

VARIANCE = 1e-6
TARGET = 1.5
RANDOM_BLOCKS = 2


@dataclass
class Row:
    case: str
    layers: int
    input: str
    compile_s: float
    export_s: float
    peak_mib: float | None
    onnx_mib: float
    plain_onnx_mib: float
    plain_ms: float
    compiled_ms: float
    ratio: float
    target: str
    ok: bool
    note: str = ""


# ------------------------------------------------------------------------------------------- models


def make_gpt2(layers: int, tied: bool = True) -> nn.Module:
    import transformers

    config = transformers.GPT2Config(
        n_layer=layers, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024, use_cache=False,
        tie_word_embeddings=tied,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def make_vit(layers: int) -> nn.Module:
    import transformers

    config = transformers.ViTConfig(
        hidden_size=768, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=3072, image_size=224,
        patch_size=16, num_labels=1000,
    )
    torch.manual_seed(1)
    return transformers.ViTForImageClassification(config).eval()


def block_prefixes(model: nn.Module, container: str, layers: int) -> list[str]:
    return [f"{container}.{i}." for i in range(layers - RANDOM_BLOCKS, layers)]


def gpt2_posterior(model: nn.Module, layers: int) -> dict[str, torch.Tensor]:
    prefixes = tuple(block_prefixes(model, "transformer.h", layers))
    tied = model.lm_head.weight is model.transformer.wte.weight  # tied: the LM head's variance lives on wte
    head = "transformer.wte.weight" if tied else "lm_head.weight"
    return {
        n: torch.full_like(p, VARIANCE)
        for n, p in model.named_parameters()
        if n.startswith(prefixes) or n == head
    }


def vit_posterior(model: nn.Module, layers: int) -> dict[str, torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    container = "vit.layers" if any(n.startswith("vit.layers.") for n in names) else "vit.encoder.layer"
    prefixes = tuple(block_prefixes(model, container, layers)) + ("classifier.",)
    return {n: torch.full_like(p, VARIANCE) for n, p in model.named_parameters() if n.startswith(prefixes)}


class Logits(nn.Module):
    """The Hugging Face model's logits only, for the plain ONNX export."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def export_plain(model: nn.Module, x: torch.Tensor, path: str, tokens: bool) -> str:
    dims = {0: torch.export.Dim("batch")}
    if tokens:
        dims[1] = torch.export.Dim("sequence", min=2, max=1024)
    torch.onnx.export(
        Logits(model), (x,), path, dynamo=True, dynamic_shapes=(dims,),
        input_names=["input"], output_names=["logits"], verbose=False,
    )
    return path


# ------------------------------------------------------------------------------------------- memory


def _status_kib() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":")
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


try:
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
    _malloc_trim = None


class PeakRss:
    """Peak extra RSS (MiB) inside the ``with`` block; method in ``.method``."""

    def __enter__(self):
        gc.collect()
        if _malloc_trim is not None:
            _malloc_trim(0)
        self.hwm = _reset_peak() and "VmRSS" in _status_kib()
        self.before = _status_kib()["VmRSS"] if self.hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.method = "VmHWM - VmRSS (clear_refs reset)" if self.hwm else "ru_maxrss growth"
        return self

    def __exit__(self, *exc):
        after = _status_kib()["VmHWM"] if self.hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.mib = (after - self.before) / 1024  # both in KiB on Linux
        return False


# --------------------------------------------------------------------------------------------- case


def onnx_files(path: str) -> list[str]:
    """The ONNX file and its external-data files (``<name>.onnx.data`` and the like), if any."""
    folder, base = os.path.split(path)
    return [os.path.join(folder, f) for f in os.listdir(folder or ".") if f.startswith(base)]


def run_case(name: str, model: nn.Module, posterior: dict, example: torch.Tensor, x: np.ndarray, layers: int,
             tokens: bool, out_dir: str, args, repeats: int, note: str) -> tuple[Row, dict]:
    import momentprop as mp

    plain_path = export_plain(model, example, os.path.join(out_dir, f"{name}_plain.onnx"), tokens)
    gc.collect()
    with PeakRss() as peak:
        t0 = time.perf_counter()
        cm = mp.compile(model, posterior, example_inputs=(example,))
        t1 = time.perf_counter()
        path = str(cm.to_onnx(os.path.join(out_dir, f"{name}_compiled.onnx")))
        t2 = time.perf_counter()
    del cm
    gc.collect()
    files = {"plain": plain_path, "compiled": path}
    sizes = {k: sum(os.path.getsize(f) for f in onnx_files(p)) / 2**20 for k, p in files.items()}

    plain = make_session(plain_path, args.threads, args.spin)
    comp = make_session(path, args.threads, args.spin)
    p_feed = {plain.get_inputs()[0].name: x}
    c_feed = {comp.get_inputs()[0].name: x}
    t_plain, t_comp = interleaved(
        [lambda: plain.run(None, p_feed), lambda: comp.run(None, c_feed)], repeats, warmup=1
    )
    outs = dict(zip([o.name for o in comp.get_outputs()], comp.run(None, c_feed)))
    logits = plain.run(None, p_feed)[0]
    err = float(np.abs(outs["mean"] - logits).max())
    var = outs["variance"]
    ratio = median_ms(t_comp) / median_ms(t_plain)
    shape = "x".join(map(str, x.shape))
    row = Row(
        name, layers, shape, t1 - t0, t2 - t1, peak.mib, sizes["compiled"], sizes["plain"],
        median_ms(t_plain), median_ms(t_comp), ratio, f"<= {TARGET:g}x", ratio <= TARGET,
        f"{note}; max|mean-logits| {err:.1e}, variance median {np.median(var):.2e}, n={repeats}",
    )
    info = {"method": peak.method, "compiled_path": path, "plain_path": plain_path, "feed": x}
    plain = comp = None  # release the sessions before the next model
    gc.collect()
    return row, info


def profile(path: str, x: np.ndarray, threads: int, spin: bool, top: int = 12) -> str:
    """Run the ONNX file once (after one warm-up) with ORT profiling; total time per op type and the top nodes."""
    import json

    import onnxruntime as ort

    from bench_mlp import session_options

    options = session_options(threads, spin)
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(os.path.dirname(path), "profile")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    session.run(None, feed)
    session.run(None, feed)
    trace = session.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    by_op: dict[str, float] = {}
    per_node: dict[str, float] = {}
    for e in nodes[len(nodes) // 2:]:  # second run only (both runs have the same node list)
        op = e.get("args", {}).get("op_name", "?")
        by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e3
        node = e["name"][: -len("_kernel_time")]
        per_node[node] = per_node.get(node, 0.0) + e["dur"] / 1e3
    total = sum(by_op.values())
    lines = [f"  {os.path.basename(path)}: kernel time {total:.0f} ms"]
    by_time = sorted(by_op.items(), key=lambda kv: -kv[1])[:8]
    lines.append("    by op type: " + ", ".join(f"{k} {v:.0f} ms" for k, v in by_time))
    for n, v in sorted(per_node.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {v:8.1f} ms  {n}")
    os.remove(trace)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (and torch threads)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved rounds per model (default 5; 2 with --quick)")
    parser.add_argument("--layers", type=int, default=None,
                        help="transformer depth (default 12; 4 with --quick); last 2 blocks random")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 8; 2 with --quick)")
    parser.add_argument("--tokens", type=int, default=128, help="GPT-2 sequence length (default 128)")
    parser.add_argument("--models", default="gpt2-untied,gpt2,vit",
                        help="comma-separated subset of gpt2-untied,gpt2,vit")
    parser.add_argument("--quick", action="store_true", help="4 layers, batch 2, 2 rounds, for a smoke run")
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                        help="ORT-profile both files of a model whose ratio misses the target (auto), always, or never")
    parser.add_argument("--spin", action="store_true", help="let ONNX Runtime thread pools spin (off by default)")
    parser.add_argument("--keep", metavar="DIR", default=None,
                        help="write the ONNX files to DIR instead of a temporary directory")
    return parser.parse_args(argv)


def _mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def format_table(rows: Sequence[Row]) -> str:
    head = (f"{'case':<10} {'layers':>6} {'input':>11} {'compile s':>9} {'export s':>9} {'peak MiB':>9} "
            f"{'onnx MiB':>9} {'plain MiB':>9} {'plain ms':>9} {'compiled ms':>11} {'ratio':>7} {'target':>8}  "
            f"{'result':<6} note")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.case:<10} {r.layers:>6} {r.input:>11} {r.compile_s:>9.1f} {r.export_s:>9.1f} {_mib(r.peak_mib):>9} "
            f"{r.onnx_mib:>9.0f} {r.plain_onnx_mib:>9.0f} {r.plain_ms:>9.1f} {r.compiled_ms:>11.1f} {r.ratio:>6.2f}x "
            f"{r.target:>8}  {'pass' if r.ok else 'FAIL':<6} {r.note}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    layers = args.layers or (4 if args.quick else 12)
    batch = args.batch or (2 if args.quick else 8)
    repeats = args.repeats or (2 if args.quick else 5)
    if layers < RANDOM_BLOCKS:
        raise SystemExit(f"--layers must be >= {RANDOM_BLOCKS}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    quiet_process(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from importlib.metadata import version

    import onnxruntime as ort
    import transformers

    transformers.logging.set_verbosity_error()

    start = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows: list[Row] = []
    method = ""
    profiles: list[str] = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="momentprop-bench-tf-") as tmp:
        out_dir = args.keep or tmp
        os.makedirs(out_dir, exist_ok=True)
        for name in models:
            if name in ("gpt2", "gpt2-untied"):
                model = make_gpt2(layers, tied=name == "gpt2")
                post = gpt2_posterior(model, layers)
                example = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
                x = rng.integers(0, 50257, (batch, args.tokens), dtype=np.int64)
                note = ("LM head tied to wte: embedding random too, so variance flows through all blocks"
                        if name == "gpt2" else "untied LM head: last 2 blocks + LM head random")
                tokens = True
            elif name == "vit":
                model = make_vit(layers)
                post = vit_posterior(model, layers)
                example = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
                x = rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)
                note = "last 2 blocks + classifier random"
                tokens = False
            else:
                raise SystemExit(f"unknown model {name!r}")
            n_random = sum(v.numel() for v in post.values())
            n_total = sum(p.numel() for p in model.parameters())
            row, info = run_case(
                name, model, post, example, x, layers, tokens, out_dir, args, repeats,
                f"{n_random / 1e6:.1f}M of {n_total / 1e6:.1f}M params random; {note}",
            )
            rows.append(row)
            method = info["method"]
            print(f"[{name}] done at {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            if args.profile == "always" or (args.profile == "auto" and not row.ok):
                for key in ("plain_path", "compiled_path"):
                    profiles.append(profile(info[key], info["feed"], args.threads, args.spin))
            del model, post
            gc.collect()
            if not args.keep:
                for key in ("plain_path", "compiled_path"):
                    for p in onnx_files(info[key]):
                        os.remove(p)

    print(
        f"momentprop transformers benchmark: GPT-2 small size / ViT-B/16 size, random weights, {layers} layers"
        f"{'' if layers == 12 else ' (scaled down from 12 with --layers/--quick)'}, last {RANDOM_BLOCKS} blocks + head "
        f"variance {VARIANCE:g}; transformers {version('transformers')}, onnxruntime {ort.__version__}, "
        f"torch {torch.__version__}, threads={args.threads}, spinning={'on' if args.spin else 'off'}, "
        f"cpu count={os.cpu_count()}"
    )
    print("ratio = median compiled / median plain ONNX Runtime latency over interleaved runs (pass/fail uses it). "
          f"peak MiB = extra peak RSS during compile + export ({method}).\n"
          "GPT-2 (tied, the library's default): the posterior names transformer.wte.weight, the LM head's tied "
          "weight; that makes the token embedding random as well, so every block propagates a variance.  "
          "gpt2-untied: the same model with tie_word_embeddings=False, so only the last 2 blocks and the head are "
          "random.")
    if args.quick:
        print(f"(--quick: {layers} layers, batch {batch}, {repeats} rounds; figures are a smoke test, "
              "not a measurement)")
    print(format_table(rows))
    for p in profiles:
        print("ORT profile (one run after a warm-up):\n" + p)
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"total {time.perf_counter() - start:.1f} s; 1-min load average {load_start:.1f} at start, "
          f"{load_end:.1f} at end")
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
