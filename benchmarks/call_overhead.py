"""What one ``flex_feature_loss`` call costs above its kernel, at a size where the kernel is cheap.

Times, per call (a loop of ``--calls`` calls, median of ``--loops`` loops, one thread): the public op's
fwd+bwd and forward alone, the kernel-level op of that backend (``torch.ops.flexkd.feature_loss_fwd*``,
no argument checks) fwd+bwd and forward alone, the public op's argument checks alone, and the user's
eager formula fwd+bwd. On CUDA each loop ends with a synchronisation, so a call costs the larger of its
host time and its GPU time: where the host's is larger, the op is launch-bound at that size.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/call_overhead.py [--n 64] [--backend cpu]
    python benchmarks/call_overhead.py --device cuda --backend cuda     # or --backend triton
"""

from __future__ import annotations

import argparse

import torch

import flexkd.ops
from flexkd.bench.common import per_call_us
from flexkd.ops import _validate, flex_feature_loss, resolve_backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--k", type=int, default=768)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backend", default="auto", help="flexkd backend of the public op (default auto)")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--loops", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    student = torch.randn(args.n, args.k, device=device, requires_grad=True)
    teacher = torch.randn(args.n, args.d, device=device)
    index = torch.randperm(args.d, device=device)[: args.k].sort().values
    mask = torch.ones(args.n, device=device)
    kernel_args = (student, teacher, index, mask, "mse", "mean", 1e-8)
    backend = resolve_backend(args.backend, device.type, "flex_feature_loss")
    kernel_op = getattr(torch.ops.flexkd, flexkd.ops._FEATURE_LOSS_OPS[backend])

    def public_fwd_bwd():
        flex_feature_loss(student, teacher, index, mask, backend=args.backend).backward()

    def public_fwd():
        with torch.no_grad():
            flex_feature_loss(student, teacher, index, mask, backend=args.backend)

    def kernel_fwd_bwd():
        kernel_op(*kernel_args, True, False)[0].backward()

    def kernel_fwd():
        with torch.no_grad():
            kernel_op(*kernel_args, False, False)

    def checks():
        _validate.feature_loss_args(student, teacher, index, mask, "mse", "mean", 1e-8)

    def user_eager_fwd_bwd():
        d = student - teacher.index_select(1, index)
        (((d * d).sum(1) * mask).sum() / (mask.sum() * args.k)).backward()

    print(f"N={args.n} D={args.d} k={args.k} fp32 on {args.device}, 1 thread, torch {torch.__version__}, public "
          f"op on backend={args.backend!r} ({backend}); us per call, median of {args.loops} loops of {args.calls} calls")
    for name, fn in [
        ("public fwd+bwd", public_fwd_bwd),
        ("public fwd (no grad)", public_fwd),
        ("kernel-level op fwd+bwd", kernel_fwd_bwd),
        ("kernel-level op fwd (no grad)", kernel_fwd),
        ("argument checks", checks),
        ("user eager fwd+bwd", user_eager_fwd_bwd),
    ]:
        student.grad = None
        print(f"  {name:30s} {per_call_us(fn, args.calls, args.loops, sync):8.1f}")


if __name__ == "__main__":
    main()
