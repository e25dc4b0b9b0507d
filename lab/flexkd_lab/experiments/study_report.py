"""The study's report, rebuilt from the stored runs: ``study.md``, ``study.json``, ``study-headline.md`` (the
README's headline table), the accuracy bars with 95 % intervals, the task-loss curves and the teacher check.

Every sentence about a comparison is generated from its interval and its Holm-corrected McNemar test
(:func:`flexkd_lab.experiments.stats.verdict`), so the words never claim more than the numbers.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from flexkd._io import write_json, write_text
from flexkd_lab.experiments.methods import DECISIVE_COMPARISONS, VARIANT_COMPARISONS, get_method
from flexkd_lab.experiments.plots import (
    plot_learning_curves,
    plot_mean_std_bars,
    plot_teacher_check,
)
from flexkd_lab.experiments.stats import Comparison, compare_family, mean_interval
from flexkd_lab.experiments.store import ResultStore
from flexkd_lab.experiments.study import (
    REFERENCES,
    TASK,
    TEACHER_CHECK,
    Run,
    StudyPlan,
    decode_labels,
    grid_choice,
    grid_scores,
    read_run,
    store_has,
    teacher_check_table,
)
from flexkd_lab.experiments.tables import METRIC_HEADERS, markdown_table

METRICS = ("accuracy", "macro_f1")


def write_report(
    out_dir: Path, plan: StudyPlan, store: ResultStore, command: str
) -> dict[str, Any]:
    """Rewrite every report file from the finished results; returns ``study.json``'s content."""
    sections = ["# Flex-KD quality study", ""]
    headline = ["| pair | method | test accuracy (95 % CI) | seeds |", "|---|---|---|---|"]
    summary: dict[str, Any] = {"command": command, "task": TASK, "pairs": {}}
    done = planned = 0
    bars, checks = [], []
    for pair in plan.pairs:
        part = pair_summary(plan, store, pair)
        summary["pairs"][pair] = part
        done += part["finished_runs"]
        planned += part["planned_runs"]
        sections += pair_section(plan, pair, part)
        headline += [
            f"| {pair} | {row['label']} | {row['accuracy']} | {row['seeds']} |"
            for row in part["methods"]
        ]
        headline += [
            f"| {pair} | *{c['label']}* | {c['sentence']} | {c['seeds']} |"
            for c in part["comparisons"] + part["variant_comparisons"]
        ]
        if part["methods"]:
            bars.append((f"{pair}: test accuracy (95 % CI)", part["methods"], "accuracy"))
            curves = {row["label"]: row["curve"] for row in part["methods"] if row["curve"]}
            if curves:
                plot_learning_curves(
                    curves, out_dir / f"study-curves-{pair}.png", title=f"{pair} (mean over seeds)"
                )
        if part.get("teacher_check"):
            check = part["teacher_check"]
            checks.append((pair, check["table"], check["intact"], "accuracy"))
    summary["finished_runs"], summary["planned_runs"] = done, planned
    stamp = time.strftime("%Y-%m-%d %H:%M %Z")
    sections[1:1] = [
        "",
        f"Made by `{command}`; {done} of {planned} planned runs finished (last update {stamp}). "
        f"Task {TASK}; every method is tuned on the same validation grid and reported on the test split "
        "as the mean over seeds ± the half-width of its 95 % t interval.",
    ]
    write_text(out_dir / "study.md", "\n".join(sections) + "\n")
    write_text(out_dir / "study-headline.md", "\n".join(headline) + "\n")
    write_json(out_dir / "study.json", summary)
    if bars:
        plot_mean_std_bars(bars, out_dir / "study.png", error="ci")
    if checks:
        plot_teacher_check(checks, out_dir / "teacher_check.png")
    return summary


