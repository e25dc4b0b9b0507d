"""Thread CPU time of the C++ corr kernel, fwd+bwd, N=8192 D=2048 k=768, 1 thread, fp32 and bf16.

An A/B between two builds runs this once per build, interleaved (each build in its own environment):

    for r in 1 2 3 4 5; do /path/to/old/python benchmarks/corr_thread_time.py old; python benchmarks/corr_thread_time.py new; done

Thread time is what descheduling does not inflate on a shared machine (cache and memory contention still do).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from flexkd.ops import flex_feature_loss

N, D, K, REPS, WARMUP = 8192, 2048, 768, 30, 4


def median_ms(dtype: torch.dtype, generator: torch.Generator) -> float:
    student = torch.randn(N, K, generator=generator).to(dtype).requires_grad_()
    teacher = torch.randn(N, D, generator=generator).to(dtype)
    index = torch.randperm(D, generator=generator)[:K].sort().values
    mask = (torch.rand(N, generator=generator) > 0.1).float()
    times = []
    for _ in range(WARMUP + REPS):
        student.grad = None
        start = time.thread_time()
        flex_feature_loss(student, teacher, index, mask, loss="corr", backend="cpu").backward()
        times.append(time.thread_time() - start)
    return statistics.median(times[WARMUP:]) * 1e3


if __name__ == "__main__":
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    label = sys.argv[1] if len(sys.argv) > 1 else "this build"
    print(label, *(f"{name} {median_ms(dtype, generator):.2f} ms" for name, dtype in
                   (("bf16", torch.bfloat16), ("fp32", torch.float32))))
