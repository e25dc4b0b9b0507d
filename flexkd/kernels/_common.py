"""What the Triton launchers share: dtype mapping, tile-shape heuristics and the launch hook.

Every kernel launch goes through :func:`launch`, which is ``torch.library.wrap_triton`` (so
``torch.compile`` traces into the kernels) unless a :class:`LaunchRecorder` is active. The recorder lets
``compile_check`` run the real launchers on ``meta`` tensors and collect exactly the kernel
specialisations they would launch, without a GPU and without duplicating the launch logic.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}

# Elements one program holds in registers per tile, and the widest tile a program spans.
TILE_ELEMENTS = 4096
MAX_BLOCK_COLS = 1024


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(
            f"the Triton kernels take fp32/fp64/bf16/fp16 tensors, got {dtype}"
        ) from None


def tile_shape(n_rows: int, n_cols: int, max_cols: int = MAX_BLOCK_COLS) -> tuple[int, int]:
    """``(BLOCK_ROWS, BLOCK_COLS)`` powers of two: as many columns as fit (up to ``max_cols``), then
    rows until the tile holds ``TILE_ELEMENTS``, never more rows than there are."""
    block_cols = min(triton.next_power_of_2(max(n_cols, 1)), max_cols)
    block_rows = max(1, min(TILE_ELEMENTS // block_cols, triton.next_power_of_2(max(n_rows, 1))))
    return block_rows, block_cols


def num_warps(block_rows: int, block_cols: int) -> int:
    return 8 if block_rows * block_cols >= 4096 else 4


@dataclasses.dataclass(frozen=True)
class RecordedLaunch:
    """One kernel launch as ``compile_check`` sees it: the kernel and its arguments by name."""

    kernel: Any
    grid: tuple
    args: dict[str, Any]
    num_warps: int


class LaunchRecorder:
    def __init__(self) -> None:
        self.launches: list[RecordedLaunch] = []

    def bind(self, kernel) -> _RecordingLauncher:
        return _RecordingLauncher(self, kernel)


class _RecordingLauncher:
    def __init__(self, recorder: LaunchRecorder, kernel) -> None:
        self._recorder, self._kernel = recorder, kernel

    def __getitem__(self, grid):
        def record(*args, num_warps: int = 4, **kwargs):
            named = dict(zip(self._kernel.arg_names, args, strict=False))
            named.update(kwargs)
            self._recorder.launches.append(
                RecordedLaunch(self._kernel, tuple(grid), named, num_warps)
            )

        return record


_active_recorder: LaunchRecorder | None = None


def launch(kernel):
    """``wrap_triton(kernel)``, or the active recorder's stand-in while :func:`recording`."""
    if _active_recorder is not None:
        return _active_recorder.bind(kernel)
    return wrap_triton(kernel)


@contextlib.contextmanager
def recording() -> Iterator[LaunchRecorder]:
    """Record launches instead of running them (the launchers can then run on ``meta`` tensors)."""
    global _active_recorder
    previous, _active_recorder = _active_recorder, LaunchRecorder()
    try:
        yield _active_recorder
    finally:
        _active_recorder = previous


@triton.jit
def store_as(ptr, offsets, value, mask):
    """``ptr[offsets] = value`` in ``ptr``'s element type. fp64 values reach narrower types through
    fp32: the interpreter mis-converts fp64 -> bf16 directly (Triton 3.9), and the detour changes a
    16-bit result by at most one double-rounding step."""
    if ptr.dtype.element_ty != tl.float64:
        value = value.to(tl.float32)
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def row_weights(w_ptr, rows, row_ok, HAS_MASK: tl.constexpr, ACC: tl.constexpr):
    """Row weights ``w[rows]`` (1 without a mask), 0 for rows past the end."""
    if HAS_MASK:
        w = tl.load(w_ptr + rows, mask=row_ok, other=0).to(ACC)
    else:
        w = row_ok.to(ACC)
    return w
