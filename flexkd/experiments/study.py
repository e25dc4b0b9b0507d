"""The quality study behind ``flexkd study``: every method x task x seed, the selection ablation and the
teacher check, resumable run by run.

Each finished (task, method, seed) result is its own JSON file under ``<out>/study-runs`` (written atomically);
a rerun skips what is there, so the study can run in the background and survive being killed. After every
run the tables (``study.md``, ``study.json``) and the plot (``study.png``) are rewritten from whatever has
finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexkd._io import write_json, write_text
from flexkd.experiments.budget import RunBudget, study_budget
from flexkd.experiments.kits import TASK_METRICS, build_kit, quiet_transformers
from flexkd.experiments.methods import ABLATION_METHODS, STUDY_METHODS, get_method
from flexkd.experiments.pipeline import Experiment
from flexkd.experiments.plots import plot_mean_std_bars
from flexkd.experiments.store import ResultStore
from flexkd.experiments.tables import markdown_table, summarize
from flexkd.experiments.teacher_check import run_teacher_check

TEACHER_CHECK = "teacher-check"
RESULTS_FOLDER = (
    "study-runs"  # not "runs": that name is git-ignored, and these results are committed
)
METRIC_HEADERS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "rouge_l": "ROUGE-L"}


@dataclass(frozen=True)
class StudyPlan:
    """What the study runs. The ablation adds ``ablation_methods`` on ``ablation_tasks``."""

    tasks: tuple[str, ...] = ("debian-sections", "debian-synopsis")
    methods: tuple[str, ...] = STUDY_METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    ablation_tasks: tuple[str, ...] = ("debian-sections",)
    ablation_methods: tuple[str, ...] = ABLATION_METHODS
    teacher_check_tasks: tuple[str, ...] = ("debian-sections", "debian-synopsis")
    quick: bool = False
    budgets: dict[str, RunBudget] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (*self.methods, *self.ablation_methods):
            get_method(name)
        for task in (*self.tasks, *self.ablation_tasks, *self.teacher_check_tasks):
            if task not in TASK_METRICS:
                raise ValueError(f"tasks: expected names from {sorted(TASK_METRICS)}, got {task!r}")
        if not self.seeds or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds
        ):
            raise ValueError(f"seeds: expected ints >= 0, got {self.seeds!r}")

    def budget(self, task: str) -> RunBudget:
        return self.budgets.get(task) or study_budget(task, quick=self.quick)

    def runs(self) -> list[tuple[str, str, int]]:
        """Every (task, method, seed), seed-major so that a partial study covers every method evenly."""
        planned: list[tuple[str, str, int]] = []
        for seed in self.seeds:
            for task in self.tasks:
                extra = self.ablation_methods if task in self.ablation_tasks else ()
                for method in dict.fromkeys((*self.methods, *extra)):
                    planned.append((task, method, seed))
        return planned


def pending_runs(plan: StudyPlan, store: ResultStore) -> list[tuple[str, str, int]]:
    """The planned runs that have no result file yet."""
    return [run for run in plan.runs() if not store.has(*run)]


class _Experiments:
    """One :class:`Experiment` per task, built (teacher fine-tune or cache) only when first needed."""

    def __init__(self, plan: StudyPlan, work_dir: Path, cache_dir: Path, progress: bool) -> None:
        self.plan, self.work_dir, self.cache_dir, self.progress = (
            plan,
            work_dir,
            cache_dir,
            progress,
        )
        self._built: dict[str, Experiment] = {}

    def __getitem__(self, task: str) -> Experiment:
        if task not in self._built:
            budget = self.plan.budget(task)
            kit = build_kit(
                task,
                budget,
                cache_dir=self.cache_dir,
                quick=self.plan.quick,
                progress=self.progress,
            )
            # one scratch folder per teacher: a selection belongs to the teacher it was scored on
            work = self.work_dir / task / Path(kit.teacher_dir).name
            self._built[task] = Experiment(kit, budget, work, progress=self.progress)
        return self._built[task]


def run_study(
    out_dir: str | Path,
    plan: StudyPlan,
    *,
    cache_dir: str | Path,
    work_dir: str | Path,
    command: str,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every pending part of ``plan``; results under ``out_dir/study-runs``, tables and plot in ``out_dir``."""
    quiet_transformers()
    out_dir = Path(out_dir)
    store = ResultStore(out_dir / RESULTS_FOLDER)
    experiments = _Experiments(plan, Path(work_dir), Path(cache_dir), progress)
    todo = pending_runs(plan, store)
    checks = [t for t in plan.teacher_check_tasks if not store.has(t, TEACHER_CHECK, 0)]
    log(
        f"flexkd study: {len(plan.runs()) - len(todo)} of {len(plan.runs())} runs already done, {len(todo)} to go"
    )

    def check_teacher(task: str) -> None:
        started = time.perf_counter()
        store.write(task, TEACHER_CHECK, 0, teacher_check(experiments[task]))
        checks.remove(task)
        log(f"[{task}] teacher check done in {time.perf_counter() - started:.0f} s")
        write_report(out_dir, plan, store, command)

    for i, (task, method_name, seed) in enumerate(todo, start=1):
        if task in checks:  # right after the task's teacher is ready, before its first run
            check_teacher(task)
        result = experiments[task].run(get_method(method_name), seed)
        store.write(task, method_name, seed, result)
        headline = ", ".join(f"{k}={v:.3f}" for k, v in result["metrics"].items())
        log(
            f"[{i}/{len(todo)}] {task} {method_name} seed {seed}: {headline} ({result['train_seconds']:.0f} s train)"
        )
        write_report(out_dir, plan, store, command)
    for task in list(checks):
        check_teacher(task)
    return write_report(out_dir, plan, store, command)


