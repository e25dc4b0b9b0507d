"""Experiments on the bundled Debian data: the pipeline shared by ``flexkd demo`` and ``flexkd study``.

- :mod:`~flexkd.experiments.kits`: per task, the tokenizer, the cached fine-tuned teacher, the student
  config, tokenized rows and the evaluation function (a :class:`~flexkd.experiments.pipeline.TaskKit`).
- :mod:`~flexkd.experiments.pipeline`: score once, then distill and evaluate any (method, seed) with
  :func:`flexkd.train` under one :class:`~flexkd.experiments.budget.RunBudget`.
- :mod:`~flexkd.experiments.demo` / :mod:`~flexkd.experiments.study`: the two commands' drivers.
- :mod:`~flexkd.experiments.teacher_check`: zero teacher dims at a layer and re-evaluate.
- :mod:`~flexkd.experiments.store`, :mod:`~flexkd.experiments.tables`, :mod:`~flexkd.experiments.plots`:
  resumable per-run JSON results, mean ± std tables, plots.
"""

from flexkd.experiments.budget import RunBudget, demo_budget, study_budget
from flexkd.experiments.methods import METHODS, Method, get_method
from flexkd.experiments.pipeline import Experiment, TaskKit
from flexkd.experiments.store import ResultStore
from flexkd.experiments.teacher_check import ZeroDims, run_teacher_check, teacher_check_conditions

__all__ = [
    "METHODS",
    "Experiment",
    "Method",
    "ResultStore",
    "RunBudget",
    "TaskKit",
    "ZeroDims",
    "demo_budget",
    "get_method",
    "run_teacher_check",
    "study_budget",
    "teacher_check_conditions",
]
