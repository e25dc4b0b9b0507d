"""CPU op benchmark: flexkd's C++ kernels (``backend="cpu"``), the torch reference in eager mode and
``torch.compile`` of the reference, on the same inputs, in one run.

    flexkd bench --device cpu --quick                   # the target shapes only (a few minutes)
    flexkd bench --device cpu                           # the full sweep (long)
    flexkd bench --device cpu --filter 'mse-fp32-N8192-D2048'
    flexkd bench --device cpu --quick --n 64 --d 32 --impls flexkd,eager --copy-gib 0   # seconds

(``python benchmarks/bench_ops.py`` takes the same options and writes into ``benchmarks/results/``.)

Workloads (student requires grad, teacher does not, float row mask of uniform weights):
  * ``flex_feature_loss`` (``mse`` and ``corr``, ``reduction="mean"``) over N rows, teacher [N, D],
    k selected columns: ``fwd`` (the forward call), ``bwd`` (``loss.backward()`` after an untimed
    forward) and ``fwd+bwd``;
  * ``importance_scores`` (``grad_x_act``) over [N, D]: forward only (it has no backward).
Sweep: N in {1024, 8192, 32768}, D in {1024, 2048, 4096}, k in {D/8, D/4, 3D/8}, fp32 and bf16;
``--quick``: N=8192 with D=2048, k=3D/8 (loss) and D=4096 (importance). ``--n``, ``--d`` and ``--k``
replace those values (k stays a fraction of D unless given).
Each time is the median of repeated calls (``common.median_ms``); memory is the peak resident memory
above the starting point during one call.

The bytes-moved floor is what any implementation must move through memory once:
  * feature loss (fwd+bwd): the student read (N*k elements), the teacher's 64-byte cache lines that hold
    selected columns (counted from the real addresses: with k/D >= 1/8 and 4-byte elements nearly every
    line of the teacher is touched), the fp32 mask, and the student gradient written (N*k);
  * importance: hidden and grad read, the mask read.
floor_ms = floor bytes / (GB/s of a tensor copy moving the same number of bytes, read + written),
so the floor uses the bandwidth of the cache level an op of that size runs from. ``x floor`` is
flexkd's time over floor_ms. corr must read its inputs twice (statistics, then gradients), so its
floor (one read) cannot be reached; mse can.
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
from flexkd.bench import common
from flexkd.ops import flex_feature_loss, importance_scores, reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SWEEP_N = (1024, 8192, 32768)
SWEEP_D = (1024, 2048, 4096)
K_EIGHTHS = (1, 2, 3)  # k = D/8, D/4, 3D/8
DEFAULT_OUT = Path("flexkd-bench") / "ops_cpu"  # relative to the working directory
QUICK_N, QUICK_D, QUICK_D_IMPORTANCE, QUICK_K_EIGHTHS = 8192, 2048, 4096, 3  # the target shapes
IMPLS = ("flexkd", "eager", "compile")
MODES = ("fwd", "bwd", "fwd+bwd")

# Targets of issue 2 (2-core CPU): speedups of flexkd over eager / compile, and distance to the floor.
TARGET_LOSS = dict(op="mse", n=8192, d=2048, k=768)
TARGET_IMPORTANCE = dict(op="importance", n=8192, d=4096)
TARGET_VS_EAGER, TARGET_VS_COMPILE, TARGET_X_FLOOR, TARGET_IMPORTANCE_VS_EAGER = 3.5, 1.5, 1.5, 3.0


@dataclass(frozen=True)
class Case:
    op: str  # "mse", "corr" or "importance"
    dtype: str
    n: int
    d: int
    k: int  # 0 for importance

    @property
    def name(self) -> str:
        k = f"-k{self.k}" if self.op != "importance" else ""
        return f"{self.op}-{self.dtype}-N{self.n}-D{self.d}{k}"


def sweep(quick: bool, ops: list[str], dtypes: list[str], n: int | None = None, d: int | None = None,
          k: int | None = None) -> list[Case]:
    """The cases of the full sweep (or of ``quick``), with N, D or k replaced by ``n``, ``d``, ``k``
    where given. Loss cases whose k comes out below 1 or above D are left out."""
    cases = []
    for dtype in dtypes:
        for op in ops:
            importance = op == "importance"
            ns = (n,) if n else (QUICK_N,) if quick else SWEEP_N
            ds = (d,) if d else ((QUICK_D_IMPORTANCE if importance else QUICK_D),) if quick else SWEEP_D
            eighths = (QUICK_K_EIGHTHS,) if quick else K_EIGHTHS
            for case_n in ns:
                for case_d in ds:
                    ks = (0,) if importance else (k,) if k else tuple(case_d * e // 8 for e in eighths)
                    cases += [Case(op, dtype, case_n, case_d, case_k) for case_k in ks
                              if importance or 1 <= case_k <= case_d]
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


_compiled: dict[str, object] = {}


def loss_fn(impl: str, loss: str):
    if impl == "flexkd":
        return lambda s, t, i, m: flex_feature_loss(s, t, i, m, loss=loss, backend="cpu")
    if impl == "eager":
        return lambda s, t, i, m: reference.flex_feature_loss(s, t, i, m, loss=loss)
    key = f"loss-{loss}"
    if key not in _compiled:
        _compiled[key] = torch.compile(
            lambda s, t, i, m: reference.flex_feature_loss(s, t, i, m, loss=loss))
    return _compiled[key]


def importance_fn(impl: str):
    if impl == "flexkd":
        return lambda h, g, m: importance_scores(h, g, m, backend="cpu")
    if impl == "eager":
        return reference.importance_scores
    if "importance" not in _compiled:
        _compiled["importance"] = torch.compile(reference.importance_scores)
    return _compiled["importance"]


def measure_feature_loss(case: Case, x: Inputs, impl: str) -> dict[str, tuple[float, float]]:
    fn = loss_fn(impl, case.op)
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


def measure_importance(case: Case, x: Inputs, impl: str) -> dict[str, tuple[float, float]]:
    fn = importance_fn(impl)

    def forward():
        return fn(x.teacher, x.grad, x.mask)

    return {"fwd": (common.median_ms(forward), common.peak_extra_mib(forward))}


def run_case(case: Case, impls: list[str]) -> list[dict]:
    torch.manual_seed(hash(case.name) % 2**31)
    x = make_inputs(case)
    floor = floor_bytes(case, x)
    floor_ms = floor / (common.copy_bandwidth_gbs(floor) * 1e9) * 1e3
    results = {}
    for impl in impls:
        measure = measure_importance if case.op == "importance" else measure_feature_loss
        results[impl] = measure(case, x, impl)
    rows = []
    for mode in results[impls[0]]:
        row = dict(case=case.name, op=case.op, dtype=case.dtype, n=case.n, d=case.d, k=case.k,
                   mode=mode, floor_mb=round(floor / 2**20, 1), floor_ms=round(floor_ms, 3))
        for impl in impls:
            ms, mib = results[impl][mode]
            row[f"{impl}_ms"] = round(ms, 3)
            row[f"{impl}_peak_mib"] = round(mib, 1)
        flex = row.get("flexkd_ms")
        for impl in ("eager", "compile"):
            if flex and f"{impl}_ms" in row:
                row[f"x_vs_{impl}"] = round(row[f"{impl}_ms"] / flex, 2)
        row["x_floor"] = round(flex / floor_ms, 2) if flex and mode != "bwd" else math.nan
        rows.append(row)
    return rows


def print_table(rows: list[dict], impls: list[str]) -> None:
    header = ["case", "mode"] + [f"{i} ms" for i in impls] + [f"{i} MiB" for i in impls]
    header += [h for h in ("vs eager", "vs compile") if h.split()[1] in impls] + ["floor ms", "x floor"]
    lines = [header]
    for r in rows:
        line = [r["case"], r["mode"]] + [f"{r[f'{i}_ms']:.2f}" for i in impls]
        line += [f"{r[f'{i}_peak_mib']:.0f}" for i in impls]
        line += [f"{r[f'x_vs_{i}']:.2f}x" for i in ("eager", "compile") if i in impls]
        line += [f"{r['floor_ms']:.2f}", "-" if math.isnan(r["x_floor"]) else f"{r['x_floor']:.2f}"]
        lines.append(line)
    widths = [max(len(str(line[c])) for line in lines) for c in range(len(header))]
    for j, line in enumerate(lines):
        print("| " + " | ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)) + " |")
        if j == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def check_targets(rows: list[dict]) -> list[str]:
    """One line per target of issue 2 that the run covered: measured value, goal, met or not."""
    lines = []
    for dtype in DTYPES:
        for r in rows:
            if r["dtype"] != dtype:
                continue
            is_loss = all(r[key] == val for key, val in TARGET_LOSS.items()) and r["mode"] == "fwd+bwd"
            is_imp = all(r[key] == val for key, val in TARGET_IMPORTANCE.items())
            checks = []
            if is_loss:
                checks = [("vs eager", r.get("x_vs_eager"), TARGET_VS_EAGER, True),
                          ("vs compile", r.get("x_vs_compile"), TARGET_VS_COMPILE, True),
                          ("x floor", r["x_floor"], TARGET_X_FLOOR, False)]
            elif is_imp:
                checks = [("vs eager", r.get("x_vs_eager"), TARGET_IMPORTANCE_VS_EAGER, True)]
            for what, value, goal, higher in checks:
                if value is None or math.isnan(value):
                    continue
                met = value >= goal if higher else value <= goal
                sign = ">=" if higher else "<="
                lines.append(f"{'MET ' if met else 'MISS'} {r['case']} {r['mode']}: {what} "
                             f"{value:.2f} (target {sign} {goal})")
    return lines


def plot(rows: list[dict], impls: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["mode"] in ("fwd+bwd",) or r["op"] == "importance"]
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
        ax.set_xticklabels([r["case"].split("-", 2)[2] for r in sel], rotation=45, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms (median)")
        mode = "fwd" if op == "importance" else "fwd+bwd"
        ax.set_title(f"{op} {dtype} {mode} on {torch.get_num_threads()} threads", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser, *, out_default: Path, shapes: bool = True) -> None:
    """The CPU benchmark's options; ``shapes=False`` leaves out ``--n/--d/--k/--dtypes`` (added once
    by :func:`common.add_shape_arguments` where the GPU benchmark's options are added too)."""
    parser.add_argument("--quick", action="store_true", help="only the target shapes")
    parser.add_argument("--filter", default="", help="regex over case names, e.g. 'mse-fp32-N8192'")
    parser.add_argument("--ops", default="mse,corr,importance", help="comma list of mse,corr,importance")
    if shapes:
        common.add_shape_arguments(parser, shapes="the sweep's, or --quick's", dtypes="fp32,bf16")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma list of flexkd,eager,compile")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--copy-gib", type=float, default=2.0,
                        help="size of the copy whose bandwidth the header reports (0: skip it)")
    parser.add_argument("--out", type=Path, default=out_default,
                        help=f"output prefix: writes PREFIX.csv and PREFIX.png (default: {out_default})")