def teacher_check(experiment: Experiment) -> dict[str, Any]:
    """Re-evaluate the teacher with its top-k dims zeroed, k random dims zeroed, and its lowest half zeroed."""
    teacher = experiment.kit.load_teacher()
    selection = experiment.selection(teacher)
    layer = selection.layers[-1]
    started = time.perf_counter()
    rows = run_teacher_check(
        teacher, layer, selection.scores(layer), selection.k, experiment.kit.evaluate
    )
    return {
        "profile": experiment.selection_profile(teacher),
        "method_label": "teacher check",
        "layer": layer,
        "k": selection.k,
        "hidden_size": selection.hidden_size,
        "rows": rows,
        "metrics": {},
        "eval_seconds": round(time.perf_counter() - started, 2),
    }


# ---------------------------------------------------------------------------------------------- report
def write_report(
    out_dir: Path, plan: StudyPlan, store: ResultStore, command: str
) -> dict[str, Any]:
    """Rewrite ``study.md``, ``study.json`` and ``study.png`` from the finished results."""
    records = store.all()
    runs = [r for r in records if r["method"] != TEACHER_CHECK]
    checks = {r["task"]: r for r in records if r["method"] == TEACHER_CHECK}
    done, planned = len(runs), len(plan.runs())
    sections = [
        "# Flex-KD quality study",
        "",
        f"Made by `{command}`; {done} of {planned} runs finished "
        f"(last update {time.strftime('%Y-%m-%d %H:%M %Z')}). Mean ± sample std over the seeds that finished.",
        "",
    ]
    summary: dict[str, Any] = {
        "command": command,
        "finished_runs": done,
        "planned_runs": planned,
        "tasks": {},
    }
    panels = []
    for task in plan.tasks:
        metrics = TASK_METRICS[task]
        task_runs = [r for r in runs if r["task"] == task]
        main = _ordered(
            summarize(
                [r for r in task_runs if r["method"] in plan.methods],
                [*metrics, "train_seconds"],
                digits={"train_seconds": 0},
            ),
            plan.methods,
        )
        budget = plan.budget(task)
        inputs = next(
            (r["inputs"] for r in task_runs if r.get("inputs")), "inputs as the task defines them"
        )
        sections += [
            f"## {task}",
            "",
            f"Budget per run (every method): {budget.steps} steps x {budget.batch_size} rows from "
            f"{budget.train_examples} train rows ({inputs}), lr {budget.lr}, "
            f"loss weights {budget.weights}, T = {budget.temperature}; scored on {budget.score_examples} rows; "
            f"evaluated on {budget.eval_examples} rows of {budget.eval_split}.",
            "",
            markdown_table(main, _columns(metrics)) if main else "_no finished run yet_",
            "",
        ]
        teachers = sorted({r["teacher"] for r in task_runs if r.get("teacher")})
        if teachers:
            note = (
                "Teacher: "
                if len(teachers) == 1
                else "**Mixed teachers** (results are not comparable): "
            )
            sections += [note + "; ".join(teachers) + ".", ""]
        task_summary: dict[str, Any] = {
            "budget": budget.to_dict(),
            "methods": main,
            "teachers": teachers,
        }
        if main:
            panels.append((f"{task}: methods", main, metrics[0]))
        if task in plan.ablation_tasks:
            ablation = _ordered(
                summarize(
                    [r for r in task_runs if r["method"] in plan.ablation_methods], list(metrics)
                ),
                plan.ablation_methods,
            )
            sections += [
                f"### {task}: which teacher dims Flex-KD (mse) distills",
                "",
                markdown_table(ablation, _columns(metrics, timing=False))
                if ablation
                else "_no finished run yet_",
                "",
            ]
            task_summary["ablation"] = ablation
            if ablation:
                panels.append((f"{task}: selection ablation", ablation, metrics[0]))
        if task in checks:
            check = checks[task]
            sections += [
                f"### {task}: teacher check (dims zeroed at layer {check['layer']}, k = {check['k']} of "
                f"{check['hidden_size']})",
                "",
                markdown_table(
                    check["rows"],
                    [("condition", "teacher with"), ("dims_zeroed", "dims zeroed")]
                    + [(m, METRIC_HEADERS.get(m, m)) for m in metrics],
                ),
                "",
            ]
            task_summary["teacher_check"] = check["rows"]
            if "profile" in check:
                sections += [profile_sentence(check["profile"]), ""]
                task_summary["selection_profile"] = check["profile"]
        summary["tasks"][task] = task_summary
    write_text(out_dir / "study.md", "\n".join(sections))
    write_json(out_dir / "study.json", summary)
    if panels:
        plot_mean_std_bars(panels, out_dir / "study.png")
    return summary


def profile_sentence(profile: dict[str, Any]) -> str:
    """One line on what the selected dims are (see :mod:`flexkd.experiments.profile`)."""
    return (
        f"The top-{profile['k']} dims hold {100 * profile['mass_in_top_k']:.1f}% of the importance mass and "
        f"{100 * profile['energy_share_selected']:.1f}% of the hidden state's energy (k/D = "
        f"{100 * profile['energy_share_uniform']:.1f}%); their mean |activation| is "
        f"{profile['mean_abs_ratio']:.2f}x that of the other dims, and "
        f"{100 * profile['overlap_with_top_abs']:.0f}% of them are among the {profile['k']} dims of largest "
        "mean |activation|."
    )


def _ordered(rows: list[dict[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    by_name = {r["method"]: r for r in rows}
    ordered = [by_name[m] for m in methods if m in by_name]
    for row in ordered:
        row["label"] = get_method(row["method"]).label
    return ordered


def _columns(metrics: Sequence[str], *, timing: bool = True) -> list[tuple[str, str]]:
    columns = [("label", "method"), ("seeds", "seeds")] + [
        (m, METRIC_HEADERS.get(m, m)) for m in metrics
    ]
    return columns + ([("train_seconds", "train time (s)")] if timing else [])
