"""The demo end to end (few epochs) and the command line entry point."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from momentprop.cli import load_demo

run_demo = load_demo()  # examples/demo.py, as `momentprop demo` finds it


def test_demo_short_run(tmp_path):
    results = run_demo(tmp_path, epochs=10, seed=0, samples=50, progress=False, verbose=False)
    assert (tmp_path / "digits_mlp.onnx").is_file()
    onnx, mc = results["onnx"], results["mc"]
    assert onnx["accuracy"] > 0.8
    assert math.isfinite(onnx["nlpd"])
    assert abs(onnx["nlpd"] - mc["nlpd"]) < 0.5 * mc["nlpd"] + 0.05
    assert results["max_abs_diff_onnx_vs_torch"] < 1e-4


@pytest.mark.slow  # a fresh interpreter importing torch
def test_module_help_exits_zero():
    done = subprocess.run([sys.executable, "-m", "momentprop", "demo", "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--samples" in done.stdout
