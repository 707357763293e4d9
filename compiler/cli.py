"""Command line (also ``python -m momentprop``): ``demo``, and for exported files ``predict``, ``inspect``,
``convert``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from .errors import InputError, MomentpropError

if TYPE_CHECKING:
    import numpy as np


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="momentprop",
        description="Compile a PyTorch model and a Gaussian weight posterior into one moment-propagating graph.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        help="train an IVON MLP on scikit-learn digits, export it to ONNX, compare with MAP and Monte Carlo",
        description="Train a 64-128-64-10 MLP with IVON on scikit-learn digits, compile it with its posterior, "
        "write <output-dir>/digits_mlp.onnx and print accuracy, NLPD, ECE and latency of MAP, Monte Carlo and "
        "the compiled ONNX model.",
    )
    demo.add_argument("--output-dir", default="exported", help="folder for digits_mlp.onnx (default: exported)")
    demo.add_argument("--epochs", type=int, default=60, help="IVON training epochs (default: 60)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed for the split, initialisation and sampling (default: 0)")
    demo.add_argument("--samples", type=int, default=100, help="Monte Carlo weight samples (default: 100)")
    demo.add_argument("--threads", type=int, default=1,
                      help="intra-op threads for torch and ONNX Runtime alike (default: 1)")
    demo.add_argument("--no-progress", action="store_true", help="hide the training progress bar")

    predict = commands.add_parser(
        "predict", help="run an exported file on inputs from a .npy, .csv, Parquet or Arrow file",
        description="Run FILE (.onnx or .ort) with ONNX Runtime on INPUT (.npy, or .csv with one example per row, "
        "an optional header line, comma-separated) and print the outputs (mean, variance, probabilities) or save "
        "them to an .npz file. A Parquet or Arrow table (a file or a folder of them; needs pyarrow) is scored in "
        "chunks with a progress bar and its output columns written to -o (.parquet, .arrow or .feather).",
    )
    predict.add_argument("file", help="a file written by cm.to_onnx or momentprop convert")
    predict.add_argument("input", help="inputs: .npy (any shape the file takes), .csv (one row per example), or a "
                         ".parquet/.arrow/.feather table (or a folder of them)")
    predict.add_argument("-o", "--output", help="save the outputs to this .npz file instead of printing them (for a "
                         "table input: the output table, .parquet/.arrow/.feather)")
    predict.add_argument("--columns", help="table input: the feature columns, comma-separated, in the model's order "
                         "(default: every numeric column)")
    predict.add_argument("--keep", default="", help="table input: columns copied to the output (an id, say)")
    predict.add_argument("--rows-per-batch", type=int, default=65_536,
                         help="table input: rows scored at a time (default: 65536)")
    predict.add_argument("--no-progress", action="store_true", help="table input: hide the progress bar")
    predict.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="execution provider (default: cpu)")
    predict.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ONNX Runtime's)")
    predict.add_argument("--nan", default="propagate", choices=["propagate", "raise"],
                         help="NaN/inf inputs: give NaN outputs in their rows (default) or stop with an error")

    inspect = commands.add_parser(
        "inspect", help="show an exported file's model card, inputs, outputs, random parameters and op counts",
        description="Show the model card, inputs, outputs, random parameters and op counts of FILE.",
    )
    inspect.add_argument("file", help="a file written by cm.to_onnx or momentprop convert")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    convert = commands.add_parser(
        "convert", help="convert an exported file: ORT (mobile) format, fp16, int8",
        description="Convert FILE to ONNX Runtime's mobile format and/or a lower precision. fp16: the mean branch in "
        "float16, variances in float32; int8: dynamic quantisation of the matrix products.",
    )
    convert.add_argument("file", help="a float32 .onnx file written by cm.to_onnx")
    convert.add_argument("-o", "--output", required=True, help="the converted file")
    convert.add_argument("--format", choices=["onnx", "ort"], default=None,
                         help="onnx or ort (ONNX Runtime mobile format); default: from the output's suffix")
    convert.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32", help="default: fp32")
    convert.add_argument("--quantize-mean-only", action="store_true",
                         help="with --precision int8: quantise only the mean branch, keep the variances in float32")
    convert.add_argument("--quantize-variance-only", action="store_true",
                         help="with --precision int8: quantise only the variance branch; the mean stays float32, "
                         "bit-exact against the float32 file")
    return parser


def read_inputs(path: str | Path, shape: Sequence[object]) -> np.ndarray:
    """An input array from .npy or .csv, with CSV rows (or a single 1-D example) reshaped to the file's input."""
    import numpy as np

    path = Path(path)
    if path.suffix.lower() == ".npy":
        x = np.load(path, allow_pickle=False)
    elif path.suffix.lower() == ".csv":
        try:
            x = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
        except ValueError:  # a header line
            x = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64, skiprows=1)
    else:
        raise InputError(f"{path}: inputs must be a .npy or .csv file")
    fixed = [d for d in shape[1:] if isinstance(d, int)]
    if len(fixed) == len(shape) - 1 and x.ndim == len(shape) - 1 and x.shape == tuple(fixed):
        x = x[None]  # one example without its batch dimension
    elif x.ndim == 2 and len(shape) > 2 and len(fixed) == len(shape) - 1 and x.shape[1] == int(np.prod(fixed)):
        x = x.reshape(len(x), *fixed)  # CSV rows of flattened examples
    return x


