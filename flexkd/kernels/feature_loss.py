"""Triton kernels of the Flex-KD feature loss, registered as ``flexkd::feature_loss_fwd_triton``.

The op contract (the same for every backend) is in ``flexkd/ops/reference.py::feature_loss_fwd``:
student ``[N,k]`` and teacher ``[N,D]`` with any strides, the selected teacher columns read in place
through ``index`` (never gathered into memory), row weights ``mask``, accumulation in fp32 (fp64 when
an input is fp64), and the gradients for ``grad_output == 1`` computed alongside the loss.

* ``mse``: one pass. Each program takes a block of rows, walks the k columns once, and writes the
  per-row loss (``none``) or its block's partial sum, plus the student/teacher gradients. ``mean``
  scales by ``1/(k·W)`` inside the kernel, with ``W = Σ mask`` read from a device scalar (no host sync).
* ``corr``: the algorithm of ``reference.py`` ("corr statistics"): a statistics pass where each
  program merges its row tiles (each two-pass: its own means, then centred moments) into per-column
  weighted means, second moments and co-moment with Chan's pairwise update, the reference's
  fixed-order merge of those partials across programs, then one gradient pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flexkd.ops import _registration, reference
from flexkd.ops.reference import LOSSES, REDUCTIONS

from ._common import (
    launch,
    num_warps,
    row_weights,
    store_as,
    tile_shape,
    tl_dtype,
)

# A corr statistics program merges at most this many rows before writing its partials, in tiles at
# most this wide (tall tiles amortise the per-tile merge over more rows).
_CORR_ROWS_PER_PROGRAM = 512
_CORR_STATS_MAX_COLS = 128


@triton.jit
def _nonzero(x):
    """``x`` with zeros replaced by 1: a divisor whose zero case the caller masks out anyway."""
    return tl.where(x != 0, x, 1.0)


@triton.jit
def _load_tiles(
    s_ptr, s_stride_n, s_stride_k, t_ptr, t_stride_n, t_stride_d,
    rows, cols, teacher_cols, ok, ACC: tl.constexpr,
):  # fmt: skip
    """The student tile ``s[rows, cols]`` and the teacher tile ``t[rows, index[cols]]``, read in place
    (``teacher_cols = index[cols]``) and converted to the accumulation dtype; 0 where ``~ok``."""
    s = tl.load(s_ptr + rows[:, None] * s_stride_n + cols[None, :] * s_stride_k, mask=ok, other=0)
    t_offsets = rows[:, None] * t_stride_n + teacher_cols[None, :] * t_stride_d
    t = tl.load(t_ptr + t_offsets, mask=ok, other=0)
    return s.to(ACC), t.to(ACC)


# --------------------------------------------------------------------------------------------- mse


@triton.jit
def _mse_kernel(
    s_ptr, s_stride_n, s_stride_k,
    t_ptr, t_stride_n, t_stride_d,
    index_ptr, w_ptr, weight_sum_ptr,
    loss_ptr, grad_s_ptr, grad_t_ptr,
    n_rows, k,
    HAS_MASK: tl.constexpr, MEAN: tl.constexpr, PER_ROW_LOSS: tl.constexpr,
    WRITE_GRAD_S: tl.constexpr, WRITE_GRAD_T: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    w = row_weights(w_ptr, rows, row_ok, HAS_MASK, ACC)
    if MEAN:
        if HAS_MASK:
            total_weight = tl.load(weight_sum_ptr).to(ACC)
        else:
            total_weight = tl.cast(n_rows, ACC)
        # `!= 0`: a NaN weight reaches the loss.
        scale = tl.where(total_weight != 0, 1.0 / (k * _nonzero(total_weight)), 0.0).to(ACC)
    else:
        scale = tl.full((), 1.0, ACC)
    grad_weight = (2 * scale) * w
    row_loss = tl.zeros((BLOCK_N,), ACC)
    for k0 in range(0, k, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k
        teacher_cols = tl.load(index_ptr + cols, mask=col_ok, other=0)
        ok = row_ok[:, None] & col_ok[None, :]
        s, t = _load_tiles(
            s_ptr, s_stride_n, s_stride_k, t_ptr, t_stride_n, t_stride_d,
            rows, cols, teacher_cols, ok, ACC,
        )  # fmt: skip
        diff = s - t
        row_loss += tl.sum(diff * diff, axis=1)
        grad = grad_weight[:, None] * diff
        out = rows[:, None] * k + cols[None, :]
        if WRITE_GRAD_S:
            store_as(grad_s_ptr, out, grad, ok)
        if WRITE_GRAD_T:
            store_as(grad_t_ptr, out, -grad, ok)
    row_loss = row_loss * w * scale
    if PER_ROW_LOSS:
        tl.store(loss_ptr + rows, row_loss, mask=row_ok)
    else:
        tl.store(loss_ptr + pid, tl.sum(row_loss, axis=0))


def _mse(student, teacher, index, mask, reduction, grad_s, grad_t, acc):
    n, k = student.shape
    block_n, block_k = tile_shape(n, k)
    n_programs = triton.cdiv(n, block_n)
    per_row = reduction == "none"
    loss = torch.empty(n if per_row else n_programs, dtype=acc, device=student.device)
    has_mask = mask is not None
    mean = reduction == "mean"
    # Pointers a specialisation never reads get a read-only input (never a written buffer, which
    # would alias an output under torch.compile's functionalisation).
    weight_sum = mask.sum() if has_mask and mean else index
    launch(_mse_kernel)[(n_programs,)](
        student, student.stride(0), student.stride(1),
        teacher, teacher.stride(0), teacher.stride(1),
        index, mask if has_mask else index, weight_sum,
        loss, grad_s, grad_t,
        n, k,
        HAS_MASK=has_mask, MEAN=mean, PER_ROW_LOSS=per_row,
        WRITE_GRAD_S=grad_s.numel() > 0, WRITE_GRAD_T=grad_t.numel() > 0,
        ACC=tl_dtype(acc), BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps(block_n, block_k),
    )  # fmt: skip
    return loss if per_row else loss.sum()


# -------------------------------------------------------------------------------------------- corr


@triton.jit
def _corr_stats_kernel(
    s_ptr, s_stride_n, s_stride_k,
    t_ptr, t_stride_n, t_stride_d,
    index_ptr, w_ptr, partials_ptr,
    n_rows, k, rows_per_program, n_row_programs,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Per column, over this program's rows: total weight, weighted means of s and t, the centred
    second moments Σw(s−μs)², Σw(t−μt)² and the co-moment Σw(s−μs)(t−μt), written to
    ``partials[stat, row_program, column]``."""
    row_program = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < k
    teacher_cols = tl.load(index_ptr + cols, mask=col_ok, other=0)
    weight = tl.zeros((BLOCK_K,), ACC)
    mean_s = tl.zeros((BLOCK_K,), ACC)
    mean_t = tl.zeros((BLOCK_K,), ACC)
    m2_s = tl.zeros((BLOCK_K,), ACC)
    m2_t = tl.zeros((BLOCK_K,), ACC)
    co_m2 = tl.zeros((BLOCK_K,), ACC)
    first_row = row_program * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, n_rows)
    for n0 in range(first_row, last_row, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < last_row
        rows = rows.to(tl.int64)
        w = row_weights(w_ptr, rows, row_ok, HAS_MASK, ACC)
        ok = row_ok[:, None] & col_ok[None, :]
        s, t = _load_tiles(
            s_ptr, s_stride_n, s_stride_k, t_ptr, t_stride_n, t_stride_d,
            rows, cols, teacher_cols, ok, ACC,
        )  # fmt: skip
        # This tile's own statistics, centred on its own means ...
        # (`!= 0` rather than `> 0` throughout: a NaN weight must reach the result.)
        tile_weight = tl.sum(w, axis=0)
        inv_tile_weight = tl.where(tile_weight != 0, 1.0 / _nonzero(tile_weight), 0.0)
        w2 = w[:, None]
        tile_mean_s = tl.sum(w2 * s, axis=0) * inv_tile_weight
        tile_mean_t = tl.sum(w2 * t, axis=0) * inv_tile_weight
        a = s - tile_mean_s[None, :]
        b = t - tile_mean_t[None, :]
        # ... merged into the running ones (Chan, Golub & LeVeque's pairwise update).
        merged_weight = weight + tile_weight
        frac = tl.where(merged_weight != 0, tile_weight / _nonzero(merged_weight), 0.0)
        delta_s = tile_mean_s - mean_s
        delta_t = tile_mean_t - mean_t
        m2_s += tl.sum(w2 * a * a, axis=0) + delta_s * delta_s * weight * frac
        m2_t += tl.sum(w2 * b * b, axis=0) + delta_t * delta_t * weight * frac
        co_m2 += tl.sum(w2 * a * b, axis=0) + delta_s * delta_t * weight * frac
        mean_s += delta_s * frac
        mean_t += delta_t * frac
        weight = merged_weight
    stat_stride = n_row_programs * k
    out = partials_ptr + row_program * k + cols
    tl.store(out + 0 * stat_stride, weight, mask=col_ok)
    tl.store(out + 1 * stat_stride, mean_s, mask=col_ok)
    tl.store(out + 2 * stat_stride, mean_t, mask=col_ok)
    tl.store(out + 3 * stat_stride, m2_s, mask=col_ok)
    tl.store(out + 4 * stat_stride, m2_t, mask=col_ok)
    tl.store(out + 5 * stat_stride, co_m2, mask=col_ok)


@triton.jit
def _corr_grad_kernel(
    s_ptr, s_stride_n, s_stride_k,
    t_ptr, t_stride_n, t_stride_d,
    index_ptr, w_ptr, coef_ptr,
    grad_s_ptr, grad_t_ptr,
    n_rows, k,
    HAS_MASK: tl.constexpr, WRITE_GRAD_S: tl.constexpr, WRITE_GRAD_T: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``grad_s = coef·w·(b − alpha_s·a)``, ``grad_t = coef·w·(a − alpha_t·b)`` with ``a = s − mean_s``,
    ``b = t − mean_t`` and the per-column ``mean_s, mean_t, coef, alpha_s, alpha_t`` rows of
    ``coef_ptr [5, k]``."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    col_ok = cols < k
    rows = rows.to(tl.int64)
    ok = row_ok[:, None] & col_ok[None, :]
    teacher_cols = tl.load(index_ptr + cols, mask=col_ok, other=0)
    mean_s = tl.load(coef_ptr + 0 * k + cols, mask=col_ok, other=0)
    mean_t = tl.load(coef_ptr + 1 * k + cols, mask=col_ok, other=0)
    coef = tl.load(coef_ptr + 2 * k + cols, mask=col_ok, other=0)
    w = row_weights(w_ptr, rows, row_ok, HAS_MASK, ACC)
    s, t = _load_tiles(
        s_ptr, s_stride_n, s_stride_k, t_ptr, t_stride_n, t_stride_d,
        rows, cols, teacher_cols, ok, ACC,
    )  # fmt: skip
    a = s - mean_s[None, :]
    b = t - mean_t[None, :]
    scale = w[:, None] * coef[None, :]
    out = rows[:, None] * k + cols[None, :]
    if WRITE_GRAD_S:
        alpha_s = tl.load(coef_ptr + 3 * k + cols, mask=col_ok, other=0)
        store_as(grad_s_ptr, out, scale * (b - alpha_s[None, :] * a), ok)
    if WRITE_GRAD_T:
        alpha_t = tl.load(coef_ptr + 4 * k + cols, mask=col_ok, other=0)
        store_as(grad_t_ptr, out, scale * (a - alpha_t[None, :] * b), ok)


def _enough_rows(mask: torch.Tensor | None, n: int, device) -> torch.Tensor:
    """Whether at least two rows have a weight, as a device tensor (no host sync with a mask)."""
    if mask is None:
        return torch.full((), n >= 2, dtype=torch.bool, device=device)
    return reference.weighted_rows(mask) >= 2


def _corr(student, teacher, index, mask, reduction, eps, grad_s, grad_t, acc):
    n, k = student.shape
    has_mask = mask is not None
    block_n, block_k = tile_shape(n, k, _CORR_STATS_MAX_COLS)
    rows_per_program = block_n * triton.cdiv(min(n, _CORR_ROWS_PER_PROGRAM), block_n)
    n_row_programs = triton.cdiv(n, rows_per_program)
    partials = torch.empty((6, n_row_programs, k), dtype=acc, device=student.device)
    launch(_corr_stats_kernel)[(n_row_programs, triton.cdiv(k, block_k))](
        student, student.stride(0), student.stride(1),
        teacher, teacher.stride(0), teacher.stride(1),
        index, mask if has_mask else index, partials,
        n, k, rows_per_program, n_row_programs,
        HAS_MASK=has_mask, ACC=tl_dtype(acc), BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps(block_n, block_k),
    )  # fmt: skip
    weight, mean_s, mean_t, m2_s, m2_t, co_m2 = reference.merge_moments(*partials.unbind(0))
    c = 1.0 / k if reduction == "mean" else 1.0
    per_dim, coef, alpha_s, alpha_t = reference.corr_terms(
        weight, m2_s, m2_t, co_m2, eps, c, _enough_rows(mask, n, student.device)
    )
    if grad_s.numel() or grad_t.numel():
        table = torch.stack((mean_s, mean_t, coef, alpha_s, alpha_t)).contiguous()
        grad_n, grad_k = tile_shape(n, k)
        launch(_corr_grad_kernel)[(triton.cdiv(n, grad_n), triton.cdiv(k, grad_k))](
            student, student.stride(0), student.stride(1),
            teacher, teacher.stride(0), teacher.stride(1),
            index, mask if has_mask else index, table,
            grad_s, grad_t,
            n, k,
            HAS_MASK=has_mask, WRITE_GRAD_S=grad_s.numel() > 0, WRITE_GRAD_T=grad_t.numel() > 0,
            ACC=tl_dtype(acc), BLOCK_N=grad_n, BLOCK_K=grad_k,
            num_warps=num_warps(grad_n, grad_k),
        )  # fmt: skip
    if reduction == "none":
        return per_dim
    return per_dim.mean() if reduction == "mean" else per_dim.sum()


# ---------------------------------------------------------------------------------------- the op


def _zero_rows_loss(student, loss, reduction, acc) -> torch.Tensor:
    """The loss over N == 0 rows: 0, an empty per-row vector (mse none) or k zeros (corr none)."""
    if reduction != "none":
        return student.new_zeros((), dtype=acc)
    return student.new_zeros((0,) if loss == "mse" else (student.shape[1],), dtype=acc)


def feature_loss_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    index: torch.Tensor,
    mask: torch.Tensor | None,
    loss: str,
    reduction: str,
    eps: float,
    student_grad: bool,
    teacher_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The body of ``flexkd::feature_loss_fwd_triton``: ``(loss, grad_student, grad_teacher_columns)``
    for ``grad_output == 1``, an empty ``[0]`` gradient where one was not asked for."""
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher must be [N,k] and [N,D], got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if index.dtype != torch.int64 or index.shape != (student.shape[1],):
        raise ValueError(
            f"index must be int64 [{student.shape[1]}], got {index.dtype} {tuple(index.shape)}"
        )
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    acc = reference.accumulation_dtype(student, teacher)
    index = index.contiguous()
    if mask is not None:
        mask = mask.to(acc).contiguous()
    n, k = student.shape
    grad_s = student.new_empty((n, k) if student_grad else (0,))
    grad_t = teacher.new_empty((n, k) if teacher_grad else (0,))
    if n == 0:
        return _zero_rows_loss(student, loss, reduction, acc), grad_s, grad_t
    if loss == "mse":
        value = _mse(student, teacher, index, mask, reduction, grad_s, grad_t, acc)
    else:
        value = _corr(student, teacher, index, mask, reduction, eps, grad_s, grad_t, acc)
    return value, grad_s, grad_t


feature_loss_fwd_triton = torch.library.triton_op(
    "flexkd::feature_loss_fwd_triton", feature_loss_fwd, mutates_args=()
)
feature_loss_fwd_triton.register_fake(_registration.feature_loss_fake)
_registration.register_feature_loss_autograd("flexkd::feature_loss_fwd_triton")
