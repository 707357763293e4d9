"""Task 3 of the evaluation suite (benchmarks/evaluate/tasks/vit.py), the parts its smoke run cannot see: which
parameters are random in each posterior subset, that both subsets share one MAP network and IVON moves only the
random parameters, and that the per-image Jacobians (laplace-torch's GGN and GLM for a partly frozen model) equal
laplace-torch's own batch Jacobians.  Synthetic images: no data set needed.  The end-to-end run is the ``vit``
case of tests/test_evaluate.py."""

from __future__ import annotations


import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.eval]

pytest.importorskip("laplace")
pytest.importorskip("ivon")
pytest.importorskip("transformers")

from benchmarks.evaluate.data import Split  # noqa: E402
from benchmarks.evaluate.posteriors import (  # noqa: E402
    TrainConfig, fit_laplace_subset, ivon_posterior_subset, per_sample_ggn_backend, per_sample_jacobians)
from benchmarks.evaluate.tasks import vit  # noqa: E402

HEAD = {"vit.classifier.weight", "vit.classifier.bias"}
LAST = f"vit.vit.layers.{vit.LAYERS - 1}"
EXPECTED_RANDOM = {  # written out by hand from the Hugging Face parameter names
    "value": HEAD | {f"{LAST}.attention.v_proj.weight", f"{LAST}.attention.v_proj.bias"},
    "mlp": HEAD | {f"{LAST}.mlp.fc1.weight", f"{LAST}.mlp.fc1.bias", f"{LAST}.mlp.fc2.weight", f"{LAST}.mlp.fc2.bias"},
}


def synthetic_split(n: int = 48, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = lambda k: torch.randn(k, vit.SIDE * vit.SIDE, generator=g)  # noqa: E731
    y = lambda k: torch.randint(0, 10, (k,), generator=g)  # noqa: E731
    return Split(x(n), y(n), x(16), y(16), x(8), y(8))


@pytest.mark.parametrize("subset", sorted(EXPECTED_RANDOM))
def test_only_the_subset_of_the_last_block_and_the_head_is_random(subset):
    assert vit.RANDOM_BLOCKS == 1  # EXPECTED_RANDOM names the last block only
    model = vit.build_vit(subset, seed=0)
    random = {n for n, p in model.named_parameters() if p.requires_grad}
    assert random == EXPECTED_RANDOM[subset]
    assert all(p.requires_grad for p in vit.build_vit(None, seed=0).parameters())


def test_flat_rows_give_the_hugging_face_logits_of_the_images():
    model = vit.build_vit("value", seed=1)
    x = torch.randn(3, vit.SIDE * vit.SIDE)
    with torch.no_grad():
        want = model.vit(pixel_values=x.reshape(3, 1, vit.SIDE, vit.SIDE)).logits
        torch.testing.assert_close(model(x), want)
    assert want.shape == (3, 10)


def test_both_subsets_share_one_map_network_and_ivon_moves_only_random_parameters():
    split, cfg = synthetic_split(), TrainConfig(epochs=1, batch_size=16, ivon_epochs=1)
    value = vit.train_shared_map(vit.build_vit("value", 3), split, "classification", cfg, seed=3)
    mlp = vit.train_shared_map(vit.build_vit("mlp", 3), split, "classification", cfg, seed=3)
    untrained = vit.build_vit(None, 3).state_dict()
    for k, v in value.state_dict().items():
        torch.testing.assert_close(v, mlp.state_dict()[k], rtol=0, atol=0)
    # MAP training trained every parameter, the frozen ones included
    fc1 = "vit.vit.layers.0.mlp.fc1.weight"
    assert not torch.equal(value.state_dict()[fc1], untrained[fc1])
    # requires_grad still says which are random
    assert {n for n, p in mlp.named_parameters() if p.requires_grad} == EXPECTED_RANDOM["mlp"]

    ivon_model = vit.build_vit("mlp", 3)
    vit.train_ivon_from_map(ivon_model, split, "classification", cfg, seed=3)
    moved = {n for n, p in ivon_model.named_parameters() if not torch.equal(p.detach(), mlp.state_dict()[n])}
    assert moved and moved <= EXPECTED_RANDOM["mlp"]


def test_per_image_jacobians_equal_laplace_torchs_batch_jacobians():
    from laplace.curvature import CurvlinopsGGN

    model = vit.build_vit("mlp", seed=4)
    x = torch.randn(5, vit.SIDE * vit.SIDE)
    want_j, want_f = CurvlinopsGGN(model, "classification").jacobians(x)  # jacrev of the whole batch's outputs
    got_j, got_f = per_sample_jacobians(model, x)
    assert got_j.shape == (5, 10, sum(p.numel() for p in model.parameters() if p.requires_grad))
    torch.testing.assert_close(got_j, want_j, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_f, want_f)
    y = torch.randint(0, 10, (5,))
    _, want_h = CurvlinopsGGN(model, "classification").diag(x, y)
    _, got_h = per_sample_ggn_backend()(model, "classification").diag(x, y)
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-7)


def test_laplace_and_ivon_posteriors_cover_only_the_random_parameters():
    split, cfg = synthetic_split(seed=5), TrainConfig(epochs=1, batch_size=16, ivon_epochs=1)
    model = vit.train_shared_map(vit.build_vit("value", 5), split, "classification", cfg, seed=5)
    n_random = sum(p.numel() for p in model.parameters() if p.requires_grad)
    post = fit_laplace_subset(model, split, "classification", "diag", tune_points=8, tune_samples=3, seed=5,
                              grid=(1.0, 100.0))
    assert post.laplace.n_params == n_random and post.sample(2, torch.Generator().manual_seed(0)).shape == (2, n_random)
    assert post.prior_precision in (1.0, 100.0)
    # the GLM latent variance is J diag(posterior variance) J^T with the Jacobian from autograd
    x = split.x_test[:2]
    _, f_var = post.laplace._glm_predictive_distribution(x)
    params = [p for p in model.parameters() if p.requires_grad]
    var = post.laplace.posterior_variance
    for i in range(2):
        for c in (0, 7):
            grads = torch.autograd.grad(model(x[i:i + 1])[0, c], params)
            g = torch.cat([t.reshape(-1) for t in grads])
            torch.testing.assert_close(f_var[i, c, c], (g**2 * var).sum(), rtol=1e-4, atol=1e-9)

    ivon_model = vit.build_vit("value", 5)
    opt = vit.train_ivon_from_map(ivon_model, split, "classification", cfg, seed=5)
    ivon_post = ivon_posterior_subset(ivon_model, opt, "classification", split.x_train)
    assert ivon_post.laplace.n_params == n_random
    assert ivon_post.sample(4, torch.Generator().manual_seed(0)).shape == (4, n_random)
