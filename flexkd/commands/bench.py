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

from flexkd.bench import options


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
    options.add_shape_arguments(
        parser,
        shapes=f"cpu: the sweep's, or --quick's; cuda: N={options.GPU_DEFAULT_N} "
        f"D={options.GPU_DEFAULT_D} k={options.GPU_DEFAULT_K}",
        dtypes=f"cpu: fp32,bf16; cuda: {options.GPU_DEFAULT_DTYPES}",
    )
    options.add_cpu_arguments(
        parser.add_argument_group("--device cpu"),
        out_default=options.CPU_DEFAULT_OUT,
        shapes=False,
    )
    options.add_gpu_arguments(parser.add_argument_group("--device cuda"), shapes=False)
    options.add_linear_logit_kd_arguments(parser.add_argument_group("--suite linear_logit_kd"))


def run(args: argparse.Namespace) -> int:
    """Imports the benchmark that runs (they import torch), not the others."""
    if args.suite == "linear_logit_kd":
        from flexkd.bench import linear_logit_kd

        return linear_logit_kd.run(args)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        from flexkd.bench import ops_gpu

        return ops_gpu.run(args)
    from flexkd.bench import ops_cpu

    return ops_cpu.run(args)
