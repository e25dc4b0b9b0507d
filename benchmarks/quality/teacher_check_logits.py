"""The teacher check at the logit level: how far zeroing the top-k / random / bottom-k dims at a layer
moves the teacher's class distribution, not only its accuracy.

The study's teacher check reports accuracy, which is blunt at the last layer (zeroing half of h_CLS
there leaves 95 % of the predictions as they were). This measures, on the same rows, the mean
KL(intact || zeroed) of the class distributions with a 95 % interval over rows, the share of rows whose
prediction changes, and the accuracy.

    python benchmarks/quality/teacher_check_logits.py                 # layers 5 and 6 of the minilm-tiny teacher
    python benchmarks/quality/teacher_check_logits.py --layers 1 2 3 4 5 6

It needs the study's cached teacher (``--cache-dir``, default ``$FLEXKD_CACHE`` or ``~/.cache/flexkd``;
a missing teacher is trained first, ~35 min) and scores the teacher's layers on the study's scoring
rows as the study's check does. Writes ``teacher_check_logits-<pair>.{json,md}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results"


def logit_shift(intact: torch.Tensor, zeroed: torch.Tensor) -> dict[str, float]:
    """Mean KL(intact || zeroed) over rows (nats) with its 95 % t interval half-width, and the share of
    rows whose argmax changes."""
    log_p, log_q = intact.log_softmax(-1), zeroed.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).double()
    n = kl.numel()
    half = 1.96 * float(kl.std()) / math.sqrt(n) if n > 1 else float("nan")
    changed = (intact.argmax(-1) != zeroed.argmax(-1)).double().mean()
    return {"kl_mean": float(kl.mean()), "kl_ci95": half, "changed": float(changed)}


def main(argv: list[str] | None = None) -> dict:
    import flexkd
    from flexkd.adapters import get_adapter
    from flexkd_lab.experiments.kits import pair_task, quiet_transformers
    from flexkd_lab.experiments.study import TASK, StudyPlan, _Experiments
    from flexkd_lab.experiments.teacher_check import run_teacher_check

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", default="minilm-tiny")
    parser.add_argument("--layers", type=int, nargs="+", default=[5, 6])
    default_cache = Path(os.environ.get("FLEXKD_CACHE", Path.home() / ".cache" / "flexkd"))
    parser.add_argument("--cache-dir", type=Path, default=default_cache)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="the study's tiny --quick models (tests)")
    args = parser.parse_args(argv)

    quiet_transformers()
    plan = StudyPlan(pairs=(args.pair,), quick=args.quick)
    experiment = _Experiments(plan, args.cache_dir / "study", args.cache_dir, progress=False)[
        args.pair
    ]
    budget, kit = experiment.budget, experiment.kit
    teacher = kit.load_teacher().eval()
    k = kit.student_hidden_size
    layers = list(range(1, get_adapter(teacher).num_layers + 1))
    selection = flexkd.score(teacher, experiment.score_batches(), layers=layers, k=k, progress=False)
    task = pair_task(TASK, args.pair, quick=args.quick)
    options = {"reader": "teacher"} if getattr(task, "own_teacher_ids", False) else {}

    intact: dict = {}

    def evaluate(model) -> dict[str, float]:
        """Accuracy and, after the first (intact) call, the logit shift from the intact teacher."""
        out = task.evaluate(
            model, budget.eval_split, limit=budget.eval_examples, return_logits=True, **options
        )
        if not intact:
            intact.update(out)
            return {"accuracy": out["accuracy"]}
        return {"accuracy": out["accuracy"], **logit_shift(intact["logits"], out["logits"])}

    started = time.perf_counter()
    scores = {layer: selection.scores(layer) for layer in args.layers}
    rows = run_teacher_check(teacher, scores, k, evaluate)
    for row in rows:
        row.pop("dims_zeroed")
    report = {
        "pair": args.pair,
        "teacher": Path(kit.teacher_dir).name,
        "split": budget.eval_split,
        "rows_evaluated": intact["n"],
        "k": k,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"teacher_check_logits-{args.pair}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"Teacher check at the logit level, {args.pair} teacher `{report['teacher']}`, "
        f"{report['rows_evaluated']} {report['split']} rows, k = {k} "
        f"(`python benchmarks/quality/teacher_check_logits.py`, {report['seconds']:.0f} s). "
        "KL(intact || zeroed) of the class distributions in nats, mean ± 95 % interval over rows; "
        "changed = share of rows whose prediction changes.",
        "",
        "| layer | zeroed | accuracy | KL | changed |",
        "|---|---|---|---|---|",
        f"| – | nothing (intact) | {intact['accuracy']:.3f} | 0 | 0 |",
    ]
    for row in rows[1:]:
        lines.append(
            f"| {row['layer']} | {row['condition'].removeprefix('zero ')} | {row['accuracy']:.3f} | "
            f"{row['kl_mean']:.3f} ± {row['kl_ci95']:.3f} | {row['changed']:.3f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
