"""The command-line options of the benchmarks, and the defaults their help shows, without importing torch:
``flexkd bench --help`` builds its parser from this module alone. The benchmark modules
(``ops_cpu``, ``ops_gpu``, ``linear_logit_kd``) import their options and defaults from here."""

from __future__ import annotations

import argparse
from pathlib import Path

# ops_cpu
CPU_SMALL_N = (64, 512, 4096, 32768)
CPU_LAYOUTS = ("contiguous", "strided")
CPU_DEFAULT_OUT = Path("flexkd-bench") / "ops_cpu"  # relative to the working directory
CPU_IMPLS = ("flexkd", "user-eager", "user-compile", "ref-eager", "ref-compile")
CPU_DEFAULT_IMPLS = "flexkd,user-eager,user-compile"
# ops_gpu (GPU_DTYPES: the keys of ops_gpu.DTYPES)
GPU_DEFAULT_N, GPU_DEFAULT_D, GPU_DEFAULT_K, GPU_DEFAULT_DTYPES = 16384, 4096, 2048, "bf16,fp32"
GPU_DTYPES = ("bf16", "fp32", "fp16")
GPU_DRY_RUN_SHAPE = (64, 32, 8)  # N, D, k of --dry-run
# linear_logit_kd
KD_DEFAULT_OUT = Path("flexkd-bench") / "linear_logit_kd"
KD_IMPLS = ("fused", "fused-triton", "eager", "compile", "liger")
KD_DEFAULT_IMPLS = "fused,eager,compile"


def add_shape_arguments(parser: argparse.ArgumentParser, *, shapes: str,
                        dtypes: str) -> None:
    """``--n``, ``--d``, ``--k`` and ``--dtypes`` (all default None, which means the benchmark's own
    defaults, described by ``shapes`` and ``dtypes`` in the help)."""
    parser.add_argument("--n", type=int, default=None, help=f"rows (tokens); default shapes: {shapes}")
    parser.add_argument("--d", type=int, default=None, help="teacher hidden size")
    parser.add_argument("--k", type=int, default=None, help="student hidden size (selected dims)")
    parser.add_argument("--dtypes", default=None, help=f"comma list of dtypes (default: {dtypes})")


def add_cpu_arguments(parser: argparse.ArgumentParser, *, out_default: Path, shapes: bool = True) -> None:
    """The CPU benchmark's options; ``shapes=False`` leaves out ``--n/--d/--k/--dtypes`` (added once
    by :func:`add_shape_arguments` where the GPU benchmark's options are added too)."""
    parser.add_argument("--quick", action="store_true", help="only the target shapes")
    parser.add_argument("--small-n", action="store_true",
                        help=f"N in {{{', '.join(map(str, CPU_SMALL_N))}}} instead of the sweep's or --quick's")
    parser.add_argument("--filter", default="", help="regex over case names, e.g. 'mse-fp32-N8192'")
    parser.add_argument("--ops", default="mse,corr,importance", help="comma list of mse,corr,importance")
    if shapes:
        add_shape_arguments(parser, shapes="the sweep's, or --quick's", dtypes="fp32,bf16")
    parser.add_argument("--layouts", default=",".join(CPU_LAYOUTS),
                        help="teacher layouts of the loss cases, comma list of contiguous,strided "
                        "(strided: a column slice of a [N, 2D] tensor)")
    parser.add_argument("--impls", default=CPU_DEFAULT_IMPLS,
                        help=f"comma list of {','.join(CPU_IMPLS)} (flexkd required; default {CPU_DEFAULT_IMPLS})")
    parser.add_argument("--threads", default=None,
                        help="comma list of torch thread counts, each case runs at each (default: torch's)")
    parser.add_argument("--copy-gib", type=float, default=2.0,
                        help="size of the copy whose bandwidth the header reports (0: skip it)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory (no mmap per large block, no heap trimming), as jemalloc "
                        "or tcmalloc do: fresh outputs then reuse mapped pages instead of faulting them in")
    parser.add_argument("--out", type=Path, default=out_default,
                        help=f"output prefix: writes PREFIX.csv and PREFIX.png (default: {out_default})")


def add_gpu_arguments(parser: argparse.ArgumentParser, *, shapes: bool = True) -> None:
    """The GPU benchmark's options; ``shapes=False`` leaves out ``--n/--d/--k/--dtypes`` (added once
    by :func:`add_shape_arguments` where the CPU benchmark's options are added too)."""
    if shapes:
        add_shape_arguments(parser, shapes=f"N={GPU_DEFAULT_N} D={GPU_DEFAULT_D} k={GPU_DEFAULT_K}",
                            dtypes=f"{GPU_DEFAULT_DTYPES}; any of {','.join(GPU_DTYPES)}")
    parser.add_argument("--iters", type=int, default=20, help="calls per timed batch")
    parser.add_argument(
        "--reps", type=int, default=7, help="timed batches (the median is reported)"
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed calls first (compiles, caches)"
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"the pipeline on the CPU at N,D,k={GPU_DRY_RUN_SHAPE} (checks the script; numbers mean nothing)",
    )


def add_linear_logit_kd_arguments(parser) -> None:
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary V (one case with --n/--hidden)")
    parser.add_argument("--hidden", type=int, default=None, help="student hidden size H")
    parser.add_argument("--kd-impls", default=KD_DEFAULT_IMPLS,
                        help=f"comma list of {','.join(KD_IMPLS)} (fused-triton: the op's Triton kernels, on CUDA or under TRITON_INTERPRET=1; liger: Liger-Kernel's fused linear JSD, CUDA only)")
    parser.add_argument("--kd-device", default="cpu", choices=("cpu", "cuda"), help="where the tensors live")
    parser.add_argument("--kd-reps", type=int, default=3, help="timed fwd+bwd calls per case and path")
    parser.add_argument("--kd-kinds", default="forward_kl", help="comma list of forward_kl,reverse_kl,jsd")
    parser.add_argument("--kd-topk", type=int, default=0, help="K > 0: a top-K teacher instead of dense logits")
    parser.add_argument("--kd-out", type=Path, default=KD_DEFAULT_OUT,
                        help=f"output prefix: writes PREFIX.csv (default: {KD_DEFAULT_OUT})")  # fmt: skip
