"""predictive="glm": first order in the weights.  With full covariance it is exactly laplace-torch's linearised
(GLM) predictive for posteriors that are block-diagonal across layers; the oracle is laplace-torch itself."""

from __future__ import annotations

import ivon
import laplace
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import momentprop as mp
from oracles import make_mlp

X = torch.randn(96, 5, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (96,), generator=torch.Generator().manual_seed(1))
X_TEST = torch.randn(7, 5, generator=torch.Generator().manual_seed(3))


def fitted(model, **options):
    la = laplace.Laplace(model, "classification", **options)
    la.fit(DataLoader(TensorDataset(X, Y), batch_size=32))
    return la


POSTERIORS = [
    {"subset_of_weights": "all", "hessian_structure": "diag"},
    {"subset_of_weights": "all", "hessian_structure": "kron"},
    {"subset_of_weights": "last_layer", "hessian_structure": "diag"},
    {"subset_of_weights": "last_layer", "hessian_structure": "kron"},
    {"subset_of_weights": "last_layer", "hessian_structure": "full"},
]


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU])
@pytest.mark.parametrize("options", POSTERIORS, ids=lambda o: f"{o['subset_of_weights']}-{o['hessian_structure']}")
def test_glm_full_equals_laplace_glm_predictive(activation, options):
    model = make_mlp([5, 12, 10, 3], activation, seed=6)
    la = fitted(model, prior_precision=2.0, **options)
    cm = mp.compile(model, la, (X_TEST,), covariance="full", predictive="glm")
    mean, cov = cm(X_TEST)
    glm_mean, glm_cov = la._glm_predictive_distribution(X_TEST)
    torch.testing.assert_close(mean, glm_mean.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cov, glm_cov.detach(), rtol=1e-4, atol=1e-6)
    glm_probs = la(X_TEST, pred_type="glm", link_approx="probit").detach()
    torch.testing.assert_close(cm.predict(X_TEST), glm_probs, rtol=1e-4, atol=1e-6)


def test_suq_differs_from_glm_by_the_second_order_terms():
    """The paper's rule keeps the input-variance x weight-variance terms, so it is larger than the GLM."""
    model = make_mlp([5, 12, 10, 3], nn.Tanh, seed=7)
    la = fitted(model, subset_of_weights="all", hessian_structure="diag", prior_precision=1.0)
    glm = mp.compile(model, la, (X_TEST,), covariance="full", predictive="glm")(X_TEST)[1]
    suq = mp.compile(model, la, (X_TEST,), covariance="full", predictive="suq")(X_TEST)[1]
    diag = lambda c: torch.diagonal(c, dim1=-2, dim2=-1)  # noqa: E731
    assert (diag(suq) > diag(glm)).all()


def test_glm_diag_is_the_diagonal_recursion_of_first_order_terms():
    """diag mode: each layer keeps only variances; first order drops v_a * S.  Written out for one hidden layer."""
    model = make_mlp([5, 12, 3], nn.Tanh, seed=8)
    post = {n: torch.full_like(p, 1e-2) for n, p in model.named_parameters()}
    var = mp.compile(model, post, (X_TEST,), predictive="glm", covariance="diag")(X_TEST)[1]
    h = model[0](X_TEST).detach()
    v_h = (X_TEST**2) @ post["0.weight"].T + post["0.bias"]
    a, v_a = torch.tanh(h), (1 - torch.tanh(h) ** 2) ** 2 * v_h
    expected = (a**2) @ post["2.weight"].T + v_a @ (model[2].weight.detach() ** 2).T + post["2.bias"]
    torch.testing.assert_close(var, expected, rtol=1e-5, atol=1e-9)


def test_glm_refuses_a_full_posterior_that_couples_layers():
    model = make_mlp([5, 6, 3], nn.Tanh, seed=9)
    la = fitted(model, subset_of_weights="all", hessian_structure="full")
    with pytest.raises(mp.PosteriorError, match="couples the layers"):
        mp.compile(model, la, (X_TEST,), covariance="full", predictive="glm")


@pytest.mark.slow
@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_glm_on_bert_with_the_last_feed_forward_block_and_head_random(structure):
    """A small BERT classifier, its last block's feed-forward weights, the pooler and the classifier random:
    equal to laplace-torch's GLM predictive (each token's feed-forward is applied per token, so no cross-token
    covariance is involved; a random attention block would need it, see the README)."""
    import transformers

    torch.manual_seed(2)
    config = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=50, num_labels=3
    )

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = transformers.BertForSequenceClassification(config)

        def forward(self, ids):
            return self.m(ids).logits

    model = Logits().eval()
    random = (
        "m.bert.encoder.layer.1.intermediate.", "m.bert.encoder.layer.1.output.dense.", "m.bert.pooler.",
        "m.classifier.",
    )
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(random))
    ids, labels = torch.randint(0, 50, (64, 6)), torch.randint(0, 3, (64,))
    la = laplace.Laplace(
        model, "classification", subset_of_weights="all", hessian_structure=structure, prior_precision=5.0
    )
    la.fit(DataLoader(TensorDataset(ids, labels), batch_size=16))
    test_ids = torch.randint(0, 50, (5, 6))
    mean, cov = mp.compile(model, la, (test_ids,), covariance="full", predictive="glm")(test_ids)
    glm_mean, glm_cov = la._glm_predictive_distribution(test_ids)
    torch.testing.assert_close(mean, glm_mean.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cov, glm_cov.detach(), rtol=1e-4, atol=1e-6)