def pair_summary(plan: StudyPlan, store: ResultStore, pair: str) -> dict[str, Any]:
    """The grid, the chosen knobs, per-method means with intervals and the comparisons of one pair."""
    group = plan.group(pair)
    grid = grid_scores(plan, store, pair)
    choice = grid_choice(plan, store, pair)
    grid_runs = plan.grid_runs(pair)
    grid_done = sum(store_has(store, plan, r) for r in grid_runs)
    part: dict[str, Any] = {
        "group": group,
        "budget": plan.budget(pair).to_dict(),
        "grid": {
            "points": plan.grid(pair).points(),
            "seeds": list(plan.grid(pair).seeds),
            "validation_accuracy": {m: [v for _, v in points] for m, points in grid.items()},
        },
        "choice": choice,
        "methods": [],
        "comparisons": [],
        "variant_comparisons": [],
        "finished_runs": grid_done,
        "planned_runs": len(grid_runs),
    }
    check_run = Run(pair, TEACHER_CHECK, None, 0)
    if plan.teacher_check and store_has(store, plan, check_run):
        part["teacher_check"] = teacher_check_summary(read_run(store, plan, check_run))
    if choice is None:
        return part
    finals = plan.final_runs(pair, choice)
    records: dict[str, dict[int, dict[str, Any]]] = {}
    for run in finals:
        if store_has(store, plan, run):
            records.setdefault(run.method, {})[run.seed] = read_run(store, plan, run)
    extra = [r for r in finals if r not in grid_runs]
    part["planned_runs"] += len(extra)
    part["finished_runs"] += sum(store_has(store, plan, r) for r in extra)
    # one description per teacher: runs are of one teacher when they name the same cached teacher (its
    # recipe key; the group's teacher.json holds its weights' hash), although the description a run
    # records also says how long that teacher took to train where the run found it made
    teachers: dict[str, str] = {}
    for r in sorted((r for by_seed in records.values() for r in by_seed.values()), key=lambda r: r.get("teacher", "")):
        teachers.setdefault(r.get("teacher_key") or r.get("teacher", ""), r.get("teacher", ""))
    part["teachers"] = [t for t in teachers.values() if t]
    for name in plan.methods:
        if name in records:
            part["methods"].append(method_row(name, records[name], choice))
    references_path = store.root / group / REFERENCES
    if references_path.is_file():
        references = decode_labels(json.loads(references_path.read_text(encoding="utf-8"))["test"])
        metric = {
            m: {s: r["metrics"]["accuracy"] for s, r in by_seed.items()}
            for m, by_seed in records.items()
        }
        predictions = {
            m: {s: decode_labels(r["splits"]["test"]["predictions"]) for s, r in by_seed.items()}
            for m, by_seed in records.items()
        }
        for key, family in (("comparisons", DECISIVE_COMPARISONS), ("variant_comparisons", VARIANT_COMPARISONS)):
            pairs = [(a, b) for a, b in family if a in plan.methods and b in plan.methods]
            part[key] = [comparison_row(c) for c in compare_family(pairs, metric, predictions, references)]
    return part


def method_row(
    name: str, by_seed: dict[int, dict[str, Any]], choice: dict[str, Any]
) -> dict[str, Any]:
    method = get_method(name)
    runs = [by_seed[s] for s in sorted(by_seed)]
    row: dict[str, Any] = {
        "method": name,
        "label": method.label,
        "knobs": "" if method.feature == "none" else _knobs_text(choice[method.tuned_as]),
        "seeds": len(runs),
        "seed_list": sorted(by_seed),
        "cpu_seconds": statistics.fmean(r.get("thread_seconds", 0.0) for r in runs),
        "curve": mean_curve([r.get("curve", []) for r in runs]),
    }
    for split, metrics in (("test", METRICS), ("validation", ("accuracy",))):
        for metric in metrics:
            values = [r["splits"][split]["metrics"][metric] for r in runs]
            key = metric if split == "test" else f"validation_{metric}"
            row[f"{key}_mean"] = statistics.fmean(values)
            if len(values) >= 2:
                interval = mean_interval(values)
                half = (interval.high - interval.low) / 2
                row[f"{key}_ci"] = half
                row[key] = f"{interval.mean:.3f} ± {half:.3f}"
            else:
                row[f"{key}_ci"] = 0.0
                row[key] = f"{values[0]:.3f} (1 seed, no interval)"
    return row


def comparison_row(c: Comparison) -> dict[str, Any]:
    d = c.difference
    return {
        "a": c.a,
        "b": c.b,
        "label": f"{get_method(c.a).label} − {get_method(c.b).label}",
        "seeds": len(c.seeds),
        "difference": 100 * d.mean,
        "ci_low": 100 * d.low,
        "ci_high": 100 * d.high,
        "interval": f"{100 * d.mean:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]",
        "only_a": c.test.only_a,
        "only_b": c.test.only_b,
        "discordant": f"{c.test.only_a} / {c.test.only_b}",
        "p": c.test.p_value,
        "holm_p": c.holm_p,
        "test": "exact" if c.test.exact else "chi-square",
        "sentence": c.sentence,
    }


