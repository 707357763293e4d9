"""The runtime-only install (`pip install momentprop`: onnxruntime, onnx, numpy): OnnxRunner and the CLI run an
exported file in a fresh interpreter where torch, onnxscript and safetensors cannot be imported; the oracle is a
plain onnxruntime.InferenceSession on the same file."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch

import momentprop as mp
from oracles import make_mlp, random_posterior

BLOCK_COMPILER = "import sys\nfor _name in ('torch', 'onnxscript', 'safetensors'):\n    sys.modules[_name] = None\n"


def run_without_torch(code: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", BLOCK_COMPILER + textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runtime_only")
    model = make_mlp([5, 16, 3], torch.nn.Tanh)
    cm = mp.compile(model, random_posterior(model, 1e-3), (torch.randn(3, 5),), likelihood="classification")
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    np.save(folder / "x.npy", x)
    path = cm.to_onnx(folder / "clf.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.savez(folder / "expected.npz", **dict(zip([o.name for o in session.get_outputs()],
                                                   session.run(None, {"input": x}))))
    return folder


def test_onnx_runner_and_convert_run_without_torch(exported):
    done = run_without_torch("""
        import json, sys
        import numpy as np
        import momentprop as mp
        folder = sys.argv[1]
        x, expected = np.load(folder + "/x.npy"), np.load(folder + "/expected.npz")
        out = mp.OnnxRunner(folder + "/clf.onnx", threads=1)(x.astype(np.float64))  # floats are cast
        errors = {k: float(np.abs(out[k] - expected[k]).max()) for k in expected.files}
        mp.convert(folder + "/clf.onnx", folder + "/clf.ort")
        ort_probs = mp.predict_onnx(folder + "/clf.ort", x)["probs"]
        refused = {}
        for name, call in {"int input": lambda: mp.OnnxRunner(folder + "/clf.onnx")(x.astype(np.int64)),
                           "compile": lambda: mp.compile(None)}.items():
            try:
                call()
            except (mp.InputError, ImportError) as exc:
                refused[name] = f"{type(exc).__name__}: {exc}"
        print(json.dumps({"errors": errors, "ort": float(np.abs(ort_probs - expected["probs"]).max()),
                          "refused": refused, "torch": sys.modules.get("torch") is not None}))
        """, str(exported))
    result = json.loads(done.stdout)
    assert set(result["errors"]) == {"mean", "covariance", "probs"}  # the default for 3 classes is full
    assert max(result["errors"].values()) < 1e-6 and result["ort"] < 1e-6
    assert result["refused"]["int input"].startswith("InputError: input 'input' has dtype int64")
    assert "pip install 'momentprop[compile]'" in result["refused"]["compile"]
    assert not result["torch"]


def test_cli_runs_without_torch(exported):
    done = run_without_torch("""
        import sys
        from momentprop.cli import main
        folder = sys.argv[1]
        codes = [main(["predict", folder + "/clf.onnx", folder + "/x.npy", "-o", folder + "/out.npz"]),
                 main(["convert", folder + "/clf.onnx", "-o", folder + "/cli.ort", "--precision", "int8"]),
                 main(["inspect", folder + "/cli.ort"])]
        print("codes", codes)
        """, str(exported))
    assert "codes [0, 0, 0]" in done.stdout
    assert "ort format, int8," in done.stdout and "input: tensor(float) [batch, 5]" in done.stdout
    out, expected = np.load(exported / "out.npz"), np.load(exported / "expected.npz")
    for name in expected.files:
        np.testing.assert_allclose(out[name], expected[name], rtol=1e-6, atol=1e-7)


def test_help_imports_no_heavy_package():
    done = run_without_torch("""
        import sys
        from momentprop.cli import build_parser
        build_parser().format_help()
        print(sorted(m for m in ("onnx", "onnxruntime", "numpy") if m in sys.modules))
        """)
    assert done.stdout.strip() == "[]"


def test_predict_into_a_closed_pipe_exits_quietly(exported):
    """`momentprop predict ... | head`: the reader closes the pipe before the output is written."""
    process = subprocess.Popen([sys.executable, "-m", "momentprop", "predict", str(exported / "clf.onnx"),
                                str(exported / "x.npy")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    assert process.wait(timeout=120) == 0
    assert process.stderr.read() == b""


def test_public_names_stay_functions_after_every_submodule_is_imported():
    """Importing ``momentprop.<name>`` sets the package attribute ``<name>``: no submodule may be named like a public
    function, or the lazily loaded function would be shadowed by the module (``mp.convert`` once was)."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(mp.__path__):
        if module.name != "__main__":  # runs the command line
            importlib.import_module(f"momentprop.{module.name}")
    for name in mp.__all__:
        assert not isinstance(getattr(mp, name), type(mp)), name
    assert callable(mp.convert) and callable(mp.load) and callable(mp.compile)