class ResidualBlocks(nn.Module):
    """Two residual blocks ``h + W2 tanh(W1 LN(h))`` between an input and an output layer, every weight random:
    the branches of each residual share the noise of ``h`` through random weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.inp, self.out = nn.Linear(5, 6), nn.Linear(6, 3)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(6), "up": nn.Linear(6, 8), "down": nn.Linear(8, 6)}) for _ in range(2)
        )

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block["down"](torch.tanh(block["up"](block["norm"](h))))
        return self.out(h)


def test_glm_full_on_residual_blocks_equals_the_jacobian_predictive():
    """``predictive="glm", covariance="full"`` is ``sum_p J_p S_p J_p^T`` over every parameter, with the Jacobian
    from autograd (independent of the rules): exact through residuals whose branches have random weights."""
    model = ResidualBlocks().eval()
    post = {n: torch.rand_like(p) * 1e-2 for n, p in model.named_parameters()}
    _, cov = mp.compile(model, post, (X_TEST,), covariance="full", predictive="glm")(X_TEST)
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (X_TEST,)))(params)
    expected = sum(
        torch.einsum("bip,p,bjp->bij", jac[n].flatten(2), post[n].flatten(), jac[n].flatten(2)) for n in params
    )
    torch.testing.assert_close(cov, expected, rtol=1e-4, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# defaults that follow the posterior
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_a_laplace_posterior_gets_laplace_torchs_own_predictive_by_default(structure):
    """No options: laplace-torch's default predictive (GLM, probit), equal to its own ``la(x)``; full covariance,
    as the network is small; both named as chosen by default."""
    model = make_mlp([5, 16, 3], nn.Tanh, seed=4)
    la = fitted(model, subset_of_weights="all", hessian_structure=structure)
    cm = mp.compile(model, la, (X_TEST,))
    options = cm.info.options
    assert (options.predictive, options.covariance, options.link) == ("glm", "full", "probit")
    assert set(options.automatic) == {"predictive", "covariance", "activations", "link"}
    assert options.activations == "linearised"
    assert "(default for this posterior and graph)" in repr(cm)
    assert cm.model_card()["chosen_by_default"] == ["covariance", "predictive", "activations", "link"]
    torch.testing.assert_close(cm.predict(X_TEST), la(X_TEST).float(), rtol=1e-4, atol=1e-6)


def test_other_posteriors_get_the_papers_predictive_and_explicit_options_win():
    """Plain variances: the paper's rule; an IVON posterior: the paper's rule with moment-matched activations (the
    best measured choice for it); explicit options always win."""

    model = make_mlp([5, 16, 3], nn.Tanh, seed=4)
    cm = mp.compile(model, 1e-3, (X_TEST,))
    assert (cm.info.options.predictive, cm.info.options.covariance, cm.info.options.activations) == (
        "suq", "full", "linearised")
    optimizer = ivon.IVON(model.parameters(), lr=0.1, ess=100)
    cm = mp.compile(model, optimizer, (X_TEST,))
    assert (cm.info.options.predictive, cm.info.options.activations) == ("suq", "moment_matched")
    assert mp.compile(model, optimizer, (X_TEST,), predictive="glm").info.options.activations == "linearised"
    la = fitted(model, subset_of_weights="all", hessian_structure="kron")
    cm = mp.compile(model, la, (X_TEST,), predictive="suq", covariance="diag")
    assert (cm.info.options.predictive, cm.info.options.covariance) == ("suq", "diag")
    assert cm.info.options.automatic == ("activations", "link")
    assert "covariance='diag' (default" not in repr(cm) and "predictive='suq' (default" not in repr(cm)


def test_two_classes_get_the_pairwise_probit_under_the_papers_predictive_only():
    model = make_mlp([5, 8, 2], nn.Tanh, seed=4)
    optimizer = ivon.IVON(model.parameters(), lr=0.1, ess=100)
    assert mp.compile(model, optimizer, (X_TEST,), likelihood="classification").info.options.link == "pairwise"
    la = laplace.Laplace(model, "classification", subset_of_weights="last_layer")
    la.fit(DataLoader(TensorDataset(X, Y % 2), batch_size=32))
    assert mp.compile(model, la, (X_TEST,)).info.options.link == "probit"  # laplace-torch's own link for its GLM
    three = make_mlp([5, 8, 3], nn.Tanh, seed=4)
    optimizer = ivon.IVON(three.parameters(), lr=0.1, ess=100)
    assert mp.compile(three, optimizer, (X_TEST,), likelihood="classification").info.options.link == "probit"
    assert "link" not in mp.compile(model, 1e-3, (X_TEST,)).info.options.automatic  # no likelihood, no link


@pytest.mark.parametrize("sizes", [[5, 600, 3], [5, 16, 200]], ids=["wide layer", "wide output"])
def test_full_covariance_is_the_default_only_where_it_is_cheap(sizes):
    model = make_mlp(sizes, nn.Tanh, seed=4)
    assert mp.compile(model, 1e-3, (X_TEST,)).info.options.covariance == "diag"


def test_a_full_posterior_over_several_layers_defaults_to_the_papers_predictive():
    """The GLM is refused across coupled layers; the default then is the paper's rule, not an error."""
    model = make_mlp([5, 8, 3], nn.Tanh, seed=4)
    la = fitted(model, subset_of_weights="all", hessian_structure="full")
    assert mp.compile(model, la, (X_TEST,)).info.options.predictive == "suq"
