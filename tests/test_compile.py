"""The public API end to end: posterior forms, heads, the model left untouched, the moment graph's cost."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import momentprop as mp
from oracles import make_mlp, random_posterior


def _expected_diag_last_layer(model: nn.Sequential, posterior: dict, x: torch.Tensor) -> torch.Tensor:
    """Only the last linear layer random: Var h_k = sum_i a_i^2 S_ki + s_k with a the deterministic features."""
    features = model[:-1](x).double()
    s_w, s_b = posterior[f"{len(model) - 1}.weight"].double(), posterior[f"{len(model) - 1}.bias"].double()
    return features.pow(2) @ s_w.T + s_b


def test_mean_is_the_plain_forward_pass(mlp, inputs):
    mean, var = mp.compile(mlp, random_posterior(mlp), (inputs,), covariance="diag")(inputs)
    torch.testing.assert_close(mean, mlp(inputs), rtol=0, atol=0)
    assert (var > 0).all()


def test_posterior_forms_agree(mlp, inputs):
    """A dict, the flat vector in parameters() order and a float give the same variance when they agree."""
    as_dict = {n: torch.full_like(p, 2e-3) for n, p in mlp.named_parameters()}
    flat = torch.cat([v.flatten() for v in as_dict.values()])
    results = [mp.compile(mlp, post, (inputs,))(inputs)[1] for post in (as_dict, flat, 2e-3)]
    torch.testing.assert_close(results[0], results[1])
    torch.testing.assert_close(results[0], results[2])


def test_flat_vector_skips_frozen_parameters(inputs):
    model = make_mlp([6, 8, 3])
    model[0].weight.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([torch.full((p.numel(),), 1e-3) for p in trainable])
    cm = mp.compile(model, flat, (inputs,))
    assert "0.weight" not in cm.random_parameters and "0.bias" in cm.random_parameters


def test_last_layer_posterior_matches_closed_form_and_adds_no_upstream_work(inputs):
    model = make_mlp([6, 32, 32, 4])
    post = random_posterior(model, names={"4.weight", "4.bias"})
    cm = mp.compile(model, post, (inputs,), covariance="diag")
    expected = _expected_diag_last_layer(model, post, inputs)
    torch.testing.assert_close(cm(inputs)[1].double(), expected, rtol=1e-5, atol=1e-9)
    products = [n for n in cm.graph.nodes if n.op == "call_function" and n.target in (
        torch.ops.aten.linear.default, torch.ops.aten.matmul.default, torch.ops.aten.mm.default)]
    assert len(products) == 3 + 1, "a last-layer posterior costs the plain pass plus one product"


def test_zero_posterior_variance_gives_zero_variance(mlp, inputs):
    cm = mp.compile(mlp, 0.0, (inputs,), covariance="diag")
    mean, var = cm(inputs)
    torch.testing.assert_close(mean, mlp(inputs))
    assert torch.equal(var, torch.zeros_like(mean))


def test_tied_weights_are_one_random_parameter():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.encode = nn.Linear(4, 4, bias=False)
            self.decode = nn.Linear(4, 4, bias=False)
            self.decode.weight = self.encode.weight

        def forward(self, x):
            return self.decode(torch.tanh(self.encode(x)))

    model = Tied()
    x = torch.randn(3, 4)
    by_alias = mp.compile(model, {"decode.weight": torch.full((4, 4), 1e-3)}, (x,))
    by_name = mp.compile(model, {"encode.weight": torch.full((4, 4), 1e-3)}, (x,))
    assert by_alias.random_parameters == by_name.random_parameters == ["encode.weight"]
    torch.testing.assert_close(by_alias(x)[1], by_name(x)[1])


def test_classification_head_is_probit(mlp, inputs):
    cm = mp.compile(mlp, random_posterior(mlp, 1e-2), (inputs,), likelihood="classification", covariance="diag")
    mean, var = cm(inputs)
    expected = torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * var), dim=-1)
    torch.testing.assert_close(cm.predict(inputs), expected)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_regression_head_adds_observation_noise(mlp, inputs, covariance):
    cm = mp.compile(
        mlp, random_posterior(mlp), (inputs,), covariance=covariance, likelihood="regression", sigma_noise=0.3
    )
    mean, var = cm(inputs)
    pred_mean, pred_var = cm.predict(inputs)
    noise = 0.09 * (torch.eye(4) if covariance == "full" else 1.0)
    torch.testing.assert_close(pred_mean, mean)
    torch.testing.assert_close(pred_var, var + noise)


def test_predict_without_likelihood_says_what_to_do(mlp, inputs):
    with pytest.raises(mp.InputError, match="likelihood"):
        mp.compile(mlp, 1e-3, (inputs,)).predict(inputs)


def test_variance_scale_multiplies_the_variance(mlp, inputs):
    post = random_posterior(mlp)
    base = mp.compile(mlp, post, (inputs,))(inputs)[1]
    scaled = mp.compile(mlp, post, (inputs,), variance_scale=2.5)(inputs)[1]
    torch.testing.assert_close(scaled, 2.5 * base)


def test_output_covariance_is_the_final_layer_covariance(inputs):
    """diag mode upstream; the last layer's output covariance M diag(v) M^T + diag(m^2 S^T + v S^T + s_b)."""
    model = make_mlp([6, 16, 5], nn.Tanh)
    post = random_posterior(model, 1e-2)
    cm_diag = mp.compile(model, post, (inputs,), covariance="diag")
    cm_cov = mp.compile(model, post, (inputs,), output_covariance=True, covariance="diag")
    _, cov = cm_cov(inputs)
    assert cov.shape == (5, 5, 5)
    torch.testing.assert_close(torch.diagonal(cov, dim1=-2, dim2=-1), cm_diag(inputs)[1])
    hidden = model[0](inputs).double()
    a, jac = torch.tanh(hidden), 1 - torch.tanh(hidden) ** 2
    p = {k: v.double() for k, v in post.items()}
    v_hidden = (inputs.double() ** 2) @ p["0.weight"].T + p["0.bias"]
    v_a = jac**2 * v_hidden
    w = model[2].weight.double()
    expected = torch.einsum("ki,bi,li->bkl", w, v_a, w) + torch.diag_embed((a**2 + v_a) @ p["2.weight"].T + p["2.bias"])
    torch.testing.assert_close(cov.double(), expected, rtol=1e-5, atol=1e-9)


