"""The task registry: one module per task under ``tasks/``, each registering a :class:`Task`.

A task says which data sets it has and, for one data set and seed, builds a :class:`Problem`: the seeded split, a
model factory, training settings, which posteriors to fit and the sizes of the expensive baselines.  Everything
else (training, posteriors, methods, metrics, timing, the report) is shared and lives in one place each
(``posteriors.py``, ``methods.py``, ``metrics.py``, ``runner.py``, ``report.py``).  To add a task (a small ViT, a
small GPT-2): write ``tasks/<name>.py`` with a ``Task`` subclass decorated with ``@register``, and import it in
``tasks/__init__.py``.  A task whose model needs other training or only some parameters random can override
``Problem.train_map`` / ``Problem.train_ivon`` and set ``requires_grad=False`` on the deterministic parameters in
``make_model`` (laplace-torch, IVON and the compiler then treat only the rest as random).

Inputs need not be flat: a sequence model takes ``(N, T)`` token ids and returns ``(N, T, V)`` logits with labels
``(N, T)``; the shared code then treats every position as one prediction point (metrics over all tokens, time per
1,000 tokens, GLM memory per sequence = positions x outputs x parameters).  Such a task overrides the training
(``train_map`` / ``train_ivon``) and the Laplace fit (``fit_laplace``: laplace-torch wants one output row per
point), and may cap the costs that grow with the output width (``predict_chunk``, ``calibration_points``,
``full_budget_s``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .data import Split
from .methods import MC_SAMPLES, REFERENCE_SAMPLES
from .posteriors import TrainConfig

# every Laplace posterior twice: prior precision tuned on validation data, and by marginal likelihood ("-marglik",
# laplace-torch's standard); tasks with their own Laplace fit (the transformers) list their own
POSTERIORS = ("laplace-diag", "laplace-kron", "laplace-diag-marglik", "laplace-kron-marglik", "ivon")
SMOKE_POSTERIORS = ("laplace-diag", "laplace-kron", "ivon")  # --smoke: the marglik rows only in the tabular task


@dataclass
class Problem:
    """One data set, one seed: everything the shared runner needs."""

    task: str
    dataset: str
    seed: int
    likelihood: str  # "classification" | "regression"
    split: Split
    make_model: Callable[[int], nn.Module]  # seed -> freshly initialised model
    train: TrainConfig
    posteriors: tuple[str, ...] = POSTERIORS
    mc_samples: tuple[int, ...] = MC_SAMPLES
    reference_samples: int = REFERENCE_SAMPLES
    reference_points: int = 500  # test points on which the 10,000-sample latent variance reference is computed
    glm_chunk: int = 250  # points per laplace-torch GLM call
    tune_points: int = 1000  # validation points for laplace-torch's prior-precision grid search
    train_map: Callable | None = None  # override of posteriors.train_map
    train_ivon: Callable | None = None  # override of posteriors.train_ivon
    fit_laplace: Callable | None = None  # override of posteriors.fit_laplace (same arguments)
    ivon_posterior: Callable | None = None  # override of posteriors.ivon_posterior (same arguments)
    mc_vectorised: bool = True  # Monte Carlo forward passes with vmap (False: a loop over weight samples)
    predict_chunk: int | None = None  # points per call of the compiled model (None: the whole test set at once)
    calibration_points: int | None = None  # validation points given to cm.calibrate (None: all)
    # compiled full mode: when its projected time on test + calibration exceeds this, it is timed and its latent
    # variance checked on the reference points only, and the record says why the rest was not run (None: always run)
    full_budget_s: float | None = None
    notes: list[str] = field(default_factory=list)


class Task:
    """Base class of a benchmark task."""

    name: str = ""
    title: str = ""
    likelihood: str = "classification"
    metrics: tuple[str, ...] = ()  # table columns, in order
    description: str = ""  # one paragraph for the report: model, data, split, sizes
    unit: str = "test points"  # what one prediction is, in the report ("test tokens" for a language model)
    findings: str = ""  # the honest paragraph: where compiled matches MC-1000 / GLM, where not, and why

    def datasets(self, smoke: bool) -> list[str]:
        raise NotImplementedError

    def unavailable(self, dataset: str) -> str | None:
        """Why ``dataset`` cannot run on this machine (missing data), or None."""
        return None

    def problem(self, dataset: str, seed: int, smoke: bool) -> Problem:
        raise NotImplementedError


TASKS: dict[str, Task] = {}


def register(cls: type[Task]) -> type[Task]:
    task = cls()
    if not task.name or task.name in TASKS:
        raise ValueError(f"task name {task.name!r} is empty or taken")
    TASKS[task.name] = task
    return cls


def get_tasks() -> dict[str, Task]:
    from . import tasks  # noqa: F401  (importing the modules registers the tasks)

    return TASKS
