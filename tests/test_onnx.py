"""The emitted ONNX file: ONNX Runtime equals torch at any batch size, outputs are named, the model card is there."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import momentprop as mp
from oracles import make_mlp, random_posterior


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 32), nn.BatchNorm1d(32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 16), nn.SiLU(),
        nn.Linear(16, 5),
    ).eval()


@pytest.mark.parametrize(
    "covariance, output_covariance, example_batch",
    [("diag", False, 1), ("diag", True, 5), ("full", False, 3)],
)
def test_onnx_runtime_equals_torch_at_any_batch(tmp_path, covariance, output_covariance, example_batch):
    model = _model()
    example = torch.randn(example_batch, 3, 4)
    cm = mp.compile(model, random_posterior(model, 1e-2), (example,), covariance=covariance,
                    likelihood="classification", output_covariance=output_covariance)
    runner = mp.OnnxRunner(cm.to_onnx(tmp_path / "m.onnx"))
    second = "variance" if covariance == "diag" and not output_covariance else "covariance"
    assert runner.output_names == ["mean", second, "probs"]
    assert runner.input_names == ["input"]
    for batch in (1, 7, 256):
        x = torch.randn(batch, 3, 4)
        mean, var = cm(x)
        out = runner(x)
        np.testing.assert_allclose(out["mean"], mean.numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out[second], var.numpy(), rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(out["probs"], cm.predict(x).numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(out["mean"], model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("covariance", ["diag", pytest.param("full", marks=pytest.mark.slow)])
def test_moment_matched_activations_export(tmp_path, covariance):
    """The moment-matched rules (closed forms and quadrature) in ONNX Runtime equal torch at other batch sizes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU6(),
                          nn.Linear(16, 3)).eval()
    cm = mp.compile(model, random_posterior(model, 1e-1), torch.randn(2, 6), covariance=covariance,
                    activations="moment_matched")
    runner = mp.OnnxRunner(cm.to_onnx(tmp_path / "m.onnx"))
    assert runner.model_card["activations"] == "moment_matched"
    for batch in (1, 9):
        x = torch.randn(batch, 6)
        mean, var = cm(x)
        out = runner(x)
        np.testing.assert_allclose(out["mean"], mean.numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out[runner.output_names[1]], var.numpy(), rtol=1e-4, atol=1e-9)
    assert not torch.allclose(mean, model(x))  # the mean is corrected


def test_regression_file_carries_the_noise(tmp_path):
    model = make_mlp([4, 16, 2])
    cm = mp.compile(model, 1e-3, (torch.randn(3, 4),), likelihood="regression", sigma_noise=0.5, covariance="diag")
    out = mp.OnnxRunner(cm.to_onnx(tmp_path / "r.onnx"))(torch.randn(6, 4))
    np.testing.assert_allclose(out["predictive_variance"], out["variance"] + 0.25, rtol=1e-6)


def test_model_card_and_full_check(tmp_path):
    model = make_mlp([4, 8, 3])
    post = random_posterior(model, names={"2.weight", "2.bias"})
    cm = mp.compile(model, post, (torch.randn(2, 4),), likelihood="classification", variance_scale=1.7,
                    covariance="diag")
    path = cm.to_onnx(tmp_path / "sub" / "card.onnx")
    assert path.exists()
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    card = {p.key: p.value for p in proto.metadata_props}
    assert card["momentprop.covariance"] == "diag"
    assert card["momentprop.likelihood"] == "classification"
    assert json.loads(card["momentprop.random_parameters"]) == ["2.weight", "2.bias"]
    assert json.loads(card["momentprop.variance_scale"]) == pytest.approx(1.7)
    assert card["momentprop.version"] == mp.__version__
    assert "linearisation" in card["momentprop.method"]


# ONNX Runtime-based servers (Triton's onnxruntime backend, KServe's ONNX runtime) load any file ONNX Runtime loads;
# what they cannot take is a contrib or custom op domain. Opset 21 is the newest those backends' ONNX Runtime
# releases (1.19+) all implement.
NEWEST_SERVED_OPSET = 21


@pytest.mark.parametrize("case", ["mlp-classification", "mlp-regression-full",
                                  pytest.param("cnn", marks=pytest.mark.slow),
                                  pytest.param("attention", marks=pytest.mark.slow)])
def test_exported_graphs_use_standard_onnx_ops_only(tmp_path, case):
    from oracles import cnn_input, make_cnn

    if case == "cnn":
        model, x, options = make_cnn("resnet"), cnn_input("resnet", 2), {}
    elif case == "attention":
        model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
        x, options = torch.randn(2, 5, 8), {}
    else:
        model, x = make_mlp([6, 16, 3], nn.Tanh), torch.randn(2, 6)
        options = ({"likelihood": "classification"} if case == "mlp-classification" else
                   {"likelihood": "regression", "sigma_noise": 0.1, "covariance": "full"})
    cm = mp.compile(model, random_posterior(model, 1e-4), (x,), **options)
    exported = onnx.load(cm.to_onnx(tmp_path / "m.onnx"))
    assert [(o.domain, o.version) for o in exported.opset_import] == [("", exported.opset_import[0].version)]
    assert exported.opset_import[0].version <= NEWEST_SERVED_OPSET
    assert not exported.functions
    for node in exported.graph.node:
        assert node.domain in ("", "ai.onnx"), (node.op_type, node.domain)
        onnx.defs.get_schema(node.op_type, exported.opset_import[0].version, "")  # raises for a non-standard op
