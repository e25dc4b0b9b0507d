"""Triton kernels of the importance scores, registered as ``flexkd::importance_scores_acc_triton``.

``out[j] += Σ_n w_n · f(h_nj, g_nj)`` with ``f`` = ``|h·g|`` (``grad_x_act``), ``|g|`` (``grad``) or
``g²`` (``grad_sq``); ``hidden`` and ``grad`` ``[N,D]`` with any strides. A column reduction in two
deterministic stages: programs over (row chunk, column block) write per-chunk column sums, then one
program per column block adds the chunks in order into ``out``. With a single row chunk the first
stage adds into ``out`` itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flexkd.ops.reference import STATS, accumulation_dtype

from ._common import launch, num_warps, row_weights, tile_shape, tl_dtype

# Columns per program (wide enough for coalesced loads, narrow enough to leave rows for the tile),
# and how many programs the first stage aims for before it splits rows over more chunks.
_BLOCK_COLS = 256
_TARGET_PROGRAMS = 1024
_MAX_ROW_CHUNKS = 256
_REDUCE_BLOCK_COLS = 1024


@triton.jit
def _column_sums_kernel(
    h_ptr, h_stride_n, h_stride_d,
    g_ptr, g_stride_n, g_stride_d,
    w_ptr, dest_ptr,
    n_rows, d, rows_per_chunk,
    STAT: tl.constexpr, HAS_MASK: tl.constexpr, ADD_INTO_DEST: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Column sums of ``w·f(h, g)`` over row chunk ``program_id(0)``: written to row ``chunk`` of
    ``dest [chunks, d]``, or added into ``dest [d]`` when ``ADD_INTO_DEST`` (a single chunk)."""
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    first_row = chunk * rows_per_chunk
    last_row = tl.minimum(first_row + rows_per_chunk, n_rows)
    total = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    for n0 in range(first_row, last_row, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < last_row
        rows = rows.to(tl.int64)
        ok = row_ok[:, None] & col_ok[None, :]
        g = tl.load(
            g_ptr + rows[:, None] * g_stride_n + cols[None, :] * g_stride_d, mask=ok, other=0
        )
        g = g.to(ACC)
        if STAT == "grad_x_act":
            h = tl.load(
                h_ptr + rows[:, None] * h_stride_n + cols[None, :] * h_stride_d, mask=ok, other=0
            )
            value = tl.abs(h.to(ACC) * g)
        elif STAT == "grad":
            value = tl.abs(g)
        else:
            value = g * g
        if HAS_MASK:
            value *= row_weights(w_ptr, rows, row_ok, HAS_MASK, ACC)[:, None]
        total += value
    column_sums = tl.sum(total, axis=0)
    if ADD_INTO_DEST:
        previous = tl.load(dest_ptr + cols, mask=col_ok, other=0)
        tl.store(dest_ptr + cols, previous + column_sums.to(tl.float32), mask=col_ok)
    else:
        tl.store(dest_ptr + chunk * d + cols, column_sums, mask=col_ok)


@triton.jit
def _add_chunk_sums_kernel(partials_ptr, out_ptr, n_chunks, d, BLOCK_D: tl.constexpr):
    """``out[j] += Σ_c partials[c, j]``, the chunks added in order."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    total = tl.zeros((BLOCK_D,), partials_ptr.dtype.element_ty)
    for c in range(0, n_chunks):
        total += tl.load(partials_ptr + c * d + cols, mask=col_ok, other=0)
    previous = tl.load(out_ptr + cols, mask=col_ok, other=0)
    tl.store(out_ptr + cols, previous + total.to(tl.float32), mask=col_ok)


def _row_chunks(n: int, d: int, block_n: int, block_d: int) -> int:
    """How many row chunks the first stage splits ``n`` rows into: enough programs to fill a GPU,
    each chunk a whole number of row tiles."""
    col_blocks = triton.cdiv(d, block_d)
    wanted = min(triton.cdiv(_TARGET_PROGRAMS, col_blocks), _MAX_ROW_CHUNKS)
    return max(1, min(wanted, triton.cdiv(n, block_n)))


def importance_scores_acc(
    hidden: torch.Tensor,
    grad: torch.Tensor,
    mask: torch.Tensor | None,
    stat: str,
    out: torch.Tensor,
) -> None:
    """The body of ``flexkd::importance_scores_acc_triton``: ``out += Σ_n w_n f(hidden_n, grad_n)``."""
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    if hidden.dim() != 2 or hidden.shape != grad.shape:
        raise ValueError(
            f"hidden and grad must be [N,D] of one shape, got {tuple(hidden.shape)} and {tuple(grad.shape)}"
        )
    n, d = hidden.shape
    if out.dtype != torch.float32 or out.shape != (d,) or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous fp32 [{d}] tensor, got {out.dtype} {tuple(out.shape)}"
        )
    if n == 0 or d == 0:
        return
    acc = accumulation_dtype(hidden, grad)
    has_mask = mask is not None
    if has_mask:
        mask = mask.to(torch.float32).contiguous()
    block_n, block_d = tile_shape(n, min(d, _BLOCK_COLS))
    n_chunks = _row_chunks(n, d, block_n, block_d)
    rows_per_chunk = block_n * triton.cdiv(triton.cdiv(n, n_chunks), block_n)
    n_chunks = triton.cdiv(n, rows_per_chunk)
    single_chunk = n_chunks == 1
    dest = out if single_chunk else torch.empty((n_chunks, d), dtype=acc, device=out.device)
    launch(_column_sums_kernel)[(n_chunks, triton.cdiv(d, block_d))](
        hidden, hidden.stride(0), hidden.stride(1),
        grad, grad.stride(0), grad.stride(1),
        mask if has_mask else grad, dest,  # an unread pointer gets a read-only input
        n, d, rows_per_chunk,
        STAT=stat, HAS_MASK=has_mask, ADD_INTO_DEST=single_chunk,
        ACC=tl_dtype(acc), BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps(block_n, block_d),
    )  # fmt: skip
    if not single_chunk:
        launch(_add_chunk_sums_kernel)[(triton.cdiv(d, _REDUCE_BLOCK_COLS),)](
            dest, out, n_chunks, d, BLOCK_D=_REDUCE_BLOCK_COLS, num_warps=4
        )


importance_scores_acc_triton = torch.library.triton_op(
    "flexkd::importance_scores_acc_triton", importance_scores_acc, mutates_args={"out"}
)


@importance_scores_acc_triton.register_fake
def _(hidden, grad, mask, stat, out) -> None:
    return None
