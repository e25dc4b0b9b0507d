"""``flexkd teacher TASK --out PATH``: the fine-tuned teacher of a bundled task, in a folder of your choice.

Fine-tunes the task's teacher once (the same cache entry as ``flexkd demo`` and ``flexkd study``, so a
demo run makes it too) and copies it (``save_pretrained`` weights, tokenizer, ``flexkd_teacher.json``) to
``--out``, the path a config's ``model.teacher`` names, e.g. ``examples/debian_sections.yaml``'s
``runs/teachers/minilm-sections``. ``--pair`` picks a debian-sections teacher (``demo``, the default;
the study's ``minilm-tiny`` or ``mpnet-minilm``, whose report also holds the test accuracy and the
unigram-LR baseline on the same tokens). ``--quick`` makes a 2-step fine-tune on a tiny slice instead
(seconds; for tests; a real MiniLM, but barely trained).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HELP = "fine-tune (once, cached) a bundled task's teacher and copy it to a folder"
TASKS = ("debian-sections", "debian-synopsis")  # flexkd_lab.experiments.kits.TASK_METRICS
PAIR_NAMES = ("demo", "minilm-tiny", "mpnet-minilm")  # flexkd_lab.tasks.pairs.PAIRS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=TASKS, help="the bundled task")
    parser.add_argument(
        "--out", type=Path, required=True, help="folder to write the teacher to (replaced)"
    )
    parser.add_argument(
        "--pair",
        default="demo",
        choices=PAIR_NAMES,
        help="debian-sections: the teacher -> student pair whose teacher to make (default: the demo's; "
        "minilm-tiny and mpnet-minilm are the study's, trained to their full recipes)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a 2-step fine-tune on a tiny slice (seconds; for tests)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where fine-tuned teachers are cached (default: $FLEXKD_CACHE or ~/.cache/flexkd)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide progress bars"
    )


def run(args: argparse.Namespace) -> int:
    from flexkd._io import apply_umask, replace_dir
    from flexkd_lab.commands.demo import default_cache_dir
    from flexkd_lab.experiments.budget import demo_budget
    from flexkd_lab.experiments.kits import cached_teacher, quiet_transformers

    quiet_transformers()
    cache_dir = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    try:
        _, cached = cached_teacher(
            args.task,
            cache_dir=cache_dir,
            pair=args.pair if args.task == "debian-sections" else "demo",
            quick=args.quick,
            eval_limit=demo_budget(quick=True).eval_examples,
            progress=args.progress,
        )
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:
        print(f"flexkd teacher: error: {error}", file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    shutil.copytree(cached.path, tmp, dirs_exist_ok=True)
    replace_dir(apply_umask(tmp), out)
    metrics = ", ".join(
        f"{name} {value:.3f}"
        for name, value in cached.report.get("validation", {}).items()
        if isinstance(value, float)
    )
    made = "reused the cached" if cached.reused else "fine-tuned the"
    print(f"{made} {args.task} teacher{' (quick)' if args.quick else ''}: {out}")
    if metrics:
        print(f"  validation: {metrics}")
    for split in ("validation", "test"):
        teacher = cached.report.get(split if split == "test" else "validation", {}).get("accuracy")
        baseline = cached.report.get("baseline", {}).get(split, {}).get("accuracy")
        if teacher is not None and baseline is not None:
            verdict = "beats" if teacher > baseline else "does NOT beat"
            print(f"  {split} accuracy {teacher:.3f} {verdict} the unigram LR on its tokens ({baseline:.3f})")
    return 0
