"""How much of mse fwd+bwd's distance to its bytes floor is page faults on the fresh student gradient.

One process, one thread: ``flex_feature_loss`` mse fwd+bwd at N=8192, D=2048, k=768 (float mask, a leaf
student whose ``.grad`` is dropped each call, as a training step frees it), its minor page faults per
call, and a tensor copy that moves the same bytes as the floor (student read, teacher read, gradient
written). ``--keep-freed-memory`` first makes glibc keep freed memory (``flexkd.bench.common``), so the
gradient lands in pages already mapped. Run both ways alternately; one run per process:

    for i in 1 2 3 4; do for flag in "" --keep-freed-memory; do
      OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/grad_faults_probe.py --dtype bf16 $flag; done; done
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from flexkd.bench import common
from flexkd.ops import flex_feature_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn, reps: int) -> tuple[float, float]:
    """(median ms, minor faults per call) over ``reps`` calls after 3 untimed ones."""
    for _ in range(3):
        fn()
    times, faults = [], minor_faults()
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, (minor_faults() - faults) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--k", type=int, default=768)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--keep-freed-memory", action="store_true")
    args = parser.parse_args()
    if args.keep_freed_memory:
        common.keep_freed_memory()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    student = torch.randn(args.n, args.k, dtype=dtype, requires_grad=True)
    teacher = torch.randn(args.n, args.d, dtype=dtype)
    index = torch.randperm(args.d)[: args.k].sort().values
    mask = torch.ones(args.n)

    def fwd_bwd():
        student.grad = None
        flex_feature_loss(student, teacher, index, mask).backward()

    floor_bytes = args.n * (2 * args.k + args.d) * dtype.itemsize
    op_ms, op_faults = timed(fwd_bwd, args.reps)
    copy_ms, copy_faults = timed(common.copy_of(floor_bytes), args.reps)
    allocator = "keeping freed memory" if args.keep_freed_memory else "default"
    print(f"{args.dtype} N={args.n} D={args.d} k={args.k}, glibc {allocator}: fwd+bwd {op_ms:.2f} ms "
          f"({op_faults:.0f} faults/call), copy of the floor's bytes {copy_ms:.2f} ms ({copy_faults:.0f}); "
          f"x copy {op_ms / copy_ms:.2f}")


if __name__ == "__main__":
    main()
