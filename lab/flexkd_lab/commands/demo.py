"""``flexkd demo``: the end-to-end Flex-KD demo on the bundled Debian data (classification).

Fine-tunes (or reuses the cached) MiniLM teacher, scores its dims by |grad x activation|, keeps the top
k (k = the student's hidden size), and distills the same student three ways under the same budget:
Flex-KD (the paper's correlation loss on the selected dims), a trained linear projector (same loss), and
no feature KD, each with the layer pair and feature weight the study's tuning chose.
Writes a run folder with the table (markdown and JSON), the sorted-importance plot with k marked and
the learning curves of every loss term, and prints a per-stage timing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HELP = "the end-to-end demo on the bundled data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=None, help="run folder (default: runs/demo-<timestamp>)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the students' initialisation and data order"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a tiny slice and tiny models (seconds; for tests)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the fine-tuned teacher is cached (default: $FLEXKD_CACHE or ~/.cache/flexkd)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide progress bars"
    )


def run(args: argparse.Namespace) -> int:
    if args.seed < 0:
        print("flexkd demo: error: --seed must be >= 0", file=sys.stderr)
        return 2
    from flexkd_lab.experiments.demo import run_demo

    out = args.out if args.out is not None else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    cache_dir = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    try:
        report = run_demo(
            out, seed=args.seed, quick=args.quick, cache_dir=cache_dir, progress=args.progress
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"flexkd demo: error: {error}", file=sys.stderr)
        return 2
    print()
    print(report.table_markdown)
    print()
    print("time per stage:")
    print(report.timing_table)
    print()
    print(f"run folder: {out}")
    return 0


def default_cache_dir() -> Path:
    return Path(os.environ.get("FLEXKD_CACHE", Path.home() / ".cache" / "flexkd"))
