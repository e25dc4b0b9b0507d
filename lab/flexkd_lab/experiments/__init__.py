"""Experiments on the bundled Debian data: the pipeline shared by ``flexkd demo`` and ``flexkd study``.

- :mod:`~flexkd_lab.experiments.kits`: per task, the tokenizer, the cached fine-tuned teacher, the student
  config, tokenized rows and the evaluation function (a :class:`~flexkd_lab.experiments.pipeline.TaskKit`).
- :mod:`~flexkd_lab.experiments.pipeline`: score once, then distill and evaluate any (method, seed) with
  :func:`flexkd.train` under one :class:`~flexkd_lab.experiments.budget.RunBudget`.
- :mod:`~flexkd_lab.experiments.demo` / :mod:`~flexkd_lab.experiments.study`: the two commands' drivers;
  :mod:`~flexkd_lab.experiments.study_report` the study's tables and plots, :mod:`~flexkd_lab.experiments.stats`
  its intervals, McNemar tests and Holm correction.
- :mod:`~flexkd_lab.experiments.teacher_check`: zero teacher dims at a layer and re-evaluate.
- :mod:`~flexkd_lab.experiments.store`, :mod:`~flexkd_lab.experiments.tables`, :mod:`~flexkd_lab.experiments.plots`:
  resumable per-run JSON results, mean ± std tables, plots.
"""

from flexkd_lab.experiments.budget import RunBudget, demo_budget, study_budget
from flexkd_lab.experiments.methods import METHODS, Method, get_method
from flexkd_lab.experiments.pipeline import Experiment, TaskKit
from flexkd_lab.experiments.store import ResultStore
from flexkd_lab.experiments.teacher_check import (
    ZeroDims,
    run_teacher_check,
    teacher_check_conditions,
)

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
