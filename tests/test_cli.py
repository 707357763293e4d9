"""`momentprop predict | inspect | convert`; oracle: a plain onnxruntime.InferenceSession on the exported file."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

import momentprop as mp
from oracles import make_mlp, random_posterior
from momentprop.cli import main

X = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = make_mlp([5, 16, 2], torch.nn.Tanh)
    cm = mp.compile(model, random_posterior(model, 1e-3, names={"2.weight", "2.bias"}), (torch.randn(3, 5),),
                    likelihood="regression", sigma_noise=0.3, covariance="diag")
    return cm.to_onnx(tmp_path_factory.mktemp("cli") / "reg.onnx")


def expected(path) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": X})))


def test_predict_npy_and_csv_to_npz(exported, tmp_path):
    np.save(tmp_path / "x.npy", X)
    np.savetxt(tmp_path / "x.csv", X, delimiter=",", header="a,b,c,d,e", comments="")
    for source in ("x.npy", "x.csv"):
        assert main(["predict", str(exported), str(tmp_path / source), "-o", str(tmp_path / "out.npz")]) == 0
        out = np.load(tmp_path / "out.npz")
        assert sorted(out.files) == ["mean", "predictive_variance", "variance"]
        for name, value in expected(exported).items():
            np.testing.assert_allclose(out[name], value, rtol=1e-6, atol=1e-7)


def test_predict_prints(exported, tmp_path, capsys):
    np.save(tmp_path / "one.npy", X[0])  # a single example without its batch dimension
    assert main(["predict", str(exported), str(tmp_path / "one.npy")]) == 0
    printed = capsys.readouterr().out
    assert "mean (1, 2):" in printed and "predictive_variance (1, 2):" in printed
    assert f"{expected(exported)['mean'][0, 0]:.6f}"[:7] in printed


def test_inspect(exported, tmp_path, capsys):
    assert main(["inspect", str(exported), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_card"]["likelihood"] == "regression" and info["model_card"]["sigma_noise"] == 0.3
    assert info["random_parameters"] == ["2.weight", "2.bias"]
    assert list(info["outputs"]) == ["mean", "variance", "predictive_variance"]
    assert info["inputs"]["input"]["shape"][1] == 5 and info["ops"]["Gemm"] == 2
    assert info["nodes"]["mean_branch"] + info["nodes"]["variance_only"] == info["nodes"]["total"]
    assert main(["inspect", str(exported)]) == 0
    text = capsys.readouterr().out
    assert "random parameters (2): 2.weight, 2.bias" in text and "likelihood: regression" in text
    assert main(["convert", str(exported), "-o", str(tmp_path / "m.ort")]) == 0
    assert main(["inspect", str(tmp_path / "m.ort")]) == 0
    assert "ort format, fp32" in capsys.readouterr().out


def test_convert_then_predict(exported, tmp_path, capsys):
    target = tmp_path / "small.ort"
    assert main(["convert", str(exported), "-o", str(target), "--precision", "int8", "--quantize-mean-only"]) == 0
    assert "ort format, int8-mean (mean branch int8; variances fp32)" in capsys.readouterr().out
    assert main(["inspect", str(target)]) == 0
    assert "ort format, int8-mean (mean branch int8; variances fp32)" in capsys.readouterr().out
    np.save(tmp_path / "x.npy", X)
    assert main(["predict", str(target), str(tmp_path / "x.npy"), "-o", str(tmp_path / "o.npz")]) == 0
    out, ref = np.load(tmp_path / "o.npz"), expected(exported)
    assert np.linalg.norm(out["mean"] - ref["mean"]) / np.linalg.norm(ref["mean"]) < 3e-2
    assert (out["variance"] >= 0).all()


def test_errors_exit_1_with_a_message(exported, tmp_path, capsys):
    np.save(tmp_path / "wide.npy", np.zeros((2, 7), np.float32))
    (tmp_path / "fake.onnx").write_text("not onnx")
    cases = [
        (["predict", str(exported), str(tmp_path / "wide.npy")], "expects (batch, 5)"),
        (["predict", str(tmp_path / "fake.onnx"), str(tmp_path / "wide.npy")], "cannot load it"),
        (["predict", str(exported), str(tmp_path / "x.txt")], "must be a .npy or .csv"),
        (["inspect", str(tmp_path / "nothing.onnx")], "no such file"),
        (["convert", str(exported), "-o", str(tmp_path / "a.onnx"), "--quantize-mean-only"], "int8"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        assert message in capsys.readouterr().err
    nan = X.copy()
    nan[1, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    assert main(["predict", str(exported), str(tmp_path / "nan.npy"), "--nan", "raise"]) == 1
    assert "rows [1]" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter importing torch
def test_module_entry_point(exported):
    done = subprocess.run(
        [sys.executable, "-m", "momentprop", "inspect", str(exported)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "outputs:" in done.stdout
