"""`convert`: ORT format round trip, fp16 and int8 variants measured against the float32 file on fixed data.

Oracle: ONNX Runtime on the float32 file (itself tested against torch in test_onnx.py). Errors are relative L2 norms
over the whole output array, ||converted - fp32|| / ||fp32||; run with -s to see the measured figures."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import momentprop as mp
from oracles import make_mlp, random_posterior
from momentprop.conversion import branches, convert, op_counts
from momentprop.onnx_runner import OnnxRunner

X = np.random.default_rng(0).standard_normal((512, 16)).astype(np.float32)
# (precision, mean only) -> largest relative L2 error allowed per output; the measured figures are printed
# measured (torch 2.13, onnxruntime 1.32): fp16 mean 2.4e-4, variance 2.3e-3 (ReLU derivatives flip where a
# float16 pre-activation mean crosses zero), probs 2.5e-5; int8 mean 9.4e-3, variance 1.16e-2, probs 1.0e-3;
# int8 mean branch only: mean 9.4e-3, variance 1.13e-2, probs 1.0e-3 (the variance error comes from the mean)
THRESHOLDS = {
    ("fp16", False): {"mean": 1e-3, "variance": 5e-3, "probs": 1e-3},
    ("int8", False): {"mean": 3e-2, "variance": 3e-2, "probs": 1e-2},
    ("int8", True): {"mean": 3e-2, "variance": 3e-2, "probs": 1e-2},
}


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """A 16-64-64-5 ReLU classifier, every weight random."""
    model = make_mlp([16, 64, 64, 5])
    cm = mp.compile(model, random_posterior(model, 1e-3), (torch.randn(4, 16),), likelihood="classification",
                    covariance="diag")
    return cm.to_onnx(tmp_path_factory.mktemp("convert") / "fp32.onnx")


def run_plain(path, x=X) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x})))


def relative_errors(out, ref) -> dict[str, float]:
    return {k: float(np.linalg.norm(out[k] - ref[k]) / np.linalg.norm(ref[k])) for k in ref}


@pytest.mark.parametrize("precision, mean_only", list(THRESHOLDS))
def test_reduced_precision_error_against_fp32(fp32, tmp_path, precision, mean_only):
    path = convert(fp32, tmp_path / "m.onnx", precision=precision, quantize_mean_only=mean_only)
    out, ref = run_plain(path), run_plain(fp32)
    errors = relative_errors(out, ref)
    print(f"\n{precision}{' mean-only' if mean_only else ''}: relative L2 error {errors}, "
          f"size {path.stat().st_size} vs {fp32.stat().st_size} bytes")
    for name, limit in THRESHOLDS[precision, mean_only].items():
        assert errors[name] < limit, (name, errors)
    assert (out["variance"] >= 0).all() and np.isfinite(out["variance"]).all()
    assert OnnxRunner(path).precision == ("int8-mean" if mean_only else precision)
    ops, before = op_counts(onnx.load(str(path))), op_counts(onnx.load(str(fp32)))
    if precision == "int8":  # 3 mean products (Gemm), 5 variance products (one in the first layer: x is exact)
        quantised = ops["MatMulInteger"] + ops["com.microsoft::DynamicQuantizeMatMul"]
        expected = before["Gemm"] if mean_only else before["Gemm"] + before["MatMul"]
        assert quantised == expected == (3 if mean_only else 8)


def test_fp16_keeps_tiny_variances(tmp_path):
    """Weight variances of 1e-10 give output variances around 1e-9, below float16's smallest normal number:
    they must come through at float32 accuracy."""
    model = make_mlp([16, 32, 5], torch.nn.Tanh)
    cm = mp.compile(model, random_posterior(model, 1e-10), (torch.randn(4, 16),), likelihood="classification",
                    covariance="diag")
    fp32 = cm.to_onnx(tmp_path / "tiny.onnx")
    ref = run_plain(fp32)
    assert ref["variance"].max() < 1e-8
    out = run_plain(convert(fp32, tmp_path / "tiny16.onnx", precision="fp16"))
    errors = relative_errors(out, ref)
    print(f"\nfp16, variances ~1e-9: relative L2 error {errors}")
    assert errors["variance"] < 1e-3 and (out["variance"] > 0).all()


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_ort_format_round_trip(fp32, tmp_path, precision):
    onnx_file = convert(fp32, tmp_path / "m.onnx", precision=precision)
    ort_file = convert(fp32, tmp_path / "m.ort", format="ort", precision=precision)
    assert ort_file.read_bytes()[4:8] == b"ORTM"
    runner = OnnxRunner(ort_file)
    assert runner.model_card == {**OnnxRunner(fp32).model_card, "precision": precision}
    out, ref = runner(X), run_plain(onnx_file)
    for name in ref:
        np.testing.assert_allclose(out[name], ref[name], rtol=1e-5, atol=1e-6)


def test_mean_branch_is_what_the_mean_depends_on(fp32):
    model = onnx.load(str(fp32))
    split = branches(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert sorted(ops[n] for n in split["mean"]) == ["Gemm"] * 3 + ["Relu"] * 2
    produced_by_variance = {o for n in model.graph.node if n.name in split["variance_only"] for o in n.output}
    assert not any(i in produced_by_variance for n in model.graph.node if n.name in split["mean"] for i in n.input)
    # the mean branch alone, cut out by onnx's own extractor, reproduces the mean
    sub = onnx.utils.Extractor(model).extract_model(["input"], ["mean"])
    assert len(sub.graph.node) == len(split["mean"])


def test_convert_errors(fp32, tmp_path):
    with pytest.raises(mp.InputError, match="int8.* only"):
        convert(fp32, tmp_path / "a.onnx", precision="fp16", quantize_mean_only=True)
    with pytest.raises(mp.InputError, match="precision must be one of"):
        convert(fp32, tmp_path / "a.onnx", precision="bf16")
    with pytest.raises(mp.InputError, match="already converted"):
        convert(convert(fp32, tmp_path / "b.onnx", precision="int8"), tmp_path / "c.onnx", precision="fp16")
    with pytest.raises(mp.PersistenceError, match="ORT-format"):
        convert(convert(fp32, tmp_path / "d.ort", format="ort"), tmp_path / "e.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00\xffjunk")
    with pytest.raises(mp.PersistenceError):
        convert(tmp_path / "junk.onnx", tmp_path / "f.onnx")


def test_int8_variance_branch_keeps_the_mean_bit_exact(fp32, tmp_path):
    """--quantize-variance-only: the 5 variance products in int8, the 3 mean products untouched."""
    path = convert(fp32, tmp_path / "v.onnx", precision="int8", quantize_variance_only=True)
    out, ref = run_plain(path), run_plain(fp32)
    np.testing.assert_array_equal(out["mean"], ref["mean"])
    errors = relative_errors(out, ref)
    assert errors["variance"] < 2e-2 and errors["probs"] < 5e-3, errors
    assert (out["variance"] >= 0).all()
    assert OnnxRunner(path).precision == "int8-variance"
    ops = op_counts(onnx.load(str(path)))
    assert ops["MatMulInteger"] + ops["com.microsoft::DynamicQuantizeMatMul"] == 5
    with pytest.raises(mp.InputError, match="exclude each other"):
        convert(fp32, tmp_path / "w.onnx", precision="int8", quantize_mean_only=True, quantize_variance_only=True)
