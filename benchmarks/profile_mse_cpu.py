"""Where the CPU mse fwd+bwd time goes: the fused kernel alone, the op under autograd, its backward,
a bare allocation of the gradient and the copy the bytes floor is measured with, in one run.

    python benchmarks/profile_mse_cpu.py                       # N=8192 D=2048 k=768, 1 and 2 threads
    python benchmarks/profile_mse_cpu.py --threads 1 --dtypes bf16 --layouts strided

Per dtype, teacher layout (contiguous, or a column slice of a [N, 2D] tensor) and thread count:
  kernel    torch.ops.flexkd.feature_loss_fwd with student_grad=True, no autograd: the C++ pass alone
  fwd       flex_feature_loss under autograd (validation, dispatch, the autograd node)
  bwd       loss.backward() after an untimed forward
  fwd+bwd   both
  alloc     torch.empty of the gradient and one write per 4 KiB page (the page faults of a new buffer)
  floor     the bytes floor of flexkd.bench.ops_cpu (copy bandwidth at the op's size)
and the minor page faults per fwd+bwd call. Medians of repeated calls (flexkd.bench.common).
On one thread also ``kernel cpu / copy cpu``: the lower quartile of the thread CPU time of the kernel
over that of a copy of the floor's bytes, which time spent descheduled on a loaded machine does not
inflate (cache and memory contention still does).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import time

import torch

from flexkd.bench import common, ops_cpu
from flexkd.ops import flex_feature_loss


def page_faults(fn, reps: int = 5) -> float:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(reps):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / reps


def cpu_ms(fn, reps: int = 40) -> float:
    """Lower quartile of the calling thread's CPU milliseconds per call of ``fn``."""
    fn()
    times = []
    for _ in range(reps):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return sorted(times)[reps // 4] * 1e3


def profile(dtype: str, layout: str, n: int, d: int, k: int) -> dict[str, float]:
    case = ops_cpu.Case("mse", dtype, n, d, k, layout)
    x = ops_cpu.make_inputs(case)
    s, t, i, m = x.student, x.teacher, x.index, x.mask
    floor = ops_cpu.floor_bytes(case, x)

    def kernel():
        return torch.ops.flexkd.feature_loss_fwd(s.detach(), t, i, m, "mse", "mean", 1e-6, True, False)

    def forward():
        s.grad = None
        return flex_feature_loss(s, t, i, m, backend="cpu")

    def forward_backward():
        forward().backward()

    def alloc():
        g = torch.empty(n, k, dtype=s.dtype)
        g.view(-1)[:: 4096 // g.element_size()] = 0
        return g

    # The copy's source must hold written pages: a fresh torch.empty reads the kernel's shared zero
    # page from cache, which made this ratio 1.3-1.5x too high before.
    copy = common.copy_of(floor)
    one_thread = torch.get_num_threads() == 1
    cpu_ratio = cpu_ms(kernel) / cpu_ms(copy) if one_thread else math.nan
    return {
        "kernel cpu / copy cpu": cpu_ratio,
        "kernel": common.median_ms(kernel),
        "fwd": common.median_ms(forward),
        "bwd": common.median_ms(lambda loss: loss.backward(), setup=forward),
        "fwd+bwd": common.median_ms(forward_backward),
        "alloc": common.median_ms(alloc),
        "floor": floor / (common.copy_bandwidth_gbs(floor) * 1e9) * 1e3,
        "faults/call": page_faults(forward_backward),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--k", type=int, default=768)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--layouts", default="contiguous,strided")
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}")
    columns = ("kernel", "fwd", "bwd", "fwd+bwd", "alloc", "floor", "faults/call", "kernel cpu / copy cpu")
    print("| dtype | teacher | threads | " + " | ".join(columns) + " | fwd+bwd / floor |")
    print("|---" * (len(columns) + 4) + "|")
    for threads in (int(v) for v in args.threads.split(",")):
        torch.set_num_threads(threads)
        for dtype in args.dtypes.split(","):
            for layout in args.layouts.split(","):
                r = profile(dtype, layout, args.n, args.d, args.k)
                cells = " | ".join(f"{r[c]:.2f}" for c in columns)
                print(f"| {dtype} | {layout} | {threads} | {cells} | {r['fwd+bwd'] / r['floor']:.2f}x |",
                      flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