def cases_from_args(args: argparse.Namespace) -> tuple[list[Case], list[str]]:
    """The cases to run and the implementations (flexkd first); ValueError for a bad option."""
    ops = common.parse_list("--ops", args.ops, ("mse", "corr", "importance"))
    dtypes = common.parse_list("--dtypes", args.dtypes or "fp32,bf16", tuple(DTYPES))
    impls = common.parse_list("--impls", args.impls, IMPLS)
    if "flexkd" not in impls:
        raise ValueError("--impls must include flexkd")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be >= 1")
    if args.copy_gib < 0:
        raise ValueError("--copy-gib must be >= 0")
    common.check_shape(args.n, args.d, args.k)
    pattern = re.compile(args.filter)
    cases = [c for c in sweep(args.quick, ops, dtypes, args.n, args.d, args.k) if pattern.search(c.name)]
    if not cases:
        raise ValueError(f"no case to run (--filter {args.filter!r}, --n/--d/--k, --ops, --dtypes)")
    return cases, ["flexkd"] + [i for i in impls if i != "flexkd"]


def run(args: argparse.Namespace) -> int:
    """Runs the cases ``args`` select, writes PREFIX.csv (after every case) and PREFIX.png, prints the
    table and the MET/MISS lines. Exit status 2 (and a message) for a bad option."""
    try:
        cases, impls = cases_from_args(args)
    except (ValueError, re.error) as error:
        print(f"flexkd bench: error: {error}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    header = f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {load}"
    if args.copy_gib > 0:
        large = common.copy_bandwidth_gbs(int(args.copy_gib * 2**30), reps=3)
        header += f"; copy bandwidth of a {args.copy_gib:g} GiB copy (read + written): {large:.1f} GB/s"
    print(header)
    rows: list[dict] = []
    for case in tqdm(cases, desc="bench_ops", unit="case"):
        rows += run_case(case, impls)
        common.write_csv(args.out.with_suffix(".csv"), rows)
    plot(rows, impls, args.out.with_suffix(".png"))
    print_table(rows, impls)
    for line in check_targets(rows):
        print(line)
    print(f"wrote {args.out.with_suffix('.csv')} and {args.out.with_suffix('.png')}")
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