def mean_curve(curves: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The seeds' (compacted) loss curves averaged point by point, over the points all of them have."""
    curves = [c for c in curves if c]
    if not curves:
        return []
    out = []
    for points in zip(*curves, strict=False):
        entry: dict[str, Any] = {"step": points[0]["step"]}
        for term in ("task", "logit", "feature", "total"):
            if all(term in p for p in points):
                entry[term] = statistics.fmean(p[term] for p in points)
        out.append(entry)
    return out


def pair_section(plan: StudyPlan, pair: str, part: dict[str, Any]) -> list[str]:
    from flexkd_lab.tasks.pairs import get_pair

    b = plan.budget(pair)
    grid = plan.grid(pair)
    lines = [
        f"## {pair}: {get_pair(pair).description}",
        "",
        f"Budget per run (every method): {b.steps} steps x {b.batch_size} rows from {b.train_examples} train "
        f"rows{' (length-grouped batches)' if b.group_by_length else ''}, lr {b.lr}, warm-up {b.warmup_steps}, loss weights task {b.weights['task']:g} / logit "
        f"{b.weights['logit']:g}, T = {b.temperature}; scored on {b.score_examples} rows; validation and "
        f"test evaluated on up to {b.eval_examples} rows each. Results in `study-runs/{part['group']}`.",
        "",
    ]
    if part.get("teachers"):
        note = (
            "Teacher: " if len(part["teachers"]) == 1 else "**Mixed teachers** (not comparable): "
        )
        lines += [note + "; ".join(part["teachers"]) + ".", ""]
    columns = [("method", "method")] + [
        (str(i), _knobs_text(knobs)) for i, knobs in enumerate(grid.points())
    ]
    rows = []
    for method, values in part["grid"]["validation_accuracy"].items():
        row: dict[str, Any] = {"method": get_method(method).label}
        for i, value in enumerate(values):
            row[str(i)] = value
        rows.append(row)
    lines += [
        f"### Validation grid (mean validation accuracy over seeds {', '.join(map(str, grid.seeds))}; "
        "columns: layer pairing; feature weight)",
        "",
        markdown_table(rows, columns),
        "",
    ]
    if not part["methods"]:
        return lines + [
            "_the grid has not finished: no method has run at its chosen knobs yet_",
            "",
        ]
    lines += [
        "### Test split (mean ± 95 % CI half-width over seeds)",
        "",
        markdown_table(
            part["methods"],
            [
                ("label", "method"),
                ("knobs", "chosen layers; feature weight"),
                ("seeds", "seeds"),
                ("accuracy", "test accuracy"),
                ("macro_f1", METRIC_HEADERS["macro_f1"]),
                ("validation_accuracy", "validation accuracy"),
                ("cpu_seconds", "CPU s / run"),
            ],
        ),
        "",
        f"Task-loss curves: `study-curves-{pair}.png`.",
        "",
    ]
    titles = {
        "comparisons": "### Decisive comparisons",
        "variant_comparisons": "### flexkd's variant against its parents (ours, not the paper's; its own family)",
    }
    for key, title in titles.items():
        if not part[key]:
            continue
        lines += [
            f"{title} (test accuracy, points; paired over seeds; McNemar on the pooled "
            "per-example predictions, Holm-corrected across the family)",
            "",
            markdown_table(
                part[key],
                [
                    ("label", "comparison"),
                    ("seeds", "seeds"),
                    ("interval", "Δ [95 % CI]"),
                    ("discordant", "only a right / only b right"),
                    ("p", "McNemar p"),
                    ("holm_p", "Holm p"),
                ],
                digits=4,
            ),
            "",
            *[f"- **{c['label']}**: {c['sentence']}." for c in part[key]],
            "",
        ]
    if part.get("teacher_check"):
        check = part["teacher_check"]
        lines += [
            f"### Teacher check (accuracy with dims zeroed at one layer; k = {check['k']} of "
            f"{check['hidden_size']}, scored by {check['stat']}); intact {check['intact']:.3f}",
            "",
            markdown_table(
                check["table"],
                [
                    ("layer", "layer"),
                    ("mass", "top-k mass"),
                    ("top", f"zero top-{check['k']}"),
                    ("random", f"zero random {check['k']}"),
                    ("bottom", f"zero bottom-{check['k']}"),
                    ("lowest", f"zero lowest {check['hidden_size'] // 2} (half)"),
                ],
            ),
            "",
        ]
    return lines


def teacher_check_summary(check: dict[str, Any], metric: str = "accuracy") -> dict[str, Any]:
    intact = next(r for r in check["rows"] if r["layer"] is None)
    return {
        "k": check["k"],
        "hidden_size": check["hidden_size"],
        "stat": check["stat"],
        "intact": intact[metric],
        "table": teacher_check_table(check, metric),
        "rows": check["rows"],
    }


def _knobs_text(knobs: dict[str, Any]) -> str:
    pairs = knobs["layer_pairs"]
    where = "last" if pairs == "last" else ", ".join(f"{s}<->{t}" for s, t in pairs)
    return f"{where}; {knobs['feature_weight']:g}"
