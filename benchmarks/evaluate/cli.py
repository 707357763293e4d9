"""Command line: ``python -m benchmarks.evaluate [--task NAME] [--smoke] [--seeds N] [--out DIR]``."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch

from .registry import Task, get_tasks

RESULTS = Path(__file__).resolve().parent.parent / "results"
SEEDS = 5


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    tasks = sorted(get_tasks())
    p = argparse.ArgumentParser(prog="python -m benchmarks.evaluate", description=__doc__)
    p.add_argument("--task", action="append", choices=tasks, help="run only this task (repeatable); default: all")
    p.add_argument("--dataset", action="append", help="run only this data set of the task(s) (repeatable)")
    p.add_argument("--smoke", action="store_true", help="one seed, tiny subsets: a check that the scripts run")
    p.add_argument("--seeds", type=int, default=None, help=f"seeds per data set (default {SEEDS}; 1 with --smoke)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default {RESULTS}, or {RESULTS / 'smoke'} with --smoke)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on the shared 2-core machine a 2-thread pool spinning "
                        "against other tenants made training 30x slower)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rebuild the Markdown and plots from the <task>.json records already in --out")
    return p.parse_args(argv)


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return float("nan")


def run_task(task: Task, *, smoke: bool, seeds: int, out: Path, datasets: Sequence[str] | None = None,
             threads: int = 1, progress: bool = True, make_plots: bool = True, single: bool = False) -> dict:
    """Run one task over its data sets and seeds; write ``<task>.md``, ``<task>.json`` and the PNGs into ``out``.
    Returns ``{"records", "markdown", "json", "plots", "wall_s", "skipped"}``."""
    from tqdm import tqdm

    from . import report
    from .methods import REFERENCE_SAMPLES
    from .runner import run_problem, steps

    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    start, load_start = time.perf_counter(), _load()
    names = [d for d in task.datasets(smoke) if datasets is None or d in datasets]
    skipped = []
    for d in list(names):
        why = task.unavailable(d)
        if why:
            skipped.append(f"{d}: {why}")
            names.remove(d)
            print(f"[{task.name}] skipping {d}: {why}", file=sys.stderr)
    seed_list = list(range(seeds))
    records: list[dict] = []
    bar = tqdm(total=0, desc=task.name, unit="step", disable=not progress, dynamic_ncols=True)
    json_path = out / f"{task.name}.json"
    for d in names:
        for seed in seed_list:
            bar.set_description(f"{task.name} {d} seed {seed}: data")
            problem = task.problem(d, seed, smoke)
            bar.total += steps(problem)
            bar.refresh()

            def tick(msg: str, d=d, seed=seed) -> None:
                bar.set_description(f"{task.name} {d} seed {seed}: {msg}")
                bar.update(1)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                records += run_problem(problem, tick)
            json_path.write_text(json.dumps({"task": task.name, "smoke": smoke, "records": records}, indent=1,
                                            default=float))
    bar.close()
    meta = dict(
        date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), seeds=seeds, seed_list=seed_list,
        torch=torch.__version__, threads=threads, cpus=os.cpu_count(), load_start=load_start, load_end=_load(),
        wall_s=time.perf_counter() - start,
        reference_samples=max((r.get("reference_samples", REFERENCE_SAMPLES) for r in records),
                              default=REFERENCE_SAMPLES),
        smoke=smoke, skipped=skipped,
        single=single,
    )
    plot_paths = report.plots(task, records, out, task.name) if (make_plots and records) else []
    meta["plots"] = plot_paths
    meta["wall_s"] = time.perf_counter() - start
    md_path = out / f"{task.name}.md"
    md_path.write_text(report.markdown(task, records, meta))
    json_path.write_text(json.dumps({"task": task.name, "smoke": smoke, "meta": {k: v for k, v in meta.items()
                                     if k != "plots"}, "records": records}, indent=1, default=float))
    return dict(records=records, markdown=md_path, json=json_path, plots=plot_paths, wall_s=meta["wall_s"],
                skipped=skipped)


def rebuild_report(task: Task, out: Path, make_plots: bool = True) -> Path:
    """Markdown and plots again from ``<task>.json`` (records and run metadata of an earlier run)."""
    from . import report

    data = json.loads((out / f"{task.name}.json").read_text())
    meta = dict(data["meta"])
    meta["plots"] = report.plots(task, data["records"], out, task.name) if make_plots else []
    md_path = out / f"{task.name}.md"
    md_path.write_text(report.markdown(task, data["records"], meta))
    return md_path


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    tasks = get_tasks()
    chosen = args.task or list(tasks)
    seeds = args.seeds or (1 if args.smoke else SEEDS)
    out = args.out or (RESULTS / "smoke" if args.smoke else RESULTS)
    results = {}
    for name in chosen:
        if args.report_only:
            if (out / f"{name}.json").exists():
                print(f"[{name}] rebuilt {rebuild_report(tasks[name], out, not args.no_plots)}")
            continue
        results[name] = run_task(tasks[name], smoke=args.smoke, seeds=seeds, out=out, datasets=args.dataset,
                                 threads=args.threads, progress=not args.no_progress, make_plots=not args.no_plots,
                                 single=args.task is not None)
        print(f"[{name}] {results[name]['wall_s'] / 60:.1f} min -> {results[name]['markdown']}")
    index = ["# Evaluation results", "", "_Generated by `python -m benchmarks.evaluate`; do not edit by hand._", ""]
    for name, task in tasks.items():
        md = out / f"{name}.md"
        if md.exists():
            index.append(f"- [{task.title}]({md.name})")
    (out / "README.md").write_text("\n".join(index) + "\n")
    return results
