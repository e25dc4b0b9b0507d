"""Why does (or doesn't) Flex-KD beat the projector? One knob at a time, on debian-sections.

python benchmarks/quality/diagnose.py              # every variant below, resumable
python benchmarks/quality/diagnose.py --report-only

Each variant is the study's sections budget with one change (the feature-loss weight, the layer pair,
the loss) and one method; results go to ``benchmarks/results/diagnosis-runs/`` (one JSON per run,
written atomically, skipped when present) and the table to ``benchmarks/results/diagnosis.md``. The
table shows, next to the metrics, the task and feature loss at the start and over the last 10 steps,
which is what tells a feature term that fights the task apart from one that helps it.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "results"
TASK = "debian-sections"


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    change: str  # what differs from the study budget, in words
    budget: dict[str, Any] = field(default_factory=dict)


def _weights(feature: float) -> dict[str, float]:
    return {"task": 1.0, "logit": 1.0, "feature": feature}


MIDDLE = [[2, 3]]  # student layer 2 of 4 <-> teacher layer 3 of 6 (HF hidden_states numbering)
VARIANTS = (
    Variant("none", "none", "no feature term"),
    Variant("flex-mse", "flex-mse", "-"),
    Variant("flex-mse-w0.1", "flex-mse", "feature weight 0.1", {"weights": _weights(0.1)}),
    Variant("projector", "projector", "-"),
    Variant("projector-w0.1", "projector", "feature weight 0.1", {"weights": _weights(0.1)}),
    Variant("flex-corr", "flex-corr", "-"),
    Variant("projector-corr", "projector-corr", "-"),
    Variant("cka", "cka", "-"),
    Variant("flex-mse-mid", "flex-mse", "layers 2<->3", {"layer_pairs": MIDDLE}),
    Variant("flex-corr-mid", "flex-corr", "layers 2<->3", {"layer_pairs": MIDDLE}),
    Variant("projector-corr-mid", "projector-corr", "layers 2<->3", {"layer_pairs": MIDDLE}),
    Variant("projector-mid", "projector", "layers 2<->3", {"layer_pairs": MIDDLE}),
    Variant("cka-mid", "cka", "layers 2<->3", {"layer_pairs": MIDDLE}),
    *(
        Variant(
            f"{method}-mid-w0.1",
            method,
            "layers 2<->3, feature weight 0.1",
            {"layer_pairs": MIDDLE, "weights": _weights(0.1)},
        )
        for method in ("flex-mse", "flex-corr", "projector", "projector-corr", "cka")
    ),
    *(
        Variant(f"{method}-w0.1", method, "feature weight 0.1", {"weights": _weights(0.1)})
        for method in ("flex-corr", "projector-corr", "cka")
    ),
    # does the selection matter once the feature term has weight? (the study's ablation runs at 0.1)
    *(
        Variant(f"flex-corr-{which}-mid", f"flex-corr-{which}", f"layers 2<->3, {which}-k dims",
                {"layer_pairs": MIDDLE})  # fmt: skip
        for which in ("random", "bottom")
    ),
    Variant("none-lr3e-4", "none", "lr 3e-4", {"lr": 3e-4}),
    Variant("flex-corr-lr3e-4", "flex-corr", "lr 3e-4", {"lr": 3e-4}),
)


def base_budget():
    """The study's sections budget before tuning: every method at the same knobs, scored on validation."""
    from flexkd_lab.experiments.budget import study_budget

    return study_budget(TASK).with_(tuned={}, eval_split="validation", eval_examples=1000)


def _tail_mean(curve: list[dict[str, Any]], key: str, n: int = 10) -> float:
    values = [row[key] for row in curve[-n:] if key in row]
    return sum(values) / len(values) if values else float("nan")


def tuning_choice(store) -> dict[str, dict[str, Any]]:
    """Per feature method, the grid point ({last, 2<->3} x feature weight {1, 0.1}) of best validation
    accuracy: what ``flexkd_lab.experiments.budget.SECTIONS_TUNED`` must hold."""
    from flexkd_lab.experiments.methods import get_method

    best: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        method = get_method(variant.method)
        if method.feature == "none" or method.which != "top":
            continue  # not a method to tune (no feature term, or a selection ablation)
        if set(variant.budget) - {"layer_pairs", "weights"}:
            continue  # not a grid point (another knob such as lr)
        if not store.has(TASK, variant.name, 0):
            continue
        accuracy = store.read(TASK, variant.name, 0)["metrics"]["accuracy"]
        if variant.method not in best or accuracy > best[variant.method]["accuracy"]:
            best[variant.method] = {
                "layer_pairs": variant.budget.get("layer_pairs", "last"),
                "feature_weight": variant.budget.get("weights", {}).get("feature", 1.0),
                "accuracy": accuracy,
            }
    return best


