"""GPU op benchmark: flexkd-cuda and flexkd-triton against the formula a user writes for each op
(``flexkd.bench.user_formulas``), eager and under ``torch.compile``, on the same inputs, in one run.

    flexkd bench --device cuda                          # N=16384, D=4096, k=2048, bf16 and fp32
    flexkd bench --device cuda --n 4096 --json results.json

(``python benchmarks/bench_gpu.py`` takes the same options; ``benchmarks/gpu_check.sh`` runs it.)
``--dry-run`` runs the same pipeline on the CPU at a tiny shape (flexkd's ``cpu`` backend in place of
the GPU ones, wall-clock timing, ``torch.compile`` with its ``eager`` backend), so the script's Python
parts are exercised without a GPU; its numbers mean nothing.

Three workloads per dtype (student requires grad, teacher does not, float row mask):
  * ``mse fwd+bwd`` and ``corr fwd+bwd``: ``flex_feature_loss(student, teacher, index, mask)`` (mean)
    and its backward into the student;
  * ``importance``: ``importance_scores(hidden, grad, mask)`` over [N, D].
``user-compile`` is ``torch.compile(fullgraph=True, dynamic=False)`` of the user's formula. Each time
is the median of ``--reps`` timed batches of ``--iters`` calls (CUDA events).

GB/s counts the least traffic any implementation needs, the same bytes for all of them; the teacher
counts as the 32-byte memory sectors that hold selected columns (from the real addresses: at
k/D = 1/2 that is every sector). fwd+bwd runs as two launches (autograd calls the backward later, with
the upstream gradient), so the gradient made in the forward is written, read and written again:
  mse:  teacher sectors + student + 3 x gradient (N*k each)          = sectors + 4*N*k elements
  corr: its statistics need a pass before the gradient pass, so teacher sectors and student twice,
        plus 3 x gradient                                            = 2*sectors + 5*N*k elements
  importance: hidden and grad once                                   = 2*N*D elements
plus the fp32 mask. "% copy" is that rate over a large device-to-device copy measured in the same run
(bytes read + written). The table is the last thing printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from flexkd._io import atomic_open
from flexkd.bench import common, user_formulas
from flexkd.bench.options import GPU_DEFAULT_D as DEFAULT_D
from flexkd.bench.options import GPU_DEFAULT_DTYPES as DEFAULT_DTYPES
from flexkd.bench.options import GPU_DEFAULT_K as DEFAULT_K
from flexkd.bench.options import GPU_DEFAULT_N as DEFAULT_N
from flexkd.bench.options import GPU_DRY_RUN_SHAPE as DRY_RUN_SHAPE
from flexkd.bench.options import add_gpu_arguments as add_arguments
from flexkd.ops import _backends, flex_feature_loss, importance_scores, select_top_k

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}




def time_ms(fn: Callable[[], object], iters: int, reps: int, warmup: int, device: str = "cuda") -> float:
    """Median milliseconds per call of ``fn`` over ``reps`` batches of ``iters`` calls (CUDA events;
    wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    if device != "cuda":
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            samples.append((time.perf_counter() - start) * 1e3 / iters)
        return statistics.median(samples)
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    return statistics.median(samples)


def copy_bandwidth_gbs(iters: int, reps: int, device: str = "cuda", nbytes: int = 1 << 30) -> float:
    """Device-to-device copy of ``nbytes`` (1 GiB): (bytes read + bytes written) / time, in GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters, reps, warmup=3, device=device)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def triton_available() -> str | None:
    """None when the triton backend can run on CUDA tensors here, else why not."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set"
    return _backends.unavailable_reason("triton", "cuda")


WORKLOADS = ("mse fwd+bwd", "corr fwd+bwd", "importance")
BASELINES = ("user-eager", "user-compile")


def loss_step(loss_fn: Callable, student: torch.Tensor, teacher, index, mask) -> Callable[[], None]:
    """One forward+backward of ``loss_fn`` into ``student`` (its .grad is reset, not accumulated)."""

    def step():
        student.grad = None
        loss_fn(student, teacher, index, mask).backward()

    return step


def implementations(triton_reason: str | None, dry_run: bool = False) -> dict[str, dict[str, Callable] | str]:
    """name -> {workload: function}, or the reason it cannot run. ``dry_run``: flexkd's cpu backend
    and ``torch.compile(backend="eager")`` (the pipeline on a CPU, see the module docstring)."""
    impls: dict[str, dict[str, Callable] | str] = {}
    if dry_run:
        flexkd_backends = (("flexkd-cpu", "cpu", _backends.unavailable_reason("cpu", "cpu")),)
    else:
        flexkd_backends = (
            ("flexkd-cuda", "cuda", _backends.unavailable_reason("cuda", "cuda")),
            ("flexkd-triton", "triton", triton_reason),
        )
    for name, backend, reason in flexkd_backends:
        if reason is not None:
            impls[name] = reason
            continue
        impls[name] = {
            "mse fwd+bwd": lambda s, t, i, m, b=backend: flex_feature_loss(s, t, i, m, backend=b),
            "corr fwd+bwd": lambda s, t, i, m, b=backend: flex_feature_loss(s, t, i, m, loss="corr",
                                                                            backend=b),
            "importance": lambda h, g, m, b=backend: importance_scores(h, g, m, backend=b),
        }
    formulas = {"mse fwd+bwd": user_formulas.mse, "corr fwd+bwd": user_formulas.corr,
                "importance": user_formulas.importance}
    impls["user-eager"] = dict(formulas)
    compile_backend = "eager" if dry_run else "inductor"
    impls["user-compile"] = {
        w: torch.compile(f, fullgraph=True, dynamic=False, backend=compile_backend)
        for w, f in formulas.items()
    }
    return impls


def floor_bytes(workload: str, student, teacher, index, mask) -> int:
    """The least bytes any implementation moves for ``workload`` (see the module docstring)."""
    es = teacher.element_size()
    n, k = student.shape
    sectors = common.cache_lines_touched(teacher, index, line=32) * 32
    if workload == "mse fwd+bwd":
        return sectors + 4 * n * k * es + 4 * n
    if workload == "corr fwd+bwd":
        return 2 * sectors + 5 * n * k * es + 4 * n
    return 2 * teacher.numel() * es + 4 * n


def bench_dtype(name: str, dtype: torch.dtype, args, impls, copy_gbs: float) -> list[dict]:
    n, d, k = shape(args)
    device = device_of(args)
    generator = torch.Generator(device=device).manual_seed(0)
    teacher = torch.randn(n, d, device=device, dtype=dtype, generator=generator)
    student = torch.randn(n, k, device=device, dtype=dtype, generator=generator).requires_grad_(True)
    grad = torch.randn(n, d, device=device, dtype=dtype, generator=generator)
    mask = torch.rand(n, device=device, generator=generator)
    index = select_top_k(torch.rand(d, device=device, generator=generator), k)
    rows = []
    for workload in WORKLOADS:
        ideal_bytes = floor_bytes(workload, student, teacher, index, mask)
        for impl, fns in impls.items():
            row = {"op": workload, "dtype": name, "impl": impl, "N": n, "D": d, "k": k}
            if isinstance(fns, str):
                rows.append({**row, "skipped": fns})
                continue
            fn = fns[workload]
            if workload == "importance":

                def call(fn=fn):
                    fn(teacher, grad, mask)

            else:
                call = loss_step(fn, student, teacher, index, mask)
            try:
                ms = time_ms(call, args.iters, args.reps, args.warmup, device)
            except Exception as err:  # one broken implementation must not hide the others' numbers
                rows.append(
                    {**row, "skipped": f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"}
                )
                continue
            gbs = ideal_bytes / (ms * 1e-3) / 1e9
            rows.append({**row, "ms": ms, "gbs": gbs, "copy_pct": 100 * gbs / copy_gbs})
            print(
                f"  {workload:12s} {name:5s} {impl:14s} {ms:8.3f} ms  {gbs:7.0f} GB/s", flush=True
            )
    return rows


def speedups(rows: list[dict]) -> None:
    """Adds x_user-eager and x_user-compile: how many times faster than those on the same op and dtype."""
    by_key = {(r["op"], r["dtype"], r["impl"]): r.get("ms") for r in rows}
    for r in rows:
        for base in BASELINES:
            base_ms = by_key.get((r["op"], r["dtype"], base))
            if r.get("ms") and base_ms:
                r[f"x_{base}"] = base_ms / r["ms"]


def table(rows: list[dict], copy_gbs: float) -> str:
    """One Markdown table: every op, dtype and implementation, its % of the measured copy bandwidth
    and its speed over the user's formula (``SLOWER`` where that is below 1)."""

    def times(value: float | None) -> str:
        if not value:
            return "-"
        return f"{value:.2f}" + (" SLOWER" if value < 1 else "")

    head = (
        f"| op | dtype | impl | ms (median) | GB/s | % of copy ({copy_gbs:.0f} GB/s) "
        "| x user-eager | x user-compile |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        if "skipped" in r:
            lines.append(
                f"| {r['op']} | {r['dtype']} | {r['impl']} | skipped: {r['skipped']} | | | | |"
            )
            continue
        lines.append(
            f"| {r['op']} | {r['dtype']} | {r['impl']} | {r['ms']:.3f} | {r['gbs']:.0f} | "
            f"{r['copy_pct']:.0f} % | {times(r.get('x_user-eager'))} | {times(r.get('x_user-compile'))} |"
        )
    return "\n".join(lines)


def device_of(args: argparse.Namespace) -> str:
    return "cpu" if getattr(args, "dry_run", False) else "cuda"


def shape(args: argparse.Namespace) -> tuple[int, int, int]:
    """N, D, k: the options, or the defaults (``--dry-run``: a tiny shape) where not given."""
    n, d, k = DRY_RUN_SHAPE if getattr(args, "dry_run", False) else (DEFAULT_N, DEFAULT_D, DEFAULT_K)
    return args.n or n, args.d or d, args.k or k


def dtypes_from_args(args: argparse.Namespace) -> list[str]:
    """The dtypes to run; ValueError for a bad option."""
    n, d, k = shape(args)
    common.check_shape(args.n, args.d, args.k)
    for name in ("iters", "reps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    if k > d:
        raise ValueError(f"--k must be <= --d (k={k}, D={d})")
    return common.parse_list("--dtypes", args.dtypes or DEFAULT_DTYPES, tuple(DTYPES))


def run(args: argparse.Namespace) -> int:
    """Measures every implementation, writes ``--json`` if given and prints the table last. Exit
    status 2 (and a message) without a CUDA device or for a bad option."""
    try:
        dtypes = dtypes_from_args(args)
    except ValueError as error:
        print(f"flexkd bench: error: {error}", file=sys.stderr)
        return 2
    dry_run = device_of(args) == "cpu"
    if dry_run:
        device_name = "cpu (--dry-run: not a measurement)"
        copy_gbs = copy_bandwidth_gbs(args.iters, args.reps, "cpu", nbytes=1 << 20)
        impls = implementations(None, dry_run=True)
        print(f"device: {device_name}", flush=True)
    else:
        if not torch.cuda.is_available():
            print("bench_gpu: no CUDA device; nothing to measure (--dry-run checks the script on a CPU)",
                  file=sys.stderr)
            return 2
        device = torch.cuda.get_device_properties(0)
        device_name = device.name
        print(
            f"device: {device.name}, {device.multi_processor_count} SMs, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}",
            flush=True,
        )
        copy_gbs = copy_bandwidth_gbs(args.iters, args.reps)
        print(f"copy bandwidth (1 GiB D2D, read+write): {copy_gbs:.0f} GB/s", flush=True)
        impls = implementations(triton_available())
    rows = []
    for name in dtypes:
        rows += bench_dtype(name, DTYPES[name], args, impls, copy_gbs)
    speedups(rows)
    if args.json:
        with atomic_open(args.json, "w") as handle:
            handle.write(json.dumps({"device": device_name, "copy_gbs": copy_gbs, "rows": rows}, indent=2))
    n, d, k = shape(args)
    print()
    print(f"N={n} D={d} k={k} on {device_name}")
    print(table(rows, copy_gbs))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        dtypes_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
