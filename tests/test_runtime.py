"""Loading and running exported files: providers, session options, IO binding, named outputs, bad files and inputs.

Oracles: the compiled torch graph (cm(x)) and a plain onnxruntime.InferenceSession on the same file."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import momentprop as mp
from oracles import TokenEmbedding, make_mlp, random_posterior
from momentprop.errors import ProviderError
from momentprop.onnx_runner import OnnxRunner, predict_onnx

X = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = make_mlp([8, 32, 32, 3], torch.nn.Tanh)
    cm = mp.compile(model, random_posterior(model, 1e-3), (torch.randn(4, 8),), likelihood="classification",
                    covariance="diag")
    return cm, cm.to_onnx(tmp_path_factory.mktemp("runtime") / "mlp.onnx")


def plain_session(path) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": X})))


@pytest.mark.parametrize("options", [
    {}, {"threads": 1, "optimization": "disable"}, {"optimization": "basic"}, {"optimization": "extended"},
    {"io_binding": True},
])
def test_options_give_the_plain_session_outputs(exported, options):
    cm, path = exported
    out = OnnxRunner(path, "cpu", **options)(X)
    expected = plain_session(path)
    assert list(out) == ["mean", "variance", "probs"]
    for name in expected:
        np.testing.assert_allclose(out[name], expected[name], rtol=1e-5, atol=1e-7)
    mean, var = cm(torch.from_numpy(X))
    np.testing.assert_allclose(out["mean"], mean.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["variance"], var.numpy(), rtol=1e-4, atol=1e-9)


def test_one_call_predict_and_model_card(exported):
    cm, path = exported
    out = predict_onnx(path, torch.from_numpy(X).double(), provider="cpu", threads=1)  # float64 is cast
    np.testing.assert_allclose(out["probs"], cm.predict(torch.from_numpy(X)).numpy(), rtol=1e-4, atol=1e-7)
    runner = OnnxRunner(path)
    assert runner.model_card["likelihood"] == "classification"
    assert runner.model_card["random_parameters"] == cm.random_parameters
    assert runner.precision == "fp32" and runner.providers == ["CPUExecutionProvider"]


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_cuda_without_onnxruntime_gpu_says_what_to_install(exported):
    with pytest.raises(ProviderError, match="onnxruntime-gpu"):
        OnnxRunner(exported[1], "cuda")
    with pytest.raises(mp.InputError, match="provider must be one of"):
        OnnxRunner(exported[1], "tpu")


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs onnxruntime-gpu")
def test_cuda_with_io_binding_equals_cpu(exported):
    path = exported[1]
    gpu = OnnxRunner(path, "cuda")
    assert gpu.io_binding
    expected = plain_session(path)
    for x in (X, torch.from_numpy(X).cuda() if torch.cuda.is_available() else X):
        out = gpu(x)
        for name in expected:
            np.testing.assert_allclose(out[name], expected[name], rtol=1e-3, atol=1e-6)


def test_bad_files(exported, tmp_path):
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("this is not a model")
    with pytest.raises(mp.PersistenceError, match="cannot load it"):
        OnnxRunner(not_onnx)
    with pytest.raises(mp.PersistenceError, match="no such file"):
        OnnxRunner(tmp_path / "missing.onnx")
    foreign = onnx.load(str(exported[1]))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    with pytest.raises(mp.PersistenceError, match="no momentprop model card"):
        OnnxRunner(tmp_path / "foreign.onnx")
    out = OnnxRunner(tmp_path / "foreign.onnx", require_card=False)(X)
    np.testing.assert_allclose(out["mean"], plain_session(exported[1])["mean"], rtol=1e-6)


def test_bad_inputs(exported):
    runner = OnnxRunner(exported[1])
    for bad, message in [
        (X[:, :7], r"shape \(16, 7\); the file expects \(batch, 8\)"),
        (X[0], r"shape \(8,\)"),
        (X[None], r"shape \(1, 16, 8\)"),
        (np.full((2, 8), "a"), "dtype <U1; the file expects float32"),
    ]:
        with pytest.raises(mp.InputError, match=message):
            runner(bad)
    with pytest.raises(mp.InputError, match="takes 1 input"):
        runner(X, X)


def test_integer_inputs_refuse_floats(tmp_path):
    model = TokenEmbedding()
    cm = mp.compile(model, 1e-3, (torch.randint(0, 10, (3, 5)),))
    runner = OnnxRunner(cm.to_onnx(tmp_path / "tokens.onnx"))
    ids = np.random.default_rng(1).integers(0, 10, (4, 7))
    expected = cm(torch.from_numpy(ids))[1].numpy()
    np.testing.assert_allclose(runner(ids.astype(np.int32))["variance"], expected, rtol=1e-6)
    with pytest.raises(mp.InputError, match="integer ids"):
        runner(ids.astype(np.float32))


def test_nan_inputs_propagate_to_their_rows_or_raise(exported):
    path = exported[1]
    clean = plain_session(path)
    x = X.copy()
    x[[3, 9], 2] = np.nan
    out = OnnxRunner(path)(x)
    finite = np.ones(len(x), bool)
    finite[[3, 9]] = False
    for name, value in out.items():
        assert np.isnan(value[~finite]).all(), name
        np.testing.assert_allclose(value[finite], clean[name][finite], rtol=1e-6, atol=1e-9)
    with pytest.raises(mp.InputError, match=r"rows \[3, 9\]"):
        OnnxRunner(path, nan="raise")(x)
