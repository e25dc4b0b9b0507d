"""Compile every Triton kernel specialisation the launchers use for real GPU targets, without a GPU.

The launchers run on ``meta`` tensors while :func:`flexkd.kernels._common.recording` is active, so the
kernels, argument types, constexprs and launch options come from the same code that launches them on
a GPU. Each distinct specialisation is then compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` down to a cubin (ptxas ships inside the Triton wheel).

Run ``python -m flexkd.kernels.compile_check`` (or ``.ci/triton_compile_check.py``): it prints one
table row per kernel, specialisation and architecture and exits non-zero when any compile fails.
It needs JIT-mode kernels: do not set ``TRITON_INTERPRET`` for it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator

import torch
import triton
import triton.language
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import native_specialize_impl

from . import _common, feature_loss, importance, linear_logit_kd

DEFAULT_ARCHS = (80, 90)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (name, rows N, teacher width D, student width k): one large, aligned shape and one odd one, in
# every dtype; and sizes of 1, which Triton specialises into constants (dtype-independent).
SHAPES = (("aligned", 4096, 4096, 2048), ("odd", 37, 4099, 13))
UNIT_SHAPES = (("unit", 1, 5, 1),)


def _dtypes_and_shapes():
    yield from itertools.product(DTYPES, SHAPES)
    yield from itertools.product((torch.float32,), UNIT_SHAPES)


_POINTER_TYPES = {
    torch.float32: "*fp32",
    torch.float64: "*fp64",
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.int64: "*i64",
    torch.int32: "*i32",
}


@dataclasses.dataclass(frozen=True)
class Specialisation:
    """One compile unit: a kernel with its argument types, constexpr values and launch options."""

    kernel: triton.runtime.JITFunction
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    divisible: tuple[int, ...]  # argument positions specialised as multiples of 16
    num_warps: int

    @property
    def label(self) -> str:
        types = [t for _, t in self.signature if t.startswith("*")]
        flags = [f"{k}={_short(v)}" for k, v in self.constexprs if not k.islower()]
        ones = [f"{k}=1" for k, v in self.constexprs if k.islower()]
        divisible_ints = sum(not self.signature[i][1].startswith("*") for i in self.divisible)
        ints = f"{' '.join(ones)} {divisible_ints}x16".strip()
        return f"{' '.join(types)} {' '.join(flags)} [{ints}] w{self.num_warps}"


def _short(value) -> str:
    return value.name if isinstance(value, triton.language.dtype) else str(value)


def _argument_type(value) -> tuple[str, str | None]:
    """What Triton's JIT would specialise ``value`` as: (type, "D" when a multiple of 16 or None)."""
    if isinstance(value, torch.Tensor):
        # Fresh torch allocations are 16-byte aligned, as the JIT sees them on a GPU.
        return _POINTER_TYPES[value.dtype], "D"
    return native_specialize_impl(BaseBackend, value, False, True, True)


def specialisation_of(launch: _common.RecordedLaunch) -> Specialisation:
    kernel = launch.kernel
    signature, constexprs, divisible = [], [], []
    for position, (name, param) in enumerate(zip(kernel.arg_names, kernel.params, strict=True)):
        value = launch.args[name]
        if param.is_constexpr:
            signature.append((name, "constexpr"))
            constexprs.append((name, value))
            continue
        kind, attr = _argument_type(value)
        if kind == "constexpr":  # Triton specialises an integer argument equal to 1 away
            constexprs.append((name, attr))
        elif attr == "D":
            divisible.append(position)
        signature.append((name, kind))
    return Specialisation(
        kernel, tuple(signature), tuple(constexprs), tuple(divisible), launch.num_warps
    )


def _feature_loss_cases() -> Iterator[tuple]:
    for (dtype, (_, n, d, k)), loss, reduction, masked, teacher_grad in itertools.product(
        _dtypes_and_shapes(), ("mse", "corr"), ("mean", "sum", "none"), (False, True), (False, True)
    ):
        meta = {"device": "meta"}
        student = torch.empty(n, k, dtype=dtype, **meta)
        teacher = torch.empty(n, d + 8, dtype=dtype, **meta)[:, 4 : d + 4]
        index = torch.empty(k, dtype=torch.int64, **meta)
        mask = torch.empty(n, dtype=torch.float32, **meta) if masked else None
        yield feature_loss.feature_loss_fwd, (
            student, teacher, index, mask, loss, reduction, 1e-6, True, teacher_grad,
        )  # fmt: skip


def _importance_cases() -> Iterator[tuple]:
    for (dtype, (_, n, d, _k)), stat, masked in itertools.product(
        _dtypes_and_shapes(), ("grad_x_act", "grad", "grad_sq"), (False, True)
    ):
        meta = {"device": "meta"}
        hidden = torch.empty(n, d, dtype=dtype, **meta)
        grad = torch.empty(n, d, dtype=dtype, **meta)
        mask = torch.empty(n, dtype=torch.float32, **meta) if masked else None
        out = torch.empty(d, dtype=torch.float32, **meta)
        yield importance.importance_scores_acc, (hidden, grad, mask, stat, out)


