"""Measuring helpers for the CPU op benchmarks: wall-time medians, peak resident memory of one call,
memory-copy bandwidth, the bytes an op must move, and crash-safe CSV output; and the options the CPU
and GPU op benchmarks share (``flexkd bench`` takes them once for both)."""

from __future__ import annotations

import csv
import ctypes
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from flexkd._io import atomic_open

CACHE_LINE = 64


def median_ms(fn: Callable[[], object], *, setup: Callable[[], object] | None = None,
              min_reps: int = 5, max_reps: int = 30, budget_s: float = 1.0, warmup: int = 2) -> float:
    """Median wall milliseconds of ``fn(setup())`` (``fn()`` without setup); setup is not timed.

    Runs ``warmup`` untimed calls, then at least ``min_reps`` and at most ``max_reps`` timed calls,
    stopping early once ``budget_s`` seconds of timed calls have passed."""
    for _ in range(warmup):
        fn(setup()) if setup else fn()
    times: list[float] = []
    while len(times) < max_reps and (len(times) < min_reps or sum(times) < budget_s):
        arg = setup() if setup else None
        start = time.perf_counter()
        fn(arg) if setup else fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def per_call_us(fn: Callable[[], object], calls: int, loops: int,
                sync: Callable[[], object] | None = None) -> float:
    """Microseconds per call of ``fn()``: the median over ``loops`` loops of ``calls`` back-to-back calls
    (after untimed warm-up calls), each loop ended by ``sync()`` when given (a device synchronisation)."""
    for _ in range(min(max(calls // 10, 5), 100)):
        fn()
    if sync:
        sync()
    samples = []
    for _ in range(loops):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync:
            sync()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def paired_ratio(fn: Callable[[], object], baseline: Callable[[], object], reps: int = 15) -> float:
    """Median over ``reps`` back-to-back pairs of (seconds of ``fn()``) / (seconds of ``baseline()``).

    On a shared machine the load drifts between two separately taken medians; a pair sees about the
    same load, so the median of per-pair ratios is the steadier comparison."""
    fn(), baseline()
    ratios = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        middle = time.perf_counter()
        baseline()
        ratios.append((middle - start) / max(time.perf_counter() - middle, 1e-9))
    return statistics.median(ratios)


def copy_of(total_bytes: int) -> Callable[[], object]:
    """A tensor copy moving ``total_bytes`` (read + written), as :func:`copy_bandwidth_gbs` times it."""
    src = torch.randn(max(total_bytes // 8, 1024))
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Give memory that malloc keeps after frees back to the OS, so resident size counts live data."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# glibc's mallopt parameters, and the environment variables that set them at start-up.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
KEEP_FREED_MEMORY_ENV = "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_TOP_PAD_=67108864"


def keep_freed_memory() -> None:
    """Make glibc keep freed memory in the process: no ``mmap`` per large block, no trimming of the heap.

    By default glibc gives a large freed block back to the OS, so the next output of that size (an op's
    gradient, every step) is fresh pages that the kernel faults in and zeroes on first write: hundreds to
    thousands of faults per call at the target shape. ``KEEP_FREED_MEMORY_ENV`` does the same from the
    environment; jemalloc and tcmalloc behave so by default. RuntimeError where glibc's ``mallopt`` is
    missing or refuses."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError) as error:
        raise RuntimeError(f"keeping freed memory needs glibc's mallopt: {error}") from error
    for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 64 << 20)):
        if mallopt(param, value) != 1:
            raise RuntimeError(f"mallopt({param}, {value}) was refused")


def peak_extra_mib(fn: Callable[[], object]) -> float:
    """Peak resident memory above the starting point while ``fn()`` runs, in MiB (Linux: the VmHWM
    high-water mark, reset through /proc/self/clear_refs, after malloc_trim so that freed heap does
    not hide new allocations); NaN where that is unavailable."""
    _release_free_heap()
    start = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return math.nan
    if start is None:
        return math.nan
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return max(0, peak - start) / 1024 if peak is not None else math.nan


def copy_bandwidth_gbs(total_bytes: int, reps: int = 9) -> float:
    """GB/s of ``dst.copy_(src)`` where src and dst together hold ``total_bytes`` (bytes read + written).

    Sized like the op's own traffic it shows the bandwidth of the cache level the op runs from. The
    median of ``reps`` copies, the same statistic as the op timings."""
    numel = max(total_bytes // 8, 1024)
    seconds = median_ms(copy_of(total_bytes), min_reps=reps, max_reps=reps, budget_s=0.0) / 1e3
    return 2 * numel * 4 / seconds / 1e9


def cache_lines_touched(tensor: torch.Tensor, columns: torch.Tensor, line: int = CACHE_LINE) -> int:
    """Distinct ``line``-byte lines (64: a CPU cache line, 32: a GPU memory sector) holding
    ``tensor[:, columns]`` (a 2-D tensor on any device, any strides; only addresses are read).

    Row addresses repeat their alignment every ``line`` rows at most, so that many are counted and scaled."""
    rows = tensor.shape[0]
    if rows == 0 or columns.numel() == 0:
        return 0
    size = tensor.element_size()
    base = tensor.data_ptr()
    col_bytes = columns.cpu().to(torch.int64) * tensor.stride(1) * size
    sample = min(rows, line)
    lines = 0
    for n in range(sample):
        start = base + n * tensor.stride(0) * size
        lines += torch.unique((start + col_bytes) // line).numel()
    return round(lines * rows / sample)


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    """Write ``rows`` (dicts with the same keys) to ``path`` atomically."""
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def check_shape(n: int | None, d: int | None, k: int | None) -> None:
    """ValueError unless the given sizes are >= 1 and k <= d."""
    for name, value in (("n", n), ("d", d), ("k", k)):
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1")
    if k is not None and d is not None and k > d:
        raise ValueError("--k must be <= --d")


def parse_list(option: str, value: str, allowed) -> list[str]:
    """The comma list ``value`` of ``option``; ValueError when it is empty or names something not in
    ``allowed``."""
    values = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"{option} takes a comma list of {', '.join(allowed)}; got {bad or 'nothing'}")
    return values
