"""The quality study behind ``flexkd study``: every method x task x seed, the selection ablation and the
teacher check, resumable run by run.

Each finished (task, method, seed) result is its own JSON file under ``<out>/study-runs`` (written atomically);
a rerun skips what is there, so the study can run in the background and survive being killed. After every
run the tables (``study.md``, ``study.json``) and the plot (``study.png``) are rewritten from whatever has
finished.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flexkd._io import write_json, write_text
from flexkd_lab.experiments.budget import RunBudget, study_budget
from flexkd_lab.experiments.kits import TASK_METRICS, build_kit, quiet_transformers
from flexkd_lab.experiments.methods import ABLATION_METHODS, STUDY_METHODS, get_method
from flexkd_lab.experiments.pipeline import Experiment, remove_teacher_outputs
from flexkd_lab.experiments.plots import plot_mean_std_bars, plot_teacher_check
from flexkd_lab.experiments.store import ResultStore
from flexkd_lab.experiments.tables import METRIC_HEADERS, markdown_table, method_columns, summarize
from flexkd_lab.experiments.teacher_check import run_teacher_check

TEACHER_CHECK = "teacher-check"
RESULTS_FOLDER = (
    "study-runs"  # not "runs": that name is git-ignored, and these results are committed
)


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
    workers: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every pending part of ``plan``; results under ``out_dir/study-runs``, tables and plot in ``out_dir``.

    With ``workers > 1`` the runs go to that many processes, each with an equal share of the CPU threads;
    this process first fine-tunes or loads each teacher and writes the data and selection files every run
    reads, so the workers only read them.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected an int >= 1, got {workers!r}")
    quiet_transformers()
    out_dir = Path(out_dir)
    store = ResultStore(out_dir / RESULTS_FOLDER)
    todo = pending_runs(plan, store)
    checks = [t for t in plan.teacher_check_tasks if not store.has(t, TEACHER_CHECK, 0)]
    log(
        f"flexkd study: {len(plan.runs()) - len(todo)} of {len(plan.runs())} runs already done, {len(todo)} to go"
    )
    # each task's teacher check right before its first run (or at the end when no run of it is left)
    jobs: list[tuple[str, str, int]] = []
    for task, method, seed in todo:
        if task in checks and not any(job[0] == task for job in jobs):
            jobs.append((task, TEACHER_CHECK, 0))
        jobs.append((task, method, seed))
    jobs += [(task, TEACHER_CHECK, 0) for task in checks if not any(j[0] == task for j in jobs)]
    if not jobs:
        return write_report(out_dir, plan, store, command)

    settings = (plan, Path(work_dir), Path(cache_dir))
    if workers == 1:
        _init_worker(*settings, progress=progress)
        finished = map(_run_job, jobs)
    else:
        experiments = _Experiments(*settings, progress=progress)
        for task in dict.fromkeys(task for task, _, _ in jobs):
            experiments[task].prepare(
                [(get_method(m), s) for t, m, s in jobs if t == task and m != TEACHER_CHECK]
            )
        threads = max(1, torch.get_num_threads() // workers)
        pool = multiprocessing.get_context("spawn").Pool(
            workers, initializer=_init_worker, initargs=(*settings, False, threads)
        )
        finished = pool.imap_unordered(_run_job, jobs)
    try:
        for i, ((task, method_name, seed), result, seconds) in enumerate(finished, start=1):
            store.write(task, method_name, seed, result)
            if method_name == TEACHER_CHECK:
                log(f"[{i}/{len(jobs)}] {task} teacher check done in {seconds:.0f} s")
            else:
                headline = ", ".join(f"{k}={v:.3f}" for k, v in result["metrics"].items())
                log(
                    f"[{i}/{len(jobs)}] {task} {method_name} seed {seed}: {headline} "
                    f"({result['train_seconds']:.0f} s train)"
                )
            write_report(out_dir, plan, store, command)
    finally:
        if workers > 1:
            pool.terminate()
    if not pending_runs(plan, store):  # a resume still needs them; a finished study does not
        freed = remove_teacher_outputs(work_dir)
        if freed:
            log(f"removed the stored teacher outputs under {work_dir} ({freed / 2**30:.1f} GiB)")
    return write_report(out_dir, plan, store, command)


_worker_experiments: _Experiments | None = None


def _init_worker(
    plan: StudyPlan, work_dir: Path, cache_dir: Path, progress: bool = False, threads: int = 0
) -> None:
    global _worker_experiments
    if threads:
        torch.set_num_threads(threads)
    quiet_transformers()
    _worker_experiments = _Experiments(plan, work_dir, cache_dir, progress)


def _run_job(job: tuple[str, str, int]) -> tuple[tuple[str, str, int], dict[str, Any], float]:
    """One study job in this process: ``(task, method, seed)``, or ``(task, TEACHER_CHECK, 0)``."""
    task, method_name, seed = job
    experiment = _worker_experiments[task]
    started = time.perf_counter()
    if method_name == TEACHER_CHECK:
        result = teacher_check(experiment)
    else:
        result = experiment.run(get_method(method_name), seed)
    return job, result, time.perf_counter() - started


def teacher_check(experiment: Experiment) -> dict[str, Any]:
    """Score every layer of the teacher (one pass), then re-evaluate it with, at each layer in turn, its
    top-k dims zeroed, k random dims zeroed, and its lowest-scored half zeroed."""
    import flexkd
    from flexkd.adapters import get_adapter

    teacher = experiment.kit.load_teacher()
    adapter = get_adapter(teacher)
    layers = list(range(1, adapter.num_layers + 1))
    k = experiment.kit.student_hidden_size
    selection = flexkd.score(
        teacher, experiment.score_batches(), layers=layers, k=k, progress=experiment.progress
    )
    scores = {layer: selection.scores(layer) for layer in layers}
    started = time.perf_counter()
    rows = run_teacher_check(teacher, scores, k, experiment.kit.evaluate)
    return {
        "profile": experiment.selection_profile(teacher),
        "method_label": "teacher check",
        "layers": layers,
        "distilled_layers": [adapter.resolve_layer(layer) for layer in experiment.teacher_layers],
        "k": k,
        "hidden_size": selection.hidden_size,
        "stat": selection.stat,
        "mass_in_top_k": {
            str(layer): float(s.topk(k).values.sum() / s.sum()) for layer, s in scores.items()
        },
        "rows": rows,
        "metrics": {},
        "eval_seconds": round(time.perf_counter() - started, 2),
    }


def teacher_check_table(check: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    """One row per layer: ``metric`` of the teacher under each zeroing, and the top-k share of the scores."""
    by_layer: dict[int, dict[str, Any]] = {}
    for row in check["rows"]:
        if row["layer"] is None:
            continue
        kind = row["condition"].split()[1].split("-")[0]  # "top" / "random" / "lowest"
        by_layer.setdefault(row["layer"], {"layer": row["layer"]})[kind] = row[metric]
    for layer, entry in by_layer.items():
        entry["mass"] = check["mass_in_top_k"][str(layer)]
        if layer in check.get("distilled_layers", ()):
            entry["layer"] = f"{layer} (distilled)"
    return list(by_layer.values())


# ---------------------------------------------------------------------------------------------- report
def write_report(
    out_dir: Path, plan: StudyPlan, store: ResultStore, command: str
) -> dict[str, Any]:
    """Rewrite ``study.md``, ``study.json`` and ``study.png`` from the finished results."""
    records = store.all()
    runs = [r for r in records if r["method"] != TEACHER_CHECK]
    checks = {r["task"]: r for r in records if r["method"] == TEACHER_CHECK}
    planned_runs = set(plan.runs())
    done = sum((r["task"], r["method"], r["seed"]) in planned_runs for r in runs)
    planned = len(planned_runs)
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
    panels, teacher_panels = [], []
    for task in plan.tasks:
        metrics = TASK_METRICS[task]
        task_runs = [r for r in runs if r["task"] == task]
        budget = plan.budget(task)
        main = _ordered(
            summarize(
                [r for r in task_runs if r["method"] in plan.methods],
                [*metrics, "train_seconds"],
                digits={"train_seconds": 0},
            ),
            plan.methods,
            budget,
        )
        inputs = next(
            (r["inputs"] for r in task_runs if r.get("inputs")), "inputs as the task defines them"
        )
        sections += [
            f"## {task}",
            "",
            f"Budget per run (every method): {budget.steps} steps x {budget.batch_size} rows from "
            f"{budget.train_examples} train rows ({inputs}), lr {budget.lr}, "
            f"loss weights {budget.weights}, T = {budget.temperature}; scored on {budget.score_examples} rows; "
            f"evaluated on {budget.eval_examples} rows of {budget.eval_split}."
            + (
                " The feature weight (and layer pair) of each method is the one the debian-sections tuning "
                "chose on validation (column 2; `benchmarks/results/diagnosis.md`)."
                if budget.tuned
                else ""
            ),
            "",
            markdown_table(main, method_columns(metrics, seeds=True)) if main else "_no finished run yet_",
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
                budget,
            )
            sections += [
                f"### {task}: which teacher dims Flex-KD distills (top-k by score, random k, bottom k; "
                "at the tuned feature weight and at weight 1)",
                "",
                markdown_table(ablation, method_columns(metrics, seeds=True, timing=False))
                if ablation
                else "_no finished run yet_",
                "",
            ]
            task_summary["ablation"] = ablation
            if ablation:
                panels.append((f"{task}: selection ablation", ablation, metrics[0]))
        if task in checks:
            check = checks[task]
            headline = metrics[0]
            intact = next(r for r in check["rows"] if r["layer"] is None)
            table = teacher_check_table(check, headline)
            half = check["hidden_size"] // 2
            sections += [
                f"### {task}: teacher check ({METRIC_HEADERS.get(headline, headline)} of the teacher with dims "
                f"zeroed at one layer; k = {check['k']} of {check['hidden_size']}, scored by {check['stat']})",
                "",
                f"Intact teacher: {intact[headline]:.3f}. *top-k mass*: the share of the layer's importance "
                "held by its top-k dims.",
                "",
                markdown_table(
                    table,
                    [
                        ("layer", "layer"),
                        ("mass", "top-k mass"),
                        ("top", f"zero top-{check['k']}"),
                        ("random", f"zero random {check['k']}"),
                        ("lowest", f"zero lowest {half} (half)"),
                    ],
                ),
                "",
            ]
            task_summary["teacher_check"] = check["rows"]
            teacher_panels.append((task, table, intact[headline], headline))
            if "profile" in check:
                sections += [profile_sentence(check["profile"]), ""]
                task_summary["selection_profile"] = check["profile"]
        summary["tasks"][task] = task_summary
    write_text(out_dir / "study.md", "\n".join(sections))
    write_json(out_dir / "study.json", summary)
    if panels:
        plot_mean_std_bars(panels, out_dir / "study.png")
    if teacher_panels:
        plot_teacher_check(teacher_panels, out_dir / "teacher_check.png")
    return summary


def profile_sentence(profile: dict[str, Any]) -> str:
    """One line on what the selected dims are (see :mod:`flexkd_lab.experiments.profile`)."""
    return (
        f"At layer {profile['layer']}, the top-{profile['k']} dims hold {100 * profile['mass_in_top_k']:.1f}% of the importance mass and "
        f"{100 * profile['energy_share_selected']:.1f}% of the hidden state's energy (k/D = "
        f"{100 * profile['energy_share_uniform']:.1f}%); their mean |activation| is "
        f"{profile['mean_abs_ratio']:.2f}x that of the other dims, and "
        f"{100 * profile['overlap_with_top_abs']:.0f}% of them are among the {profile['k']} dims of largest "
        "mean |activation|."
    )


def _ordered(
    rows: list[dict[str, Any]], methods: Sequence[str], budget: RunBudget
) -> list[dict[str, Any]]:
    by_name = {r["method"]: r for r in rows}
    ordered = [by_name[m] for m in methods if m in by_name]
    for row in ordered:
        method = get_method(row["method"])
        row["label"] = method.label
        row["knobs"] = budget.knobs_text(method)
    return ordered