# (name, vocabulary V): a real LLM vocabulary (a multiple of 16), an odd one, and V = 1.
LOGIT_VOCABS = (("llm", 151936), ("odd", 4099), ("unit", 1))


def _linear_logit_kd_cases() -> Iterator[tuple]:
    for teacher_dtype, (_, vocab), kind in itertools.product(
        DTYPES, LOGIT_VOCABS, ("forward_kl", "reverse_kl", "jsd")
    ):
        meta = {"device": "meta"}
        hidden = torch.empty(4, 64, dtype=torch.bfloat16, **meta)
        weight = torch.empty(vocab, 64, dtype=torch.bfloat16, **meta)
        teacher = torch.empty(4, vocab, dtype=teacher_dtype, **meta)
        yield linear_logit_kd.linear_logit_kd_fwd, (
            hidden, weight, None, teacher, None, None, None, kind, 0.5, 2.0, 4, True, True, False,
        )  # fmt: skip
        if kind == "reverse_kl":
            continue
        for top_k in sorted({1, min(100, vocab)}):  # K = 1, and a K that is not a power of 2
            values = torch.empty(4, top_k, dtype=teacher_dtype, **meta)
            indices = torch.empty(4, top_k, dtype=torch.int64, **meta)
            yield linear_logit_kd.linear_logit_kd_fwd, (
                hidden, weight, None, None, values, indices, None, kind, 0.5, 2.0, 4, True, True, False,
            )  # fmt: skip


def collect_specialisations() -> list[Specialisation]:
    """Every distinct specialisation the launchers launch for fp32/bf16/fp16 over :data:`SHAPES`
    (and fp32 over :data:`UNIT_SHAPES`)."""
    with _common.recording() as recorder:
        for body, args in itertools.chain(
            _feature_loss_cases(), _importance_cases(), _linear_logit_kd_cases()
        ):
            body(*args)
    unique: dict[tuple, Specialisation] = {}
    for launch in recorder.launches:
        spec = specialisation_of(launch)
        key = (
            spec.kernel.__name__,
            spec.signature,
            repr(spec.constexprs),
            spec.divisible,
            spec.num_warps,
        )
        unique.setdefault(key, spec)
    return list(unique.values())


def compile_for(spec: Specialisation, arch: int):
    """The compiled kernel of ``spec`` for ``sm_<arch>`` (raises on a compile error)."""
    target = GPUTarget("cuda", arch, 32)
    source = ASTSource(
        spec.kernel,
        dict(spec.signature),
        dict(spec.constexprs),
        {(position,): [["tt.divisibility", 16]] for position in spec.divisible},
    )
    options = make_backend(target).parse_options({"num_warps": spec.num_warps})
    return triton.compile(source, target=target, options=options.__dict__)


@dataclasses.dataclass
class Result:
    kernel: str
    label: str
    arch: int
    ok: bool
    seconds: float
    detail: str  # cubin size and shared memory on success, the error on failure


def check(archs: Iterable[int] = DEFAULT_ARCHS, progress: bool = False) -> list[Result]:
    """Compile every collected specialisation for every arch; one :class:`Result` each."""
    if isinstance(feature_loss._mse_kernel, InterpretedFunction):
        raise RuntimeError("compile_check needs JIT-mode kernels: run it without TRITON_INTERPRET")
    specs = collect_specialisations()
    jobs = [(index, arch) for index in range(len(specs)) for arch in archs]
    workers = max(1, min(os.cpu_count() or 1, 8))
    # Forked workers inherit the collected specialisations (kernels are not picklable).
    global _SPECS
    _SPECS = specs
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        outcomes = pool.map(_compile_job, jobs)
        if progress:
            from tqdm import tqdm

            outcomes = tqdm(outcomes, total=len(jobs), desc="triton compile", unit="kernel")
        results = list(outcomes)
    _SPECS = []
    return results


_SPECS: list[Specialisation] = []


def _compile_job(job: tuple[int, int]) -> Result:
    index, arch = job
    spec = _SPECS[index]
    start = time.perf_counter()
    try:
        compiled = compile_for(spec, arch)
    except Exception as err:  # noqa: BLE001 - every failure is reported in the table
        last_line = (str(err).strip().splitlines() or [""])[-1][:200]
        detail, ok = f"{type(err).__name__}: {last_line}", False
    else:
        detail, ok = f"cubin={len(compiled.asm['cubin'])}B smem={compiled.metadata.shared}", True
    seconds = time.perf_counter() - start
    return Result(spec.kernel.__name__, spec.label, arch, ok, seconds, detail)


def format_table(results: list[Result]) -> str:
    header = ("kernel", "specialisation", "arch", "status", "s", "detail")
    rows = [
        (r.kernel, r.label, f"sm_{r.arch}", "ok" if r.ok else "FAIL", f"{r.seconds:.1f}", r.detail)
        for r in results
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    failed = sum(not r.ok for r in results)
    lines.append(f"{len(results)} compiles, {failed} failed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", type=int, action="append", help="sm arch (repeatable), default 80 and 90"
    )
    args = parser.parse_args(argv)
    results = check(args.arch or DEFAULT_ARCHS, progress=True)
    print(format_table(results))
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