def _predict(args: argparse.Namespace) -> None:
    import numpy as np

    from .batch import predict_table, table_format
    from .onnx_runner import OnnxRunner

    if table_format(args.input):
        if not args.output:
            raise InputError("a table input needs -o OUTPUT (.parquet, .arrow or .feather) for the output columns")
        columns = args.columns.split(",") if args.columns else None
        rows = predict_table(args.file, args.input, args.output, columns=columns,
                             keep=[c for c in args.keep.split(",") if c], rows_per_batch=args.rows_per_batch,
                             threads=args.threads, provider=args.provider, nan=args.nan,
                             progress=not args.no_progress)
        print(f"wrote {args.output}: {rows:,} rows")
        return

    runner = OnnxRunner(args.file, args.provider, args.threads, nan=args.nan)
    outputs = runner(read_inputs(args.input, runner.inputs[0].shape)) if len(runner.inputs) == 1 else None
    if outputs is None:
        raise InputError(f"{args.file} takes {len(runner.inputs)} inputs; use the Python API (momentprop.OnnxRunner)")
    if args.output:
        np.savez(args.output, **outputs)
        shapes = ", ".join(f"{k} {v.shape}" for k, v in outputs.items())
        print(f"wrote {args.output}: {shapes}")
        return
    with np.printoptions(precision=6, suppress=False, threshold=2000, linewidth=120):
        for name, value in outputs.items():
            print(f"{name} {value.shape}:\n{value}")


# how inspect and convert name a file's precision (its model card's "precision")
PRECISION_LABELS = {"fp32": "fp32", "fp16": "fp16 (mean branch; variances fp32)", "int8": "int8",
                    "int8-mean": "int8-mean (mean branch int8; variances fp32)",
                    "int8-variance": "int8-variance (variance branch int8; mean fp32)"}


def precision_label(path: str | Path) -> str:
    from .onnx_runner import OnnxRunner

    return PRECISION_LABELS[OnnxRunner(path).precision]


def describe(path: str | Path) -> dict[str, object]:
    """What ``momentprop inspect`` shows, as a dict."""
    import onnx

    from .conversion import branches, is_ort_format, op_counts
    from .onnx_runner import OnnxRunner

    runner = OnnxRunner(path)
    io = lambda args: {a.name: {"type": a.type, "shape": a.shape} for a in args}  # noqa: E731
    info: dict[str, object] = {
        "file": str(path), "bytes": Path(path).stat().st_size, "precision": runner.precision,
        "model_card": runner.model_card, "inputs": io(runner.session.get_inputs()),
        "outputs": io(runner.session.get_outputs()),
        "random_parameters": runner.model_card.get("random_parameters", []),
    }
    if is_ort_format(path):  # the graph of an ORT-format file is not readable as ONNX
        info.update(format="ort", ops=None)
        return info
    model = onnx.load(str(path))
    split = branches(model)
    info.update(format="onnx", ops=dict(op_counts(model).most_common()),
                nodes={"total": len(model.graph.node), "mean_branch": len(split["mean"]),
                       "variance_only": len(split["variance_only"])})
    return info


def _inspect(args: argparse.Namespace) -> None:
    info = describe(args.file)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return
    print(f"{info['file']}: {info['format']} format, {PRECISION_LABELS[info['precision']]}, {info['bytes']:,} bytes")
    print("model card:")
    for key, value in info["model_card"].items():
        if key != "random_parameters":
            print(f"  {key}: {value}")
    for kind in ("inputs", "outputs"):
        print(f"{kind}:")
        for name, spec in info[kind].items():
            shape = ", ".join(str(d) if isinstance(d, int) else "batch" if i == 0 else "any"
                              for i, d in enumerate(spec["shape"]))
            print(f"  {name}: {spec['type']} [{shape}]")
    params = info["random_parameters"]
    print(f"random parameters ({len(params)}): {', '.join(params) if params else 'none'}")
    if info["ops"] is None:
        print("ops: not readable from an ORT-format file (inspect the .onnx file it was converted from)")
    else:
        nodes = info["nodes"]
        print(f"ops ({nodes['total']} nodes: {nodes['mean_branch']} in the mean branch, {nodes['variance_only']} "
              f"variance-only): " + ", ".join(f"{op} {n}" for op, n in info["ops"].items()))


def _convert(args: argparse.Namespace) -> None:
    from .conversion import convert, is_ort_format

    path = convert(args.file, args.output, format=args.format, precision=args.precision,
                   quantize_mean_only=args.quantize_mean_only, quantize_variance_only=args.quantize_variance_only)
    fmt = "ort" if is_ort_format(path) else "onnx"
    print(f"wrote {path}: {fmt} format, {precision_label(path)}, {path.stat().st_size:,} bytes")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    commands = {"predict": _predict, "inspect": _inspect, "convert": _convert}
    if args.command in commands:
        try:
            commands[args.command](args)
        except BrokenPipeError:  # `momentprop predict ... | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
            return 0
        except (MomentpropError, OSError) as exc:
            print(f"momentprop {args.command}: error: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "demo":
        if min(args.epochs, args.samples, args.threads) < 1:
            print("momentprop demo: --epochs, --samples and --threads must be at least 1", file=sys.stderr)
            return 2
        run_demo = load_demo()
        if run_demo is None:
            print("momentprop demo: the demo ships with the repository (examples/demo.py), not with the package; "
                  "clone the repository and run scripts/demo there", file=sys.stderr)
            return 1
        run_demo(args.output_dir, epochs=args.epochs, seed=args.seed, samples=args.samples,
                 progress=not args.no_progress, threads=args.threads)
    return 0


def load_demo() -> Callable[..., object] | None:
    """``run_demo`` from the checkout's ``examples/demo.py`` (the package is installed from a checkout, editable), or
    None where the package was installed without one."""
    path = Path(__file__).resolve().parents[1] / "examples" / "demo.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("momentprop_examples_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run_demo
