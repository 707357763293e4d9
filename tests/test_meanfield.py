"""Models built from bayesian-torch mean-field layers compile with no posterior argument: the posterior is read
from the layers (sigma = softplus(rho)) and the mean path is captured without sampling.  Oracles: plain
nn.Linear networks loaded with the mu parameters (mean) and bayesian-torch's own sampling forward (variance)."""

from __future__ import annotations

import copy

import pytest
import torch
import bayesian_torch.layers as bt
import torch.nn.functional as F
from torch import nn

import momentprop as mp
from momentprop.meanfield import deterministic_meanfield, meanfield_posterior

N_CALLS = 20_000  # sampling forward passes; relative standard error of a variance estimate ~ sqrt(2 / N) = 1 %


class BayesMLP(nn.Module):
    """5-16-3 in the usual bayesian-torch style: every layer returns (out, kl), the model (logits, kl)."""

    def __init__(self, layer: type[nn.Module], activation, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.activation = layer(5, 16), layer(16, 3), activation
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for fc in (self.fc1, self.fc2):
                fc.mu_weight.normal_(0, 0.5, generator=g)  # pre-activations of order 1
                for rho in (fc.rho_weight, fc.rho_bias):
                    rho.uniform_(-6, -5, generator=g)  # sigma in [0.0025, 0.0067]: linearisation is accurate

    def forward(self, x):
        h, kl1 = self.fc1(x)
        logits, kl2 = self.fc2(self.activation(h))
        return logits, kl1 + kl2


CASES = {"reparameterization-tanh": (bt.LinearReparameterization, torch.tanh),
         "flipout-relu": (bt.LinearFlipout, F.relu)}


def mu_reference(model: BayesMLP) -> nn.Sequential:
    """An independent deterministic network: nn.Linear layers loaded with the mu parameters."""
    act = nn.Tanh() if model.activation is torch.tanh else nn.ReLU()
    ref = nn.Sequential(nn.Linear(5, 16), act, nn.Linear(16, 3))
    with torch.no_grad():
        for lin, fc in ((ref[0], model.fc1), (ref[2], model.fc2)):
            lin.weight.copy_(fc.mu_weight)
            lin.bias.copy_(fc.mu_bias)
    return ref


@torch.no_grad()
def sampled_covariance(model: nn.Module, x: torch.Tensor, n_calls: int = N_CALLS) -> torch.Tensor:
    """Covariance over the last dim of ``model(x)[0]`` from ``n_calls`` calls of bayesian-torch's sampling
    forward, in float64.  One call draws one weight sample per input for reparameterization layers (the sample is
    shared by the batch, so the batch holds distinct inputs, not copies), hence one call per sample."""
    torch.manual_seed(1)
    outs = torch.stack([model(x)[0] for _ in range(n_calls)]).double()
    centred = outs - outs.mean(0)
    return torch.einsum("sbi,sbj->bij", centred, centred) / (n_calls - 1)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """(model, inputs) per layer type."""
    layer, activation = CASES[request.param]
    model = BayesMLP(layer, activation)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    return model, x


@pytest.fixture(scope="module")
def sampled(case):
    """The Monte Carlo covariance of ``case``'s outputs; the sampling runs once per layer type."""
    model, x = case
    return sampled_covariance(model, x)


def test_posterior_is_read_from_the_layers():
    model = BayesMLP(bt.LinearReparameterization, torch.tanh)
    model.fc3 = bt.LinearFlipout(3, 2, bias=False)
    post = meanfield_posterior(model)
    assert sorted(post) == ["fc1.mu_bias", "fc1.mu_weight", "fc2.mu_bias", "fc2.mu_weight", "fc3.mu_weight"]
    for name, var in post.items():
        rho = model.get_parameter(name.replace("mu_", "rho_"))
        torch.testing.assert_close(var, torch.log1p(torch.exp(rho.detach())) ** 2)  # bayesian-torch's sigma
    assert meanfield_posterior(nn.Sequential(nn.Linear(3, 2))) == {}


def test_compiled_mean_is_the_mu_network(case):
    model, x = case
    cm = mp.compile(model, example_inputs=(x,), activations="linearised")  # mean-field's default moment-matches
    assert sorted(cm.info.random_parameters) == ["fc1.mu_bias", "fc1.mu_weight", "fc2.mu_bias", "fc2.mu_weight"]
    x_other = torch.randn(7, 5)  # another batch size: the batch stays dynamic
    for inputs in (x, x_other):
        torch.testing.assert_close(cm(inputs)[0], mu_reference(model)(inputs))


@pytest.mark.slow
@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_variance_matches_bayesian_torch_sampling(case, sampled, covariance):
    model, x = case
    mc = sampled
    _, var = mp.compile(model, example_inputs=(x,), covariance=covariance)(x)
    mc_var = torch.diagonal(mc, dim1=-2, dim2=-1)
    if covariance == "full":
        rel = torch.linalg.matrix_norm(var.double() - mc) / torch.linalg.matrix_norm(mc)
        assert rel.max() < 0.10, f"relative Frobenius error of the covariance {rel.tolist()}"
    else:
        rel = (var.double() / mc_var - 1).abs()
        assert rel.max() < 0.15, f"relative error of the variances {rel.max().item():.3f}"


def test_compile_restores_the_layers():
    model = BayesMLP(bt.LinearFlipout, F.relu)
    x = torch.randn(4, 5)
    before = copy.deepcopy(model.state_dict())
    mp.compile(model, example_inputs=(x,), covariance="full")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all("forward" not in layer.__dict__ for layer in (model.fc1, model.fc2))
    assert not torch.equal(model(x)[0], model(x)[0]), "the model should sample again after compile"


def test_deterministic_forward_keeps_the_return_structure_and_restores_on_error():
    model = BayesMLP(bt.LinearReparameterization, torch.tanh)
    x = torch.randn(3, 5)
    with pytest.raises(RuntimeError, match="inside"):
        with deterministic_meanfield(model):
            logits, kl = model(x)
            torch.testing.assert_close(logits, mu_reference(model)(x))
            torch.testing.assert_close(kl, model.fc1.kl_loss() + model.fc2.kl_loss())
            assert torch.is_tensor(model.fc1(x, return_kl=False))
            raise RuntimeError("inside")
    assert not torch.equal(model(x)[0], model(x)[0])


def test_dnn_to_bnn_model_compiles_to_the_original_network():
    """bayesian-torch's converter (MOPED: mu = the trained weights); its layers return only the output."""
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn

    torch.manual_seed(0)
    dnn = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    bnn = copy.deepcopy(dnn)
    dnn_to_bnn(bnn, {"prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0, "posterior_rho_init": -4.0,
                     "type": "Flipout", "moped_enable": True, "moped_delta": 0.05})
    x = torch.randn(4, 5)
    mean, var = mp.compile(bnn, example_inputs=(x,), covariance="diag", activations="linearised")(x)
    torch.testing.assert_close(mean, dnn(x))
    assert (var > 0).all()


@pytest.mark.slow
def test_a_bayesian_torch_convolution_has_the_monte_carlo_variance_of_its_posterior():
    """One mean-field conv layer on a fixed input: every output's variance is exact in the diagonal rule
    (``conv(x^2, sigma_w^2) + sigma_b^2``); the oracle samples the layer's kernel and bias and convolves."""
    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = bt.Conv1dReparameterization(1, 2, 3)

        def forward(self, x):
            return self.conv(x)[0].flatten(1)

    torch.manual_seed(5)
    model = ConvNet().eval()
    x = torch.randn(2, 1, 6)
    mean, var = mp.compile(model, example_inputs=(x,), covariance="diag")(x)
    conv = model.conv
    sigma_w, sigma_b = F.softplus(conv.rho_kernel).detach(), F.softplus(conv.rho_bias).detach()
    g = torch.Generator().manual_seed(6)
    samples = torch.stack([
        F.conv1d(x, conv.mu_kernel + sigma_w * torch.randn(conv.mu_kernel.shape, generator=g),
                 conv.mu_bias + sigma_b * torch.randn(conv.mu_bias.shape, generator=g)).flatten(1)
        for _ in range(20_000)
    ]).detach()
    torch.testing.assert_close(mean, F.conv1d(x, conv.mu_kernel, conv.mu_bias).flatten(1).detach())
    torch.testing.assert_close(var, samples.var(0), rtol=0.05, atol=0.0)


class Derived(bt.LinearReparameterization):
    """A user's subclass that keeps bayesian-torch's forward."""


class Overriding(bt.LinearReparameterization):
    """A user's subclass with its own (sampling) forward: its mean path is unknown."""

    def forward(self, x, return_kl=True):
        return super().forward(2 * x, return_kl)


def test_subclass_keeping_the_forward_is_supported():
    assert sorted(meanfield_posterior(nn.Sequential(Derived(3, 2)))) == ["0.mu_bias", "0.mu_weight"]


@pytest.mark.parametrize("layer", [bt.ConvTranspose1dReparameterization(1, 2, 3), Overriding(3, 2)],
                         ids=["conv-transpose", "overridden-forward"])
def test_meanfield_layer_without_a_known_mean_path_is_refused(layer):
    model = nn.Sequential(layer)
    for call in (lambda: meanfield_posterior(model), lambda: deterministic_meanfield(model).__enter__()):
        with pytest.raises(mp.UnsupportedOpError, match=type(layer).__name__):
            call()
    assert "forward" not in layer.__dict__


def test_no_posterior_and_no_meanfield_layers_is_an_error():
    with pytest.raises(mp.PosteriorError, match="no posterior given"):
        mp.compile(nn.Sequential(nn.Linear(5, 3)), example_inputs=(torch.randn(2, 5),))
