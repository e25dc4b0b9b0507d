"""``flexkd bench --suite linear_logit_kd``: the fused ``flexkd.ops.linear_logit_kd`` against the path a
user writes, ``logit_kd(hidden @ weight.T + bias, teacher_logits)``, eager and under ``torch.compile``,
forward + backward, in one run, on the CPU or (``--kd-device cuda``) a GPU, where Liger-Kernel's fused
linear JSD (``--kd-impls ...,liger``, if installed) is a fourth path: it takes the teacher's hidden state
and output projection instead of its logits (the logits the other paths get are that product), so it
also runs the teacher's matmul, and has no bias; ``liger_loss_rel_diff`` says whether it computed the
same loss.

Per case (N rows, vocabulary V, hidden H, weight dtype; the teacher logits share the weight's dtype):
the median wall time of fwd+bwd (``common.median_ms``; compile time excluded by the warm-up calls) and
the peak memory above the inputs while one fwd+bwd runs (CPU: ``common.peak_extra_mib``, VmHWM after a
reset; CUDA: ``max_memory_allocated`` after a reset), which counts what the call allocates, the weight's
gradient included, on every path. A baseline whose ``[N, V]`` fp32 buffers would not fit in the memory
left is skipped and says so. The targets (issue 13): fused peak ≤ 0.25x eager's, time ≤ 1.0x eager and
≤ 1.2x compile, and on a GPU ≤ 1.0x Liger's.
The header records /proc/loadavg before and after: the timings are only as steady as the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import sys
from pathlib import Path

import torch

from flexkd._io import atomic_path
from flexkd.bench import common
from flexkd.bench.options import KD_IMPLS as IMPLS
from flexkd.bench.options import add_linear_logit_kd_arguments as add_arguments  # noqa: F401 (its options)
from flexkd.losses import logit_kd
from flexkd.ops import linear_logit_kd

GRID_N, GRID_V, GRID_H = (2048, 8192), (32000, 151936), (512, 1024)
QUICK = (512, 32000, 512)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# fp32 [N, V] buffers a baseline holds at its peak, measured at N=2048 V=32000 H=512 fp32: eager 1812 MiB
# above the inputs = 7 x 250 MiB + the 62.5 MiB weight gradient (logits, log-softmaxes, their product,
# grads); compile 502 MiB = 2 x 250 (its fused loops keep the logits and their gradient; at N=8192
# V=151936 H=1024 it peaked at 9497 MiB, 2 x 4748).
# A baseline is skipped where its peak would not fit in MemAvailable; eager's memory is then computed
# (eager_peak_mib_computed) and peak_vs_eager taken against that.
_PEAK_BUFFERS = {"eager": 7, "compile": 2}
TARGETS = {"peak_vs_eager": 0.25, "time_vs_eager": 1.0, "time_vs_compile": 1.2, "time_vs_liger": 1.0}


KINDS = ("forward_kl", "reverse_kl", "jsd")


@dataclasses.dataclass(frozen=True)
class Case:
    n: int
    vocab: int
    hidden: int
    dtype: str
    kind: str = "forward_kl"
    top_k: int = 0  # 0: the dense teacher; else its top-K logits (values, indices)

    @property
    def name(self) -> str:
        kind = "" if self.kind == "forward_kl" else f"-{self.kind}"
        top_k = f"-top{self.top_k}" if self.top_k else ""
        return f"N{self.n}-V{self.vocab}-H{self.hidden}-{self.dtype}{kind}{top_k}"


def _inputs(case: Case, device: str = "cpu", teacher_factors: bool = False) -> dict:
    """Seeded inputs on ``device``; with ``teacher_factors`` the teacher logits are the product of a
    teacher hidden state and projection, kept for the Liger path (``teacher_hidden``/``teacher_weight``)."""
    dtype = DTYPES[case.dtype]
    g = torch.Generator().manual_seed(0)

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).requires_grad_()

    x = {
        "hidden": leaf(torch.randn(case.n, case.hidden, generator=g)),
        "weight": leaf(torch.randn(case.vocab, case.hidden, generator=g) / case.hidden**0.5),
        "bias": leaf(torch.zeros(case.vocab)),
    }
    if teacher_factors:
        teacher_hidden = torch.randn(case.n, case.hidden, generator=g).to(device=device, dtype=dtype)
        teacher_weight = (torch.randn(case.vocab, case.hidden, generator=g) * 2 / case.hidden**0.5).to(
            device=device, dtype=dtype
        )
        x["teacher"] = _teacher(case, teacher_hidden @ teacher_weight.T)
        x["teacher"].update(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight)
    else:
        logits = (torch.randn(case.n, case.vocab, generator=g) * 2).to(device=device, dtype=dtype)
        x["teacher"] = _teacher(case, logits)
    return x


def _teacher(case: Case, logits: torch.Tensor) -> dict:
    """The teacher as both paths take it: ``{"teacher_logits": ...}`` or ``{"teacher_topk": (v, i)}``."""
    if not case.top_k:
        return {"teacher_logits": logits}
    values, indices = logits.float().topk(case.top_k, dim=-1)
    return {"teacher_topk": (values.to(logits.dtype), indices)}


def _loss_fns(case: Case) -> dict:
    """The losses of ``(hidden, weight, bias, teacher)`` by path: ``eager``, the formula a user writes, and
    ``fused``, the op (``backend="auto"``; ``fused-triton``: its Triton kernels)."""
    kd = {"kind": case.kind, "temperature": 2.0}

    def eager(hidden, weight, bias, teacher):
        logits = hidden @ weight.T + bias
        return logit_kd(logits, teacher.get("teacher_logits"), teacher_topk=teacher.get("teacher_topk"), **kd)

    def fused_on(backend: str):
        def fused(hidden, weight, bias, teacher):
            return linear_logit_kd(
                hidden, weight, teacher.get("teacher_logits"), teacher_topk=teacher.get("teacher_topk"),
                bias=bias, backend=backend, **kd,
            )  # fmt: skip

        return fused

    return {"eager": eager, "fused": fused_on("auto"), "fused-triton": fused_on("triton")}


# Liger's generalised JSD: beta 0 is KL(teacher || student), 1 is KL(student || teacher)
_LIGER_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}


def _liger_loss(case: Case):
    from liger_kernel.transformers import LigerFusedLinearJSD

    module = LigerFusedLinearJSD(jsd_beta=_LIGER_BETA[case.kind], temperature=2.0)

    def liger(hidden, weight, bias, teacher):
        return module(hidden, weight, teacher["teacher_hidden"], teacher["teacher_weight"])

    return liger


def _step(loss_fn, x: dict, device: str = "cpu"):
    def run():
        for name in ("hidden", "weight", "bias"):
            x[name].grad = None
        loss = loss_fn(x["hidden"], x["weight"], x["bias"], x["teacher"])
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return loss.detach()

    return run


def _cuda_peak_extra_mib(fn) -> float:
    """Peak CUDA memory allocated above the starting point while ``fn()`` runs, in MiB."""
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return max(0, peak - start) / 2**20


def _mem_available_mib(device: str = "cpu") -> float:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0] / 2**20
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def load_average() -> str:
    try:
        with open("/proc/loadavg") as handle:
            return " ".join(handle.read().split()[:3])
    except OSError:
        return "n/a"


def baseline_peak_mib(case: Case, impl: str = "eager") -> float:
    """A baseline's peak memory above its inputs, computed: ``_PEAK_BUFFERS[impl]`` fp32 ``[N, V]``
    buffers and the ``[V, H]`` weight gradient."""
    weight_grad = case.vocab * case.hidden * DTYPES[case.dtype].itemsize
    return (_PEAK_BUFFERS[impl] * case.n * case.vocab * 4 + weight_grad) / 2**20


def run_case(case: Case, impls: list[str], reps: int, device: str = "cpu") -> dict:
    torch._dynamo.reset()
    x = _inputs(case, device, teacher_factors="liger" in impls)
    eager_mib = baseline_peak_mib(case)
    row: dict = {"case": case.name, "load_before": load_average(),
                 "eager_peak_mib_computed": round(eager_mib, 1)}  # fmt: skip
    losses = {}
    for impl in impls:
        needed_mib = baseline_peak_mib(case, impl) if impl in _PEAK_BUFFERS else 0.0
        if impl == "liger" and case.top_k:
            row[f"{impl}_ms"] = row[f"{impl}_peak_mib"] = float("nan")
            row[f"{impl}_note"] = "n/a: no top-K teacher"
            continue
        if needed_mib > 0.8 * _mem_available_mib(device):
            row[f"{impl}_ms"] = row[f"{impl}_peak_mib"] = float("nan")
            row[f"{impl}_note"] = f"skipped: needs ~{needed_mib / 1024:.0f} GiB"
            continue
        if impl == "liger":
            loss_fn = _liger_loss(case)
        else:
            losses_by_impl = _loss_fns(case)
            loss_fn = losses_by_impl.get(impl) or torch.compile(losses_by_impl["eager"])
        step = _step(loss_fn, x, device)
        losses[impl] = float(step())  # compiles the compiled path; not timed
        row[f"{impl}_ms"] = round(
            common.median_ms(step, min_reps=reps, max_reps=reps, budget_s=0.0, warmup=1), 1
        )
        for name in ("hidden", "weight", "bias"):  # freed before the baseline RSS is read
            x[name].grad = None
        peak = _cuda_peak_extra_mib(step) if device == "cuda" else common.peak_extra_mib(step)
        row[f"{impl}_peak_mib"] = round(peak, 1)
        row[f"{impl}_note"] = ""
    if "fused" in losses and "eager" in losses:
        row["loss_rel_diff"] = abs(losses["fused"] - losses["eager"]) / abs(losses["eager"])
    for other in ("fused-triton", "liger"):
        if other in losses:
            row[f"{other}_loss_rel_diff"] = abs(losses[other] - losses["fused"]) / abs(losses["fused"])
    for base in ("eager", "compile", "liger"):
        if base in impls:
            row[f"time_vs_{base}"] = row["fused_ms"] / row[f"{base}_ms"]
            row[f"peak_vs_{base}"] = row["fused_peak_mib"] / max(row[f"{base}_peak_mib"], 1e-9)
    if "eager" not in losses:  # not asked for, or skipped: compare with its computed memory
        row["peak_vs_eager"] = row["fused_peak_mib"] / eager_mib
        row["peak_vs_eager_from"] = "computed"
    row["load_after"] = load_average()
    return row


def cases_from_args(args: argparse.Namespace) -> list[Case]:
    dtypes = common.parse_list("--dtypes", args.dtypes or "fp32,bf16", tuple(DTYPES))
    if args.n is not None or args.vocab is not None or args.hidden is not None:
        grid = ([args.n or QUICK[0]], [args.vocab or QUICK[1]], [args.hidden or QUICK[2]])
    elif args.quick:
        grid = ([QUICK[0]], [QUICK[1]], [QUICK[2]])
    else:
        grid = (GRID_N, GRID_V, GRID_H)
    for name, values in zip(("--n", "--vocab", "--hidden"), grid, strict=True):
        if any(v < 1 for v in values):
            raise ValueError(f"{name} must be >= 1")
    kinds = common.parse_list("--kd-kinds", args.kd_kinds, KINDS)
    if args.kd_topk < 0:
        raise ValueError("--kd-topk must be >= 0")
    if args.kd_topk and "reverse_kl" in kinds:
        raise ValueError("--kd-topk: reverse_kl is +inf against a top-K teacher")
    return [
        Case(n, v, h, d, kind, args.kd_topk)
        for n, v, h in itertools.product(*grid)
        for d in dtypes
        for kind in kinds
    ]


def format_row(row: dict, impls: list[str]) -> str:
    parts = [f"{row['case']:<26}"]
    for impl in impls:
        note = row.get(f"{impl}_note")
        parts.append(
            f"{impl} {note}" if note else f"{impl} {row[f'{impl}_ms']:>9.1f} ms {row[f'{impl}_peak_mib']:>8.0f} MiB"
        )
    for key, target in TARGETS.items():
        if key in row and row[key] == row[key]:
            verdict = "MET" if row[key] <= target else "MISS"
            computed = " vs computed eager" if key == "peak_vs_eager" and row.get("peak_vs_eager_from") else ""
            parts.append(f"{key}={row[key]:.2f} ({verdict} <= {target}{computed})")
    for other in ("fused-triton", "liger"):
        if row.get(f"{other}_loss_rel_diff") is not None:
            parts.append(f"{other}_loss_rel_diff={row[f'{other}_loss_rel_diff']:.1e}")
    parts.append(f"load {row['load_before']} -> {row['load_after']}")
    return "  ".join(parts)


def plot(rows: list[dict], impls: list[str], path: Path) -> bool:
    """Time and peak memory per case, one bar per path (a skipped path has none), into ``path``; False
    (and nothing written) without matplotlib, which flexkd does not require."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.9 * len(rows) + 3), 7), squeeze=False)
    width = 0.8 / len(impls)
    for ax, (column, label) in zip(axes[:, 0], (("ms", "fwd+bwd ms (median)"), ("peak_mib", "peak MiB above inputs")),
                                   strict=True):  # fmt: skip
        heights = {impl: [r.get(f"{impl}_{column}", math.nan) for r in rows] for impl in impls}
        for j, impl in enumerate(impls):
            ax.bar([i + j * width for i in range(len(rows))], heights[impl], width, label=impl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
        ax.set_xticklabels([r["case"] for r in rows], rotation=40, ha="right", fontsize=7)
        if any(v > 0 for values in heights.values() for v in values):  # NaN compares False
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    axes[0, 0].set_title("linear_logit_kd fwd+bwd: fused op vs the formula (eager, torch.compile)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return True


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "CPU"


def run(args: argparse.Namespace) -> int:
    try:
        cases = cases_from_args(args)
        impls = common.parse_list("--kd-impls", args.kd_impls, IMPLS)
        if "fused" not in impls:
            raise ValueError("--kd-impls must include fused")
        if args.kd_device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--kd-device cuda: no CUDA device here")
        if "fused-triton" in impls:
            from flexkd.ops._backends import unavailable_reason

            reason = unavailable_reason("triton", args.kd_device, native=False)
            if reason is not None:
                raise ValueError(f"--kd-impls fused-triton: {reason}")
        if "liger" in impls:
            if args.kd_device != "cuda":
                raise ValueError("--kd-impls liger: Liger-Kernel runs on CUDA only (--kd-device cuda)")
            try:
                import liger_kernel.transformers  # noqa: F401
            except ImportError as err:
                raise ValueError(f"--kd-impls liger: liger_kernel is not importable ({err})") from None
    except ValueError as error:
        print(f"flexkd bench: error: {error}", file=sys.stderr)
        return 2
    print(
        f"linear_logit_kd fwd+bwd, T=2, {_device_name(args.kd_device)}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores, load {load_average()}"
    )
    rows = []
    for case in cases:
        rows.append(run_case(case, impls, args.kd_reps, args.kd_device))
        print(format_row(rows[-1], impls), flush=True)
        args.kd_out.parent.mkdir(parents=True, exist_ok=True)
        common.write_csv(args.kd_out.with_suffix(".csv"), rows)
    csv_path, png_path = args.kd_out.with_suffix(".csv"), args.kd_out.with_suffix(".png")
    drawn = plot(rows, impls, png_path)
    print(f"wrote {csv_path}" + (f" and {png_path}" if drawn else " (no plot: matplotlib is not installed)"))
    return 0
