"""What argument checking costs ``flex_feature_loss`` at small N (issue 16 saw ~0.3 ms at N=64).

Times, in one run, medians of repeated calls on CPU: the whole public call with a reused index
(checked once per tensor version) and with a fresh index tensor every call (checked every time), the
argument checks alone, and the two ways of checking an index for repeats (``torch.unique``, as before,
and one ``tolist`` read with a set, as now). Prints each as microseconds per call and as a ratio to the
whole call with a reused index.

    python benchmarks/validation_overhead.py            # N=64 D=384 k=128
    python benchmarks/validation_overhead.py --n 4096 --k 2048 --d 4096
"""

from __future__ import annotations

import argparse

import torch

from flexkd.bench.common import per_call_us
from flexkd.ops import _validate, flex_feature_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    student, teacher = torch.randn(args.n, args.k), torch.randn(args.n, args.d)
    mask = torch.rand(args.n) + 0.5
    index = torch.randperm(args.d)[: args.k]
    fresh = iter([index.clone() for _ in range(args.calls * (args.repeats + 1) + 100)] * 2)

    def unique_check():
        int(index.min()), int(index.max())
        return torch.unique(index).numel()

    def set_check():
        entries = index.tolist()
        return min(entries), max(entries), len(set(entries))

    cases = {
        "call, reused index": lambda: flex_feature_loss(student, teacher, index, mask),
        "call, fresh index": lambda: flex_feature_loss(student, teacher, next(fresh), mask),
        "checks only, reused index": lambda: _validate.feature_loss_args(
            student, teacher, index, mask, "mse", "mean", 1e-8
        ),
        "index repeats: torch.unique + min/max (before)": unique_check,
        "index repeats: tolist + set (now)": set_check,
        "mask weights: aminmax + two reads": lambda: [x.item() for x in torch.aminmax(mask)],
    }
    times = {name: per_call_us(fn, args.calls, args.repeats) for name, fn in cases.items()}
    base = times["call, reused index"]
    print(
        f"N={args.n} D={args.d} k={args.k}, {torch.get_num_threads()} threads, medians of {args.repeats}"
    )
    for name, us in times.items():
        print(f"  {name:<48} {us:8.1f} us   {us / base:5.2f}x of the call")


if __name__ == "__main__":
    main()
