"""The demo pipeline behind ``flexkd demo``: one task, one seed, three methods, one run folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from flexkd._io import write_json, write_text
from flexkd_lab.experiments.budget import demo_budget
from flexkd_lab.experiments.kits import build_kit, quiet_transformers
from flexkd_lab.experiments.methods import DEMO_METHODS, get_method
from flexkd_lab.experiments.pipeline import Experiment
from flexkd_lab.experiments.plots import plot_learning_curves
from flexkd_lab.experiments.profile import profile_sentence
from flexkd_lab.experiments.tables import markdown_table, method_columns
from flexkd_lab.experiments.timing import StageTimer

DEMO_TASK = "debian-sections"


@dataclass
class DemoReport:
    rows: list[dict[str, Any]]
    table_markdown: str
    timing_table: str
    out_dir: Path


def run_demo(
    out_dir: str | Path,
    *,
    seed: int = 0,
    quick: bool = False,
    cache_dir: str | Path,
    progress: bool = True,
) -> DemoReport:
    """Teacher -> score -> select top-k -> distill with each of ``DEMO_METHODS``; writes everything to ``out_dir``."""
    quiet_transformers()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = StageTimer()
    budget = demo_budget(quick=quick)

    with timer.stage("teacher (fine-tune or cache)"):
        kit = build_kit(
            DEMO_TASK, budget, cache_dir=Path(cache_dir), pair="demo", quick=quick, progress=progress
        )
    experiment = Experiment(kit, budget, out_dir, progress=progress)
    with timer.stage("score + select"):
        selection = experiment.selection()
        flex_method = next(get_method(m) for m in DEMO_METHODS if get_method(m).uses_selection)
        layer = selection.resolve(experiment.teacher_layers_of(flex_method.tuned_as)[-1])
        selection.plot(out_dir / "importance.png", layer=layer)
        profile = experiment.selection_profile(layer=layer)

    results: dict[str, dict[str, Any]] = {}
    methods = [get_method(name) for name in DEMO_METHODS]
    with timer.stage("teacher outputs (run once, read by every method)"):
        experiment.prepare([(method, seed) for method in methods])
    for method in tqdm(methods, desc="flexkd demo", unit="method", disable=not progress):
        with timer.stage(f"distill + eval: {method.name}"):
            results[method.name] = experiment.run(method, seed, keep_student=True)
    experiment.remove_teacher_outputs()

    with timer.stage("report"):
        rows = [
            {
                "method": name,
                "label": r["method_label"],
                "knobs": budget.knobs_text(get_method(name)),
                **r["metrics"],
                "train_seconds": r["train_seconds"],
                "eval_seconds": r["eval_seconds"],
            }
            for name, r in results.items()
        ]
        table = markdown_table(rows, method_columns(kit.metrics))
        plot_learning_curves(
            {r["method_label"]: r["curve"] for r in results.values()},
            out_dir / "learning_curves.png",
            title=f"{DEMO_TASK}, seed {seed}: loss terms per step (same budget for every method)",
        )
        header = (
            f"# flexkd demo: {DEMO_TASK}, seed {seed}{' (quick)' if quick else ''}\n\n"
            f"Teacher: {kit.teacher_description}; student: {kit.student_description}; "
            f"{flex_method.label} distills k = {selection.k} of {selection.hidden_size} teacher dims at layer "
            f"{layer} ({100 * selection.mass_in_top_k(layer):.1f}% of the importance mass).\n"
            f"Inputs: {kit.input_description}. Budget per method: {budget.steps} steps x {budget.batch_size} rows, "
            f"lr {budget.lr}, loss weights {budget.weights} (the feature weight per method as in the table), "
            f"T = {budget.temperature}. "
            f"Evaluated on {budget.eval_examples} rows of the {budget.eval_split} split.\n\n"
            f"{profile_sentence(profile)}\n\n"
            f"Each student (`from_pretrained` folder), its config and per-step metrics: "
            f"`runs/<method>/seed-{seed}/` in this folder.\n\n"
        )
        write_text(out_dir / "results.md", header + table + "\n")
    write_json(
        out_dir / "results.json",
        {
            "task": DEMO_TASK,
            "seed": seed,
            "quick": quick,
            "budget": budget.to_dict(),
            "teacher": kit.teacher_description,
            "teacher_metrics": kit.teacher_metrics,
            "student": kit.student_description,
            "selection": {
                "k": selection.k,
                "hidden_size": selection.hidden_size,
                "layers": selection.layers,
                "flex_layer": layer,
                "mass_in_top_k": selection.mass_in_top_k(layer),
                "profile": profile,
            },
            "results": results,
            "timing": timer.to_dict(),
        },
    )
    return DemoReport(rows, table, timer.table(), out_dir)
