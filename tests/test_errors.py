"""Bad input: a clear error of type MomentpropError that says what to do, and nothing of the user's changed."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import momentprop as mp
from oracles import make_mlp


@pytest.fixture
def model():
    return make_mlp([6, 8, 3])


@pytest.fixture
def x():
    return torch.randn(4, 6)


@pytest.mark.parametrize(
    "posterior, match",
    [
        ({"3.weight": torch.ones(3, 8)}, "names no parameter"),
        ({"0.weight": torch.ones(8, 5)}, r"shape \(8, 5\) but the parameter has shape \(8, 6\)"),
        (torch.ones(10), "one entry per trainable parameter entry"),
        ({"0.bias": -torch.ones(8)}, "negative"),
        ({"0.bias": torch.full((8,), math.nan)}, "NaN or infinite"),
        ({"0.bias": torch.full((8,), math.inf)}, "NaN or infinite"),
        (-1.0, "negative"),
        ("diag", "cannot read a posterior"),
        ({"0.bias": "1e-3"}, r"posterior entry '0.bias' is str"),
        ({"0.bias": None}, r"posterior entry '0.bias' is NoneType"),
        ({"0.bias": torch.ones(8, dtype=torch.complex64)}, r"variance for '0.bias' has dtype torch.complex64"),
        ({"0.bias": torch.ones(8, dtype=torch.bool)}, r"variance for '0.bias' has dtype torch.bool"),
        ({"0.bias": [1.0, "a"]}, r"posterior entry '0.bias' \(list\) is not a tensor of numbers"),
        ({}, r"posterior is empty(?s:.*)input_variance=True"),
    ],
)
def test_bad_posterior(model, x, posterior, match):
    with pytest.raises(mp.PosteriorError, match=match):
        mp.compile(model, posterior, (x,))


@pytest.mark.parametrize(
    "example_inputs, match",
    [
        (None, "example_inputs is required"),
        ((), "non-empty tuple"),
        (([1.0, 2.0],), "must be a tensor"),
        ((torch.randn(4, 5),), "calling the model on example_inputs"),
        ((torch.randn(4, 6), torch.randn(4, 6)), "calling the model on example_inputs"),
        ((torch.randn(0, 6),), r"example_inputs\[0\] has batch size 0"),
    ],
)
def test_bad_example_inputs(model, example_inputs, match):
    with pytest.raises(mp.InputError, match=match):
        mp.compile(model, 1e-3, example_inputs)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"covariance": "kron"}, "covariance must be one of"),
        ({"likelihood": "poisson"}, "likelihood must be one of"),
        ({"likelihood": "classification", "sigma_noise": 0.1}, "sigma_noise"),
        ({"variance_scale": 0.0}, "variance_scale"),
        ({"variance_scale": "2"}, r"variance_scale must be a number, got str '2'"),
        ({"likelihood": "regression", "sigma_noise": "0.1"}, r"sigma_noise must be a number, got str '0.1'"),
        ({"variance_scale": None}, r"variance_scale must be a number, got NoneType"),
        ({"variance_scale": True}, r"variance_scale must be a number, got bool"),
    ],
)
def test_bad_options(model, x, options, match):
    with pytest.raises(mp.InputError, match=match):
        mp.compile(model, 1e-3, (x,), **options)


@pytest.mark.parametrize("options", [{"covariance": "full"}, {"output_covariance": True}], ids=["full", "output"])
def test_full_covariance_over_a_vocabulary_sized_output_is_refused_with_advice(options):
    wide = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5000))
    with pytest.raises(mp.InputError, match=r"5,000 features.*module '2'(?s:.*)covariance='diag'"):
        mp.compile(wide, 1e-3, (torch.randn(2, 4),), **options)


class Cumulative(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 3)

    def forward(self, x):
        return torch.logcumsumexp(self.proj(x), dim=-1)


def test_op_without_rule_names_op_module_and_source_line(x):
    with pytest.raises(mp.UnsupportedOpError) as info:
        mp.compile(Cumulative(), 1e-3, (x,))
    message = str(info.value)
    assert "aten.logcumsumexp" in message
    assert "test_errors.py" in message and "torch.logcumsumexp" in message
    assert "momentprop.passes.register" in message


class CumulativeThenHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.logcumsumexp(self.proj(x), dim=-1))


def test_op_without_rule_is_fine_where_nothing_is_random(x):
    model = CumulativeThenHead().eval()
    cm = mp.compile(model, {"head.weight": torch.full((2, 3), 1e-3)}, (x,), covariance="diag")
    mean, var = cm(x)
    torch.testing.assert_close(mean, model(x))
    assert (var > 0).all()


def test_empty_posterior_with_input_variance_is_accepted(model, x):
    """{} with input_variance=True: the inputs are the random part, so the posterior may be empty."""
    cm = mp.compile(model, {}, (x,), input_variance=True, covariance="diag")
    assert (cm(x, torch.full_like(x, 1e-2))[1] > 0).all()


@pytest.mark.parametrize("options", [{"variance_scale": np.float32(2.0)}, {"variance_scale": torch.tensor(2.0)}],
                         ids=["numpy", "tensor"])
def test_numeric_scalars_of_other_types_are_numbers(model, x, options):
    assert mp.compile(model, 1e-3, (x,), **options).variance_scale == 2.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_float_input_of_another_precision_is_cast(model, x, dtype):
    cm = mp.compile(model, 1e-3, (x,))
    mean, var = cm(x.to(dtype))
    assert mean.dtype == var.dtype == torch.float32
    expected = cm(x.to(dtype).float())
    torch.testing.assert_close(mean, expected[0])
    torch.testing.assert_close(var, expected[1])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_integer_bool_or_complex_input_to_a_float_input_is_refused(model, x, dtype):
    cm = mp.compile(model, 1e-3, (x,))
    with pytest.raises(mp.InputError, match=rf"input 0 \('input'\) has dtype {dtype}; the model was compiled for "
                                            r"torch.float32: pass floating-point values"):
        cm(torch.ones(4, 6, dtype=dtype))


def test_onnx_runner_casts_other_floats_and_refuses_integers_and_bool(model, x, tmp_path):
    cm = mp.compile(model, 1e-3, (x,))
    runner = mp.OnnxRunner(cm.to_onnx(tmp_path / "m.onnx"))
    expected = runner(x.numpy())
    for other in (x.double(), x.double().numpy(), x.half().numpy()):
        out = runner(other)
        for name in expected:
            np.testing.assert_allclose(out[name], runner(np.asarray(other, dtype=np.float32))[name], rtol=1e-6)
    for bad in (np.ones((4, 6), np.int64), torch.ones(4, 6, dtype=torch.int64), np.ones((4, 6), bool)):
        with pytest.raises(mp.InputError, match=r"input 'input' has dtype .*; the file expects float32 "
                                                r"\(tensor\(float\)\): pass floating-point values"):
            runner(bad)


@pytest.mark.parametrize("where", ["missing", "directory"])
def test_load_of_a_missing_file_or_a_directory(tmp_path, where):
    path = tmp_path / "m.mp"
    if where == "directory":
        path.mkdir()
    for load in (mp.load, mp.load_posterior):
        with pytest.raises(mp.PersistenceError, match="no such file" if where == "missing" else "is a directory"):
            load(path)


def test_train_mode_warns_and_leaves_the_flags(x):
    model = make_mlp([6, 8, 3]).train()
    model[1].eval()  # a mixed model: every submodule keeps its own flag
    flags = [m.training for m in model.modules()]
    with pytest.warns(UserWarning, match="in train mode; momentprop compiles it in eval mode"):
        mp.compile(model, 1e-3, (x,))
    assert [m.training for m in model.modules()] == flags


def test_eval_mode_does_not_warn(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        mp.compile(model, 1e-3, (x,))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 3)

    def forward(self, x):
        h = self.proj(x)
        if h.sum() > 0:
            return h
        return -h


def test_model_export_cannot_capture(x):
    with pytest.raises(mp.CaptureError, match="torch.export could not capture DataDependent"):
        mp.compile(DataDependent(), 1e-3, (x,))


def test_not_a_module(x):
    with pytest.raises(mp.InputError, match="torch.nn.Module"):
        mp.compile(lambda t: t, 1e-3, (x,))


def test_wrong_input_at_run_time(model, x):
    cm = mp.compile(model, 1e-3, (x,))
    with pytest.raises(mp.InputError, match="compiled for"):
        cm(torch.randn(4, 7))


def test_errors_share_one_base_class():
    for error in (mp.PosteriorError, mp.InputError, mp.CaptureError, mp.UnsupportedOpError, mp.PersistenceError):
        assert issubclass(error, mp.MomentpropError)


def test_failed_compile_leaves_model_unchanged(x):
    model = Cumulative().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(mp.MomentpropError), pytest.warns(UserWarning, match="train mode"):
        mp.compile(model, 1e-3, (x,))
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