def write_report(store, command: str) -> Path:
    from flexkd._io import write_text
    from flexkd_lab.experiments.methods import get_method
    from flexkd_lab.experiments.tables import markdown_table

    rows = []
    for variant in VARIANTS:
        if not store.has(TASK, variant.name, 0):
            continue
        record = store.read(TASK, variant.name, 0)
        curve = record["curve"]
        rows.append(
            {
                "method": get_method(variant.method).label,
                "change": variant.change,
                **record["metrics"],
                "task_start": curve[0]["task"],
                "task_end": _tail_mean(curve, "task"),
                "feature_start": curve[0].get("feature", 0.0),
                "feature_end": _tail_mean(curve, "feature"),
            }
        )
    base = base_budget()
    text = "\n".join(
        [
            "# Flex-KD diagnosis: one knob at a time (debian-sections, seed 0)",
            "",
            f"Made by `{command}` (last update {time.strftime('%Y-%m-%d %H:%M %Z')}). Base budget = the "
            f"study's before tuning: {base.steps} steps x {base.batch_size} rows, lr {base.lr}, weights {base.weights}, "
            f"last layer of both models; evaluated on {base.eval_examples} validation rows. Losses are "
            "unweighted; *end* is the mean of the last 10 steps (ln 20 = 3.00 is a uniform guess).",
            "",
            markdown_table(
                rows,
                [
                    ("method", "method"),
                    ("change", "change from the base"),
                    ("accuracy", "accuracy"),
                    ("macro_f1", "macro-F1"),
                    ("task_start", "task loss start"),
                    ("task_end", "task loss end"),
                    ("feature_start", "feature loss start"),
                    ("feature_end", "feature loss end"),
                ],
            )
            if rows
            else "_no finished run yet_",
            "",
            "## Chosen per method (best validation accuracy on the grid; the study uses these)",
            "",
            markdown_table(
                [
                    {"method": get_method(m).label, **c, "layer_pairs": str(c["layer_pairs"])}
                    for m, c in tuning_choice(store).items()
                ],
                [
                    ("method", "method"),
                    ("layer_pairs", "layer pairs (student, teacher)"),
                    ("feature_weight", "feature weight"),
                    ("accuracy", "validation accuracy"),
                ],
            ),
            "",
        ]
    )
    path = RESULTS / "diagnosis.md"
    write_text(path, text)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="diagnose.py", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="VARIANT", help="run just these variants")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the table")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)

    from flexkd_lab.commands.demo import default_cache_dir
    from flexkd_lab.experiments.kits import build_kit, quiet_transformers
    from flexkd_lab.experiments.methods import get_method
    from flexkd_lab.experiments.pipeline import Experiment, remove_teacher_outputs
    from flexkd_lab.experiments.store import ResultStore

    command = (
        "python benchmarks/quality/diagnose.py"  # what reproduces every row (--only just splits it)
    )
    store = ResultStore(RESULTS / "diagnosis-runs")
    known = {v.name: v for v in VARIANTS}
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        parser.error(f"--only: unknown variants {unknown}; known: {sorted(known)}")
    todo = [known[name] for name in (args.only or known) if not store.has(TASK, name, 0)]
    if args.report_only or not todo:
        print(write_report(store, command))
        return 0

    quiet_transformers()
    base = base_budget()
    cache = default_cache_dir()
    kit = build_kit(TASK, base, cache_dir=cache, progress=args.progress)
    for variant in todo:
        budget = base.with_(**variant.budget)
        pairs = (
            "last"
            if budget.layer_pairs == "last"
            else "-".join(f"{s}_{t}" for s, t in budget.layer_pairs)
        )
        # the selection is scored once per (teacher, teacher layers) and shared by the variants
        work = cache / "diagnosis" / Path(kit.teacher_dir).name / pairs
        result = Experiment(kit, budget, work, progress=args.progress).run(
            get_method(variant.method), 0, run_name=variant.name
        )
        store.write(TASK, variant.name, 0, {**result, "change": variant.change})
        print(f"{variant.name}: {result['metrics']} ({result['train_seconds']:.0f} s)", flush=True)
        write_report(store, command)
    freed = remove_teacher_outputs(cache / "diagnosis")
    print(f"removed the stored teacher outputs ({freed / 2**30:.1f} GiB)")
    print(write_report(store, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
