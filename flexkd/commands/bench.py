"""``flexkd bench``: the op microbenchmarks, flexkd's kernels against the formula a user writes for
each op (``flexkd.bench.user_formulas``), eager and under ``torch.compile``, in one run.

``--device cpu`` runs the CPU benchmark (``flexkd.bench.ops_cpu``: a sweep of shapes, the target
shapes with ``--quick``, small N with ``--small-n``; writes PREFIX.csv and, with matplotlib,
PREFIX.png), ``--device cuda`` the GPU one (``flexkd.bench.ops_gpu``: one shape, default N=16384
D=4096 k=2048). The default is cuda when a
CUDA device is visible, else cpu. ``--n/--d/--k/--dtypes`` apply to both; each group's other options
apply to that device only.
"""

from __future__ import annotations

import argparse

from flexkd.bench import common, ops_cpu, ops_gpu
from flexkd.bench import linear_logit_kd as linear_logit_kd_bench


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--suite",
        choices=("ops", "linear_logit_kd"),
        default="ops",
        help="ops: the feature-loss/importance op benchmarks (default); linear_logit_kd: the fused "
        "linear + logit-KD op against the materialised path (CPU; takes --quick, --n, --dtypes)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="which benchmark to run (default: cuda if a CUDA device is visible, else cpu)",
    )
    common.add_shape_arguments(
        parser,
        shapes=f"cpu: the sweep's, or --quick's; cuda: N={ops_gpu.DEFAULT_N} D={ops_gpu.DEFAULT_D} "
        f"k={ops_gpu.DEFAULT_K}",
        dtypes=f"cpu: fp32,bf16; cuda: {ops_gpu.DEFAULT_DTYPES}",
    )
    ops_cpu.add_arguments(
        parser.add_argument_group("--device cpu"),
        out_default=ops_cpu.DEFAULT_OUT,
        shapes=False,
    )
    ops_gpu.add_arguments(parser.add_argument_group("--device cuda"), shapes=False)
    linear_logit_kd_bench.add_arguments(parser.add_argument_group("--suite linear_logit_kd"))


def run(args: argparse.Namespace) -> int:
    if args.suite == "linear_logit_kd":
        return linear_logit_kd_bench.run(args)
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return ops_gpu.run(args) if device == "cuda" else ops_cpu.run(args)
