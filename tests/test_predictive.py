"""The predictive beyond the latent moments: calibration of the variance scale, the pairwise-probit and
Laplace-bridge links and input uncertainty."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import momentprop as mp
from oracles import TokenEmbedding, make_mlp, random_posterior


def _classification_data(model, n, seed, temperature=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    with torch.no_grad():
        probs = torch.softmax(model(x) / temperature, -1)
    return x, torch.multinomial(probs, 1, generator=g).squeeze(-1)


def _heldout_nlpd(cm, x, y):
    probs = cm.predict(x)
    return float(-torch.log(probs[torch.arange(len(y)), y]).mean())


def test_calibration_shrinks_an_overdispersed_classification_posterior(tmp_path):
    model = make_mlp([6, 32, 4], nn.Tanh, seed=0)
    with torch.no_grad():
        model[-1].weight.mul_(4.0)
    x_fit, y_fit = _classification_data(model, 400, seed=1)
    x_test, y_test = _classification_data(model, 400, seed=2)
    cm = mp.compile(model, random_posterior(model, 0.5), (x_fit[:4],), likelihood="classification")
    before_fit, before_test = _heldout_nlpd(cm, x_fit, y_fit), _heldout_nlpd(cm, x_test, y_test)
    scale = cm.calibrate(DataLoader(TensorDataset(x_fit, y_fit), batch_size=64))
    assert scale < 0.5 and cm.variance_scale == pytest.approx(scale)
    assert cm.info.options.variance_scale == pytest.approx(scale)  # the options that a saved model carries agree
    assert _heldout_nlpd(cm, x_fit, y_fit) <= before_fit
    assert _heldout_nlpd(cm, x_test, y_test) < before_test
    out = mp.OnnxRunner(cm.to_onnx(tmp_path / "calibrated.onnx"))(x_test)
    np.testing.assert_allclose(out["probs"], cm.predict(x_test).numpy(), rtol=1e-4, atol=1e-6)


def test_calibration_widens_an_underdispersed_regression_posterior():
    model = make_mlp([6, 16, 1], nn.Tanh, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(600, 6, generator=g)
    with torch.no_grad():
        y = model(x) + 0.5 * torch.randn(600, 1, generator=g)
    cm = mp.compile(model, random_posterior(model, 1e-4), (x[:4],), likelihood="regression", sigma_noise=0.05)

    def nlpd(xs, ys):
        mean, var = cm.predict(xs)
        return float((0.5 * torch.log(2 * math.pi * var) + (ys - mean) ** 2 / (2 * var)).mean())

    before = nlpd(x[300:], y[300:])
    scale = cm.calibrate((x[:300], y[:300].squeeze(-1)))  # labels of shape (B,) for outputs of shape (B, 1)
    assert scale > 10
    assert nlpd(x[300:], y[300:]) < before


def test_calibration_accepts_labels_of_shape_b_and_b1():
    model = make_mlp([6, 16, 3], nn.Tanh, seed=5)
    x, y = _classification_data(model, 200, seed=6)
    scales = []
    for labels in (y, y.unsqueeze(-1)):
        cm = mp.compile(model, random_posterior(model, 0.3), (x[:4],), likelihood="classification")
        scales.append(cm.calibrate((x, labels)))
    assert scales[0] == pytest.approx(scales[1])


class TokenClassifier(nn.Module):
    """Token ids (N, T) -> logits (N, T, C), or flattened to (N * T, C) with the same parameters."""

    def __init__(self, flat: bool = False):
        super().__init__()
        torch.manual_seed(11)
        self.embed, self.head, self.flat = nn.Embedding(10, 8), nn.Linear(8, 5), flat

    def forward(self, ids):
        out = self.head(torch.tanh(self.embed(ids)))
        return out.reshape(-1, out.shape[-1]) if self.flat else out


def test_calibration_of_a_sequence_classifier_equals_calibrating_it_flattened():
    """Outputs (N, T, C) with labels (N, T): the same scale as for the same model with outputs (N * T, C)."""
    g = torch.Generator().manual_seed(12)
    ids, labels = torch.randint(0, 10, (16, 6), generator=g), torch.randint(0, 5, (16, 6), generator=g)
    scales = []
    for flat in (False, True):
        model = TokenClassifier(flat)
        posterior = {"head.weight": torch.full((5, 8), 0.05)}
        cm = mp.compile(model, posterior, (ids[:2],), likelihood="classification")
        scales.append(cm.calibrate((ids, labels.reshape(-1) if flat else labels)))
    assert scales[0] == pytest.approx(scales[1], rel=1e-5)
    assert scales[0] != pytest.approx(1.0)


def test_calibration_never_worse_on_its_own_data():
    """A posterior that is already right: the fitted scale may stay, but the NLPD must not rise."""
    model = make_mlp([6, 16, 3], nn.Tanh, seed=7)
    x, y = _classification_data(model, 300, seed=8)
    cm = mp.compile(model, random_posterior(model, 1e-3), (x[:4],), likelihood="classification")
    before = _heldout_nlpd(cm, x, y)
    cm.calibrate((x, y))
    assert _heldout_nlpd(cm, x, y) <= before + 1e-7


def test_calibration_with_nan_labels_is_a_clear_error():
    model = make_mlp([6, 8, 1], seed=9)
    cm = mp.compile(model, 1e-3, (torch.randn(4, 6),), likelihood="regression", sigma_noise=0.1, covariance="diag")
    with pytest.raises(mp.CalibrationError, match="not finite"):
        cm.calibrate((torch.randn(20, 6), torch.full((20,), math.nan)))


def _bridge_reference(mean, cov, normalise):
    """The Laplace bridge written out per sample (Hobbhahn et al.; laplace-torch's zero-mean correction)."""
    out = []
    for mu, sigma in zip(mean.double(), cov.double()):
        ones = torch.ones(len(mu), dtype=torch.float64)
        mu = mu - sigma @ ones * (ones @ mu) / (ones @ sigma @ ones)
        sigma = sigma - torch.outer(sigma @ ones, ones @ sigma) / (ones @ sigma @ ones)
        var, k = torch.diagonal(sigma), len(mu)
        if normalise:
            c = var.mean() / math.sqrt(k / 2)
            mu, var = mu / math.sqrt(c), var / c
        alpha = (1 - 2 / k + torch.exp(mu) / k**2 * torch.exp(-mu).sum()) / var
        out.append(alpha / alpha.sum())
    return torch.stack(out)


@pytest.mark.parametrize("link", ["bridge", "bridge_norm"])
def test_bridge_links(link):
    model = make_mlp([6, 16, 4], nn.Tanh, seed=10)
    x = torch.randn(5, 6)
    cm = mp.compile(
        model, random_posterior(model, 1e-2), (x,), likelihood="classification", link=link, covariance="full"
    )
    mean, cov = cm(x)
    reference = _bridge_reference(mean, cov, link == "bridge_norm")
    torch.testing.assert_close(cm.predict(x).double(), reference, rtol=1e-4, atol=1e-6)


def _pairwise_reference(mean, cov):
    """Lu, Ie & Sha (2020), one class pair at a time: p_k ∝ 1 / sum_j exp(-(m_k - m_j) / sqrt(1 + pi/8 v_kj)),
    v_kj = S_kk + S_jj - 2 S_kj."""
    mean, cov = mean.double(), cov.double()
    out = torch.empty_like(mean)
    for n in range(mean.shape[0]):
        for k in range(mean.shape[1]):
            total = 0.0
            for j in range(mean.shape[1]):
                v = cov[n, k, k] + cov[n, j, j] - 2 * cov[n, k, j]
                total += math.exp(-(mean[n, k] - mean[n, j]) / math.sqrt(1 + math.pi / 8 * v))
            out[n, k] = 1 / total
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize("classes", [2, 4])
def test_pairwise_link_is_the_probit_of_each_logit_difference(tmp_path, classes):
    model = make_mlp([6, 16, classes], nn.Tanh, seed=14)
    x = torch.randn(5, 6)
    cm = mp.compile(model, random_posterior(model, 3e-2), (x,), likelihood="classification", link="pairwise",
                    covariance="full")
    mean, cov = cm(x)
    torch.testing.assert_close(cm.predict(x).double(), _pairwise_reference(mean, cov), rtol=1e-4, atol=1e-6)
    out = mp.OnnxRunner(cm.to_onnx(tmp_path / "pairwise.onnx"))(x)
    np.testing.assert_allclose(out["probs"], cm.predict(x).numpy(), rtol=1e-4, atol=1e-6)


def test_pairwise_link_sees_the_correlation_that_decides_a_binary_prediction():
    """Two logits that move together: their difference is nearly certain, so the class probability is nearly the
    MAP's, and Monte Carlo over the logit Gaussian agrees; the per-logit probit shrinks both logits towards 0 and
    is far off."""
    mean = torch.tensor([[2.0, -1.0]])
    cov = torch.tensor([[[9.0, 8.9], [8.9, 9.0]]])
    g = torch.Generator().manual_seed(15)
    z = mean + torch.randn(200_000, 2, generator=g) @ torch.linalg.cholesky(cov[0]).T
    monte_carlo = torch.softmax(z, -1).mean(0)
    from momentprop.passes.heads import class_probabilities

    pairwise = class_probabilities(mean, cov, full=True, link="pairwise")[0]
    per_logit = class_probabilities(mean, cov, full=True, link="probit")[0]
    assert abs(pairwise[0] - monte_carlo[0]) < 0.01
    assert abs(per_logit[0] - monte_carlo[0]) > 0.1


def test_bridge_matches_laplace_torch():
    import laplace

    model = make_mlp([6, 16, 4], nn.Tanh, seed=11)
    x, y = _classification_data(model, 64, seed=12)
    la = laplace.Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="full")
    la.fit(DataLoader(TensorDataset(x, y), batch_size=32))
    for link in ("probit", "bridge", "bridge_norm"):
        cm = mp.compile(model, la, (x[:5],), link=link, output_covariance=True)
        glm_probs = la(x[:5], pred_type="glm", link_approx=link).float()
        torch.testing.assert_close(cm.predict(x[:5]), glm_probs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_input_variance_is_the_linearised_input_uncertainty(tmp_path, covariance):
    """With deterministic weights, full mode: Cov(out) = J diag(v) J^T, J the input Jacobian (from autograd,
    independently); diag mode: the paper's diagonal recursion v -> v W1^2 -> tanh'^2 -> W2^2.  With random weights
    too the output variances grow (weights and inputs independent)."""
    model = make_mlp([6, 16, 3], nn.Tanh, seed=13)
    x, v = torch.randn(5, 6), 1e-2 * torch.rand(5, 6)
    cm = mp.compile(model, {}, (x,), covariance=covariance, input_variance=True)
    assert cm.input_names == ["input", "input_variance"]
    mean, var = cm(x, v)
    if covariance == "full":
        jac = torch.func.vmap(torch.func.jacrev(model))(x)
        expected = jac @ torch.diag_embed(v) @ jac.mT
    else:
        w1, w2 = model[0].weight, model[2].weight
        expected = ((v @ (w1**2).T) * (1 - torch.tanh(model[0](x)) ** 2) ** 2) @ (w2**2).T
    torch.testing.assert_close(var, expected.detach(), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(mean, model(x).detach())
    out = mp.OnnxRunner(cm.to_onnx(tmp_path / "inputs.onnx"))(torch.randn(9, 6), torch.zeros(9, 6))
    assert np.abs(out["covariance" if covariance == "full" else "variance"]).max() == 0.0

    post = random_posterior(model, 1e-3)
    with_weights = mp.compile(model, post, (x,), covariance=covariance, input_variance=True)(x, v)[1]
    weights_only = mp.compile(model, post, (x,), covariance=covariance)(x)[1]
    grown = torch.diagonal(with_weights, dim1=-2, dim2=-1) if covariance == "full" else with_weights
    alone = torch.diagonal(weights_only, dim1=-2, dim2=-1) if covariance == "full" else weights_only
    assert (grown > alone).all()


def test_input_variance_needs_floating_inputs():
    with pytest.raises(mp.InputError, match="floating-point"):
        mp.compile(TokenEmbedding(), 1e-3, (torch.randint(0, 10, (3, 2)),), input_variance=True)


def test_link_needs_classification():
    with pytest.raises(mp.InputError, match="link"):
        mp.compile(make_mlp([6, 4]), 1e-3, (torch.randn(2, 6),), likelihood="regression", link="bridge")


def test_calibration_can_choose_the_map_and_says_it_stopped_at_the_bound():
    """Labels drawn from the MAP's own softmax and a posterior far too wide: the best scale is 0 (the MAP), a
    warning says so, and the predictive then is the MAP's probit probabilities at zero variance."""
    model = make_mlp([6, 16, 3], nn.Tanh, seed=5)
    x, y = _classification_data(model, 300, seed=6, temperature=0.3)
    cm = mp.compile(model, random_posterior(model, 5.0), (x[:4],), likelihood="classification")
    with pytest.warns(UserWarning, match="lower bound"):
        scale = cm.calibrate((x, y))
    assert scale == 0.0 and cm.calibration.at_bound == "lower"
    assert cm.model_card()["calibration"]["at_bound"] == "lower"
    map_nlpd = float(nn.functional.cross_entropy(model(x), y))
    # probit at zero variance is the softmax of the mean
    assert _heldout_nlpd(cm, x, y) == pytest.approx(map_nlpd, rel=1e-5)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]  # labels unrelated to x
    narrow = mp.compile(model, random_posterior(model, 1e-3), (x[:4],), likelihood="classification")
    with pytest.warns(UserWarning, match="upper bound"):
        narrow.calibrate((x, shuffled), bounds=(1e-4, 1.0))
    assert narrow.calibration.at_bound == "upper"


@pytest.mark.slow
def test_calibration_chooses_among_the_predictives_by_validation_nlpd(tmp_path):
    """Each option compiled and calibrated on its own: ``choose=True`` makes the model the one with the lowest
    validation NLPD, and records every option's."""
    model = make_mlp([6, 32, 3], nn.Tanh, seed=9)
    with torch.no_grad():
        model[-1].weight.mul_(3.0)
    x, y = _classification_data(model, 300, seed=8, temperature=2.0)  # noisier labels: some variance helps
    post = random_posterior(model, 0.3)
    own = {}
    for predictive, activations in (("glm", "linearised"), ("suq", "linearised"), ("suq", "moment_matched")):
        single = mp.compile(model, post, (x[:4],), likelihood="classification", predictive=predictive,
                            activations=activations)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            single.calibrate((x, y))
        own[(predictive, activations)] = _heldout_nlpd(single, x, y)
    cm = mp.compile(model, post, (x[:4],), likelihood="classification")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm.calibrate((x, y), choose=True)
    best = min(own, key=own.get)
    assert (cm.info.options.predictive, cm.info.options.activations) == best
    assert cm.calibration.chosen["predictive"] == best[0]
    assert _heldout_nlpd(cm, x, y) == pytest.approx(own[best], rel=1e-4)
    assert min(cm.calibration.chosen["nlpd"].values()) == pytest.approx(own[best], rel=1e-4)
    cm.save(tmp_path / "m.mp")
    with pytest.raises(mp.InputError, match="recompiles"):
        mp.load(tmp_path / "m.mp").calibrate((x, y), choose=True)


def test_calibration_takes_a_scale_only_when_its_gain_exceeds_the_noise():
    """``fit_scale`` on a synthetic per-point NLPD: a gain of 0.05 at every point is taken; a mean gain of 0.05 made
    of +-1 swings on 20 points (standard error about 0.22) is declined and recorded."""
    from momentprop.calibration import fit_scale

    swings = torch.tensor([1.0, -1.0] * 10) + 0.05

    def consistent(scale: float) -> torch.Tensor:
        return torch.full((20,), 1.0) - 0.05 * float(abs(scale - 2.0) < 0.5)

    def noisy(scale: float) -> torch.Tensor:
        return torch.full((20,), 1.0) - swings * float(abs(scale - 2.0) < 0.5)

    taken = fit_scale(consistent, 1.0, (1e-2, 1e2))
    assert abs(taken.scale - 2.0) < 0.5 and taken.declined is None
    declined = fit_scale(noisy, 1.0, (1e-2, 1e2))
    assert declined.scale == 1.0 and declined.nlpd == pytest.approx(1.0)
    assert abs(declined.declined["scale"] - 2.0) < 0.5
    assert declined.declined["standard_error"] == pytest.approx(float(swings.std()) / 20 ** 0.5)
