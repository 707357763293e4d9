"""Bad input: a clear error of type MomentpropError that says what to do, and nothing of the user's changed."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import momentprop as mp
from conftest import make_mlp


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
        return torch.cumsum(self.proj(x), dim=-1)


def test_op_without_rule_names_op_module_and_source_line(x):
    with pytest.raises(mp.UnsupportedOpError) as info:
        mp.compile(Cumulative(), 1e-3, (x,))
    message = str(info.value)
    assert "aten.cumsum" in message
    assert "test_errors.py" in message and "torch.cumsum" in message
    assert "momentprop.passes.register" in message


def test_op_without_rule_is_fine_where_nothing_is_random(x):
    model = Cumulative()
    cm = mp.compile(model, {}, (x,))
    torch.testing.assert_close(cm(x)[0], model(x))


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
    for error in (mp.PosteriorError, mp.InputError, mp.CaptureError, mp.UnsupportedOpError):
        assert issubclass(error, mp.MomentpropError)


def test_failed_compile_leaves_model_unchanged(x):
    model = Cumulative().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(mp.MomentpropError):
        mp.compile(model, 1e-3, (x,))
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
