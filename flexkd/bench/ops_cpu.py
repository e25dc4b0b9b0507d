"""CPU op benchmark: flexkd's C++ kernels (``backend="cpu"``) against the formula a user writes for each
op (``flexkd.bench.user_formulas``), eager and under ``torch.compile``, on the same inputs, in one run.

    flexkd bench --device cpu --quick                   # the target shapes only (a few minutes)
    flexkd bench --device cpu --quick --small-n         # N in {64, 512, 4096, 32768} at the target D, k
    flexkd bench --device cpu                           # the full sweep (long)
    flexkd bench --device cpu --quick --ops mse --threads 1,2 --filter mse-fp32
    flexkd bench --device cpu --quick --n 64 --d 32 --impls flexkd,user-eager --copy-gib 0   # seconds

(``python benchmarks/bench_ops.py`` takes the same options and writes into ``benchmarks/results/``.)

Implementations (``--impls``): ``flexkd``; ``user-eager`` and ``user-compile``, the user's formula
(the default baselines); ``ref-eager`` and ``ref-compile``, flexkd's torch reference
(``flexkd.ops.reference``). Each compiled function is compiled afresh for every case
(``dynamic=False``), as a user running one shape gets it.

Workloads (student requires grad, teacher does not, float row mask of uniform weights):
  * ``flex_feature_loss`` (``mse`` and ``corr``, ``reduction="mean"``) over N rows, teacher [N, D]
    (``contiguous``, or ``strided``: a column slice of a [N, 2D] tensor), k selected columns: ``fwd``
    (the forward call), ``bwd`` (``loss.backward()`` after an untimed forward) and ``fwd+bwd``;
  * ``importance_scores`` (``grad_x_act``) over [N, D]: forward only (it has no backward).
Sweep: N in {1024, 8192, 32768}, D in {1024, 2048, 4096}, k in {D/8, D/4, 3D/8}, fp32 and bf16;
``--quick``: N=8192 with D=2048, k=3D/8 (loss) and D=4096 (importance); ``--small-n`` replaces N by
64, 512, 4096 and 32768. ``--n``, ``--d`` and ``--k`` replace those values (k stays a fraction of D
unless given). ``--threads 1,2`` runs every case at each thread count.
Each time is the median of repeated calls (``common.median_ms``); memory is the peak resident memory
above the starting point during one call. Every row records the 1-minute load average before and after
its case, so a reader can tell a quiet measurement from a disturbed one.

The bytes-moved floor is what any implementation must move through memory once:
  * feature loss (fwd+bwd): the student read (N*k elements), the teacher's 64-byte cache lines that hold
    selected columns (counted from the real addresses: with k/D >= 1/8 and 4-byte elements nearly every
    line of the teacher is touched), the fp32 mask, and the student gradient written (N*k);
  * importance: hidden and grad read, the mask read.
floor_ms = floor bytes / (GB/s of a tensor copy moving the same number of bytes, read + written, on
the same threads), so the floor uses the bandwidth of the cache level an op of that size runs from.
``x floor`` is flexkd's time over floor_ms; ``x floor paired`` the median, over 15 back-to-back pairs
of one flexkd call (fwd+bwd; importance: fwd) and one such copy, of their time ratio, which load drift
between the two medians does not bias. corr must read its inputs twice (statistics, then
gradients), so its floor (one read) cannot be reached; mse can.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from flexkd._io import atomic_path
from flexkd.bench import common, user_formulas
from flexkd.bench.options import CPU_DEFAULT_OUT as DEFAULT_OUT
from flexkd.bench.options import CPU_IMPLS as IMPLS
from flexkd.bench.options import CPU_LAYOUTS as LAYOUTS
from flexkd.bench.options import CPU_SMALL_N as SMALL_N
from flexkd.bench.options import add_cpu_arguments as add_arguments
from flexkd.ops import flex_feature_loss, importance_scores, reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SWEEP_N = (1024, 8192, 32768)
SWEEP_D = (1024, 2048, 4096)
K_EIGHTHS = (1, 2, 3)  # k = D/8, D/4, 3D/8
QUICK_N, QUICK_D, QUICK_D_IMPORTANCE, QUICK_K_EIGHTHS = 8192, 2048, 4096, 3  # the target shapes
BASELINES = IMPLS[1:]
MODES = ("fwd", "bwd", "fwd+bwd")

# Targets of issue 16 at the target loss shape, fwd+bwd, both layouts and any thread count:
# op, dtype -> (x floor at most, x user-compile at least).
TARGET_LOSS = dict(op="mse", n=8192, d=2048, k=768)
TARGETS = {("mse", "fp32"): (1.1, 1.5), ("mse", "bf16"): (1.5, 1.7)}


@dataclass(frozen=True)
class Case:
    op: str  # "mse", "corr" or "importance"
    dtype: str
    n: int
    d: int
    k: int  # 0 for importance
    layout: str = "contiguous"  # of the teacher (loss ops only)

    @property
    def name(self) -> str:
        if self.op == "importance":
            return f"{self.op}-{self.dtype}-N{self.n}-D{self.d}"
        strided = "-strided" if self.layout == "strided" else ""
        return f"{self.op}-{self.dtype}-N{self.n}-D{self.d}-k{self.k}{strided}"


def sweep(quick: bool, ops: list[str], dtypes: list[str], n: int | None = None, d: int | None = None,
          k: int | None = None, *, small_n: bool = False,
          layouts: tuple[str, ...] = ("contiguous",)) -> list[Case]:
    """The cases of the full sweep (or of ``quick``), with N, D or k replaced by ``n``, ``d``, ``k``
    where given, N by :data:`SMALL_N` with ``small_n``, and each loss case in every teacher layout of
    ``layouts``. Loss cases whose k comes out below 1 or above D are left out."""
    cases = []
    for dtype in dtypes:
        for op in ops:
            importance = op == "importance"
            ns = (n,) if n else SMALL_N if small_n else (QUICK_N,) if quick else SWEEP_N
            ds = (d,) if d else ((QUICK_D_IMPORTANCE if importance else QUICK_D),) if quick else SWEEP_D
            eighths = (QUICK_K_EIGHTHS,) if quick else K_EIGHTHS
            for case_n in ns:
                for case_d in ds:
                    if importance:
                        cases.append(Case(op, dtype, case_n, case_d, 0))
                        continue
                    ks = (k,) if k else tuple(case_d * e // 8 for e in eighths)
                    cases += [Case(op, dtype, case_n, case_d, case_k, layout)
                              for case_k in ks if 1 <= case_k <= case_d for layout in layouts]
    return cases


@dataclass
class Inputs:
    student: torch.Tensor | None
    teacher: torch.Tensor
    index: torch.Tensor | None
    grad: torch.Tensor | None
    mask: torch.Tensor


def make_inputs(case: Case) -> Inputs:
    dtype = DTYPES[case.dtype]
    mask = torch.rand(case.n)
    if case.op == "importance":
        return Inputs(None, torch.randn(case.n, case.d, dtype=dtype), None,
                      torch.randn(case.n, case.d, dtype=dtype), mask)
    student = torch.randn(case.n, case.k, dtype=dtype).requires_grad_()
    if case.layout == "strided":
        teacher = torch.randn(case.n, 2 * case.d, dtype=dtype)[:, : case.d]
    else:
        teacher = torch.randn(case.n, case.d, dtype=dtype)
    index = torch.randperm(case.d)[: case.k].sort().values
    return Inputs(student, teacher, index, None, mask)


def floor_bytes(case: Case, x: Inputs) -> int:
    mask = x.mask.numel() * x.mask.element_size()
    if case.op == "importance":
        return 2 * x.teacher.numel() * x.teacher.element_size() + mask
    student = x.student.numel() * x.student.element_size()
    teacher = common.cache_lines_touched(x.teacher, x.index) * common.CACHE_LINE
    return 2 * student + teacher + mask  # student read, gradient written


def _reference_loss(loss: str):
    return lambda s, t, i, m: reference.flex_feature_loss(s, t, i, m, loss=loss)


def op_fn(impl: str, op: str):
    """The function ``impl`` runs for ``op``: ``(s, t, idx, m)`` for a loss, ``(h, g, m)`` for
    importance. Compiled ones are compiled afresh (call ``torch._dynamo.reset()`` between cases)."""
    if impl == "flexkd":
        if op == "importance":
            return lambda h, g, m: importance_scores(h, g, m, backend="cpu")
        return lambda s, t, i, m: flex_feature_loss(s, t, i, m, loss=op, backend="cpu")
    source, mode = impl.split("-")
    if source == "user":
        fn = user_formulas.FORMULAS[op]
    else:
        fn = reference.importance_scores if op == "importance" else _reference_loss(op)
    return torch.compile(fn, dynamic=False) if mode == "compile" else fn


def target_call(case: Case, x: Inputs, fn):
    """The call whose time the floor bounds: fwd+bwd of a loss, the forward of importance."""
    if case.op == "importance":
        return lambda: fn(x.teacher, x.grad, x.mask)
    s, t, i, m = x.student, x.teacher, x.index, x.mask

    def forward_backward():
        s.grad = None
        fn(s, t, i, m).backward()

    return forward_backward


def measure_feature_loss(x: Inputs, fn) -> dict[str, tuple[float, float]]:
    s, t, i, m = x.student, x.teacher, x.index, x.mask

    def forward():
        s.grad = None
        return fn(s, t, i, m)

    def forward_backward():
        forward().backward()

    out = {
        "fwd": (common.median_ms(forward), common.peak_extra_mib(forward)),
        "bwd": (common.median_ms(lambda loss: loss.backward(), setup=forward), math.nan),
        "fwd+bwd": (common.median_ms(forward_backward), common.peak_extra_mib(forward_backward)),
    }
    loss = forward()
    out["bwd"] = (out["bwd"][0], common.peak_extra_mib(loss.backward))
    return out


def measure_importance(x: Inputs, fn) -> dict[str, tuple[float, float]]:
    def forward():
        return fn(x.teacher, x.grad, x.mask)

    return {"fwd": (common.median_ms(forward), common.peak_extra_mib(forward))}


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan


def run_case(case: Case, impls: list[str]) -> list[dict]:
    torch.manual_seed(hash(case.name) % 2**31)
    torch._dynamo.reset()
    load_before = load_average()
    x = make_inputs(case)
    floor = floor_bytes(case, x)
    floor_ms = floor / (common.copy_bandwidth_gbs(floor) * 1e9) * 1e3
    measure = measure_importance if case.op == "importance" else measure_feature_loss
    fns = {impl: op_fn(impl, case.op) for impl in impls}
    results = {impl: measure(x, fn) for impl, fn in fns.items()}
    paired = common.paired_ratio(target_call(case, x, fns["flexkd"]), common.copy_of(floor))
    load_after = load_average()
    rows = []
    for mode in results[impls[0]]:
        row = dict(case=case.name, op=case.op, dtype=case.dtype, n=case.n, d=case.d, k=case.k,
                   layout=case.layout if case.op != "importance" else "contiguous",
                   threads=torch.get_num_threads(), mode=mode, floor_mb=round(floor / 2**20, 1),
                   floor_ms=round(floor_ms, 3))
        for impl in impls:
            ms, mib = results[impl][mode]
            row[f"{impl}_ms"] = round(ms, 3)
            row[f"{impl}_peak_mib"] = round(mib, 1)
        flex = row["flexkd_ms"]
        for impl in impls[1:]:
            row[f"x_vs_{impl}"] = round(row[f"{impl}_ms"] / flex, 2) if flex else math.nan
        row["x_floor"] = round(flex / floor_ms, 2) if flex and mode != "bwd" else math.nan
        target_mode = mode == ("fwd" if case.op == "importance" else "fwd+bwd")
        row["x_floor_paired"] = round(paired, 2) if target_mode else math.nan
        row["load_before"], row["load_after"] = round(load_before, 2), round(load_after, 2)
        rows.append(row)
    return rows


def format_table(rows: list[dict], impls: list[str]) -> str:
    """The rows as a Markdown table; a ratio below 1 (flexkd slower than that baseline) is marked ``SLOWER``."""
    baselines = impls[1:]
    header = ["case", "thr", "mode"] + [f"{i} ms" for i in impls] + [f"{i} MiB" for i in impls]
    header += [f"vs {i}" for i in baselines] + ["floor ms", "x floor", "x floor paired", "load"]
    lines = [header]
    for r in rows:
        line = [r["case"], str(r["threads"]), r["mode"]] + [f"{r[f'{i}_ms']:.2f}" for i in impls]
        line += [f"{r[f'{i}_peak_mib']:.0f}" for i in impls]
        line += [f"{r[f'x_vs_{i}']:.2f}x" + (" SLOWER" if r[f"x_vs_{i}"] < 1 else "") for i in baselines]
        line += [f"{r['floor_ms']:.2f}"] + ["-" if math.isnan(r[key]) else f"{r[key]:.2f}"
                                            for key in ("x_floor", "x_floor_paired")]
        line += [f"{r['load_before']:.1f}-{r['load_after']:.1f}"]
        lines.append(line)
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    out = []
    for j, line in enumerate(lines):
        out.append("| " + " | ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) + " |")
        if j == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def check_targets(rows: list[dict]) -> list[str]:
    """One line per target of issue 16 that the run covered: measured value, goal, met or not."""
    lines = []
    for r in rows:
        target = TARGETS.get((r["op"], r["dtype"]))
        if target is None or r["mode"] != "fwd+bwd" or any(r[k] != v for k, v in TARGET_LOSS.items()):
            continue
        max_floor, min_vs_compile = target
        checks = [("x floor", r["x_floor"], max_floor, False),
                  ("x floor paired", r.get("x_floor_paired", math.nan), max_floor, False),
                  ("vs user-compile", r.get("x_vs_user-compile"), min_vs_compile, True)]
        for what, value, goal, higher in checks:
            if value is None or math.isnan(value):
                continue
            met = value >= goal if higher else value <= goal
            threads = f"{r['threads']} thread{'s' if r['threads'] != 1 else ''}"
            lines.append(f"{'MET ' if met else 'MISS'} {r['case']} {threads} fwd+bwd: "
                         f"{what} {value:.2f} (target {'>=' if higher else '<='} {goal})")
    return lines


def plot(rows: list[dict], impls: list[str], path: Path) -> bool:
    """Bar charts of the fwd+bwd (importance: fwd) times and the floor, per op and dtype, into ``path``.
    False (and nothing written) without matplotlib, which flexkd does not require."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["mode"] == "fwd+bwd" or r["op"] == "importance"]
    groups = sorted({(r["op"], r["dtype"]) for r in shown})
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(8, 0.45 * len(shown) / max(len(groups), 1) + 4),
                                                      3.2 * len(groups)), squeeze=False)
    for ax, (op, dtype) in zip(axes[:, 0], groups, strict=True):
        sel = [r for r in shown if r["op"] == op and r["dtype"] == dtype]
        width = 0.8 / (len(impls) + 1)
        for j, impl in enumerate(impls):
            ax.bar([i + j * width for i in range(len(sel))], [r[f"{impl}_ms"] for r in sel], width,
                   label=impl)
        ax.bar([i + len(impls) * width for i in range(len(sel))], [r["floor_ms"] for r in sel], width,
               label="bytes floor", color="lightgray")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sel))])
        ax.set_xticklabels([f"{r['case'].split('-', 2)[2]} t{r['threads']}" for r in sel],
                           rotation=45, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{op} {dtype} {'fwd' if op == 'importance' else 'fwd+bwd'}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return True


def parse_threads(value: str | None) -> list[int]:
    """The thread counts of ``--threads`` (torch's current count when None); ValueError unless each is >= 1."""
    if value is None:
        return [torch.get_num_threads()]
    try:
        threads = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        threads = []
    if not threads or min(threads) < 1:
        raise ValueError(f"--threads takes a comma list of integers >= 1, got {value!r}")
    return threads


def cases_from_args(args: argparse.Namespace) -> tuple[list[Case], list[str], list[int]]:
    """The cases to run, the implementations (flexkd first) and the thread counts; ValueError for a
    bad option."""
    ops = common.parse_list("--ops", args.ops, ("mse", "corr", "importance"))
    dtypes = common.parse_list("--dtypes", args.dtypes or "fp32,bf16", tuple(DTYPES))
    layouts = common.parse_list("--layouts", args.layouts, LAYOUTS)
    impls = common.parse_list("--impls", args.impls, IMPLS)
    if "flexkd" not in impls:
        raise ValueError("--impls must include flexkd")
    threads = parse_threads(args.threads)
    if args.copy_gib < 0:
        raise ValueError("--copy-gib must be >= 0")
    common.check_shape(args.n, args.d, args.k)
    pattern = re.compile(args.filter)
    cases = [c for c in sweep(args.quick, ops, dtypes, args.n, args.d, args.k, small_n=args.small_n,
                              layouts=tuple(layouts)) if pattern.search(c.name)]
    if not cases:
        raise ValueError(f"no case to run (--filter {args.filter!r}, --n/--d/--k, --ops, --dtypes)")
    return cases, ["flexkd"] + [i for i in impls if i != "flexkd"], threads


def run(args: argparse.Namespace) -> int:
    """Runs the cases ``args`` select, writes PREFIX.csv (after every case) and PREFIX.png, prints the
    table and the MET/MISS lines. Exit status 2 (and a message) for a bad option."""
    try:
        cases, impls, thread_counts = cases_from_args(args)
    except (ValueError, re.error) as error:
        print(f"flexkd bench: error: {error}", file=sys.stderr)
        return 2
    if args.keep_freed_memory:
        try:
            common.keep_freed_memory()
        except RuntimeError as error:
            print(f"flexkd bench: error: --keep-freed-memory: {error}", file=sys.stderr)
            return 2
    allocator = "glibc keeping freed memory" if args.keep_freed_memory else "default"
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    header = (f"torch {torch.__version__}, threads {','.join(map(str, thread_counts))}, "
              f"{os.cpu_count()} CPUs, allocator {allocator}, load average before {load}")
    if args.copy_gib > 0:
        large = common.copy_bandwidth_gbs(int(args.copy_gib * 2**30), reps=3)
        header += f"; copy bandwidth of a {args.copy_gib:g} GiB copy (read + written): {large:.1f} GB/s"
    print(header)
    rows: list[dict] = []
    csv_path, png_path = args.out.with_suffix(".csv"), args.out.with_suffix(".png")
    threads_before = torch.get_num_threads()
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for case in tqdm(cases, desc=f"bench_ops ({threads} threads)", unit="case"):
                rows += [dict(row, allocator=allocator) for row in run_case(case, impls)]
                common.write_csv(csv_path, rows)
    finally:
        torch.set_num_threads(threads_before)
    print(format_table(rows, impls))
    for line in check_targets(rows):
        print(line)
    if hasattr(os, "getloadavg"):
        print("load average after " + ", ".join(f"{v:.1f}" for v in os.getloadavg()))
    if plot(rows, impls, png_path):
        print(f"wrote {csv_path} and {png_path}")
    else:
        print(f"wrote {csv_path} (no plot: matplotlib is not installed; pip install matplotlib)")
    return 0


def main(argv: list[str] | None = None, *, out_default: Path = DEFAULT_OUT) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, out_default=out_default)
    args = parser.parse_args(argv)
    try:
        cases_from_args(args)
    except (ValueError, re.error) as error:
        parser.error(str(error))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