def test_compile_leaves_the_model_unchanged(inputs):
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    model.train()
    model[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    post = random_posterior(model)
    post_before = {k: v.clone() for k, v in post.items()}
    mp.compile(model, post, (inputs,), likelihood="classification")
    assert [m.training for m in model.modules()] == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in post.items():
        assert torch.equal(v, post_before[k]), k


def test_compiled_model_is_a_snapshot(mlp, inputs):
    cm = mp.compile(mlp, 1e-3, (inputs,))
    expected = cm(inputs)[0].clone()
    with torch.no_grad():
        mlp[0].weight.add_(1.0)
    torch.testing.assert_close(cm(inputs)[0], expected)


def test_batch_one_example_still_gives_dynamic_batch(mlp):
    cm = mp.compile(mlp, 1e-3, (torch.randn(1, 6),), covariance="diag")
    x = torch.randn(9, 6)
    mean, var = cm(x)
    assert mean.shape == var.shape == (9, 4)
    torch.testing.assert_close(mean, mlp(x))


def test_multi_input_model():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

        def forward(self, x, y):
            return torch.relu(self.a(x)) + self.b(y)

    model = TwoInputs()
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    cm = mp.compile(model, 1e-3, (x, y))
    mean, _ = cm(x, y)
    torch.testing.assert_close(mean, model(x, y))
    assert cm.input_names == ["x", "y"]


def test_non_persistent_buffers_and_extra_outputs():
    """Non-persistent buffers live in the program's constants; moments are of the first output tensor."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.register_buffer("scale", torch.tensor(2.0), persistent=False)

        def forward(self, x):
            out = self.fc(x) * self.scale
            return out, torch.cumsum(out, -1)  # the second output has no rule and is not needed

    model = Scaled()
    x = torch.randn(4, 3)
    mean, var = mp.compile(model, {"fc.bias": torch.full((2,), 0.1)}, (x,), covariance="diag")(x)
    torch.testing.assert_close(mean, model(x)[0])
    torch.testing.assert_close(var, torch.full((4, 2), 0.4))


def test_model_with_varargs_forward():
    class Sum(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, *xs):
            return self.fc(sum(xs))

    model = Sum()
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    mean, _ = mp.compile(model, 1e-3, (x, y))(x, y)
    torch.testing.assert_close(mean, model(x, y))


@pytest.mark.parametrize("options", [{}, {"covariance": "full", "predictive": "glm"},
                                     {"likelihood": "classification", "output_covariance": True}])
def test_eager_runs_the_same_rules_as_the_compiled_graph(mlp, inputs, options):
    posterior = random_posterior(mlp, 1e-2)
    compiled = mp.compile(mlp, posterior, (inputs,), **options)
    eager = mp.eager(mlp, posterior, (inputs,), **options)
    x = torch.randn(5, inputs.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = eager(x)
    want = compiled._run((x,))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_eager_refuses_an_unknown_option(mlp, inputs):
    with pytest.raises(mp.InputError, match="unknown option"):
        mp.eager(mlp, 1e-3, (inputs,), covariances="full")
