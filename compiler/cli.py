"""Command line: ``momentprop demo`` (also ``python -m momentprop demo``)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        if min(args.epochs, args.samples, args.threads) < 1:
            print("momentprop demo: --epochs, --samples and --threads must be at least 1", file=sys.stderr)
            return 2
        from .demo import run_demo

        run_demo(args.output_dir, epochs=args.epochs, seed=args.seed, samples=args.samples,
                 progress=not args.no_progress, threads=args.threads)
    return 0
