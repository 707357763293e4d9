"""Evaluation suite: the paper's comparisons on real data (issue 5), on the same posterior for every method.

``python -m benchmarks.evaluate`` runs every task; ``--task NAME`` one; ``--smoke`` one seed on tiny subsets.
Results (Markdown tables, PNG plots, raw JSON records) go to ``benchmarks/results/``.  See ``registry.py`` for how
tasks are organised and how to add one.
"""
