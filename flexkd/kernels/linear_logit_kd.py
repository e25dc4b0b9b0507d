"""Triton kernel of ``linear_logit_kd``, registered as ``flexkd::linear_logit_kd_fwd_triton``.

The op is ``flexkd.ops.linear_logit_kd_impl.fwd_chunked`` (matmuls per chunk of rows, on cuBLAS) with the
softmax/KD part of each chunk done by :func:`_kd_rows_kernel`: one program per row walks the vocabulary
in blocks, first for both log-sum-exps (online max/sum), then for the loss, then (``reverse_kl`` and
``jsd``, whose gradient needs the row's loss) for the gradient, written over the student logits in place.
A top-K teacher (forward KL, JSD) has :func:`_kd_rows_topk_kernel`: one pass over the row for the student's
log-sum-exp and one to write the off-support gradient, the rest over the K teacher entries. The closed
forms are those of ``flexkd/ops/linear_logit_kd_impl.py``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from flexkd.ops import _registration, linear_logit_kd_impl

from ._common import launch, tl_dtype

_MAX_BLOCK_V = 2048
_KIND_IDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


@triton.jit
def _online_lse(m, d, x):
    """Merge block ``x`` into a running (max ``m``, sum of ``exp(x - m)`` ``d``)."""
    block_max = tl.max(x, axis=0)
    new_m = tl.maximum(m, block_max)
    # While a row has seen only -inf (a masked vocabulary's first blocks), exp(-inf - -inf) would be NaN:
    # the rescale is then 1 and the block's terms are exp(-inf - 0) = 0.
    shift = tl.where(new_m == -float("inf"), 0.0, new_m)
    d = d * tl.where(new_m == m, 1.0, tl.exp(m - new_m)) + tl.sum(tl.exp(x - shift), axis=0)
    return new_m, d


@triton.jit
def _log_mixture(log_p, log_q, log_beta, log_one_minus_beta):
    """``log m`` of JSD's mixture ``m = beta·p + (1 - beta)·q``, from the log-probabilities."""
    a = log_p + log_beta
    b = log_q + log_one_minus_beta
    hi = tl.maximum(a, b)
    return hi + tl.log(tl.exp(a - hi) + tl.exp(b - hi))


@triton.jit
def _kd_rows_kernel(
    z_ptr, z_stride, t_ptr, t_stride, loss_ptr, V,
    inv_t, t_scale, log_beta, log_one_minus_beta, beta,
    KIND: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    t_row = t_ptr + row * t_stride
    cols = tl.arange(0, BLOCK_V)
    neg_inf = -float("inf")
    m_s = tl.full((), neg_inf, ACC)
    d_s = tl.zeros((), ACC)
    m_t = tl.full((), neg_inf, ACC)
    d_t = tl.zeros((), ACC)
    for start in range(0, V, BLOCK_V):
        ok = start + cols < V
        s = tl.load(z_row + start + cols, mask=ok, other=neg_inf).to(ACC) * inv_t
        t = tl.load(t_row + start + cols, mask=ok, other=neg_inf).to(ACC) * inv_t
        m_s, d_s = _online_lse(m_s, d_s, s)
        m_t, d_t = _online_lse(m_t, d_t, t)
    # log q = (s - m_s) - log d_s: rounding the shift m_s + log d_s first would cost |m_s|·eps in every
    # log-probability, which a KL of two close distributions does not cancel.
    log_d_s = tl.log(d_s)
    log_d_t = tl.log(d_t)

    loss = tl.zeros((), ACC)
    aux = tl.zeros((), ACC)  # jsd: KL(q || m)
    for start in range(0, V, BLOCK_V):
        ok = start + cols < V
        log_q = (tl.load(z_row + start + cols, mask=ok, other=0).to(ACC) * inv_t - m_s) - log_d_s
        log_p = (tl.load(t_row + start + cols, mask=ok, other=0).to(ACC) * inv_t - m_t) - log_d_t
        q = tl.exp(log_q)
        p = tl.exp(log_p)
        if KIND == 0:
            loss += tl.sum(tl.where(ok & (p > 0), p * (log_p - log_q), 0.0), axis=0)
            tl.store(z_row + start + cols, (q - p) * t_scale, mask=ok)
        elif KIND == 1:
            loss += tl.sum(tl.where(ok & (q > 0), q * (log_q - log_p), 0.0), axis=0)
        else:
            log_m = _log_mixture(log_p, log_q, log_beta, log_one_minus_beta)
            loss += tl.sum(tl.where(ok & (p > 0), p * (log_p - log_m), 0.0), axis=0)
            aux += tl.sum(tl.where(ok & (q > 0), q * (log_q - log_m), 0.0), axis=0)
    if KIND == 2:
        loss = beta * loss + (1.0 - beta) * aux
    if KIND != 0:
        for start in range(0, V, BLOCK_V):
            ok = start + cols < V
            log_q = (tl.load(z_row + start + cols, mask=ok, other=0).to(ACC) * inv_t - m_s) - log_d_s
            log_p = (tl.load(t_row + start + cols, mask=ok, other=0).to(ACC) * inv_t - m_t) - log_d_t
            q = tl.exp(log_q)
            if KIND == 1:
                grad = tl.where(q > 0, q * (log_q - log_p - loss), 0.0)
            else:
                log_m = _log_mixture(log_p, log_q, log_beta, log_one_minus_beta)
                grad = tl.where(q > 0, (1.0 - beta) * q * (log_q - log_m - aux), 0.0)
            tl.store(z_row + start + cols, grad * t_scale, mask=ok)
    tl.store(loss_ptr + row, loss * t_scale * t_scale)


@triton.jit
def _kd_rows_topk_kernel(
    z_ptr, z_stride, v_ptr, v_stride, i_ptr, i_stride, log_q_k_ptr, loss_ptr, V, K,
    inv_t, t_scale, log_beta, log_one_minus_beta, beta,
    KIND: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """One row against the renormalised top-K teacher: ``KIND`` 0 forward KL, 2 JSD. ``log_q_k`` is a
    ``[rows, K]`` scratch for the student's log-probabilities at the teacher's entries, read back after
    the row's logits are overwritten by the gradient."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    v_row = v_ptr + row * v_stride
    i_row = i_ptr + row * i_stride
    lq_row = log_q_k_ptr + row * K
    cols = tl.arange(0, BLOCK_V)
    ks = tl.arange(0, BLOCK_K)
    neg_inf = -float("inf")
    m_s = tl.full((), neg_inf, ACC)
    d_s = tl.zeros((), ACC)
    for start in range(0, V, BLOCK_V):
        ok = start + cols < V
        m_s, d_s = _online_lse(m_s, d_s, tl.load(z_row + start + cols, mask=ok, other=neg_inf).to(ACC) * inv_t)
    m_t = tl.full((), neg_inf, ACC)
    d_t = tl.zeros((), ACC)
    for start in range(0, K, BLOCK_K):
        ok = start + ks < K
        m_t, d_t = _online_lse(m_t, d_t, tl.load(v_row + start + ks, mask=ok, other=neg_inf).to(ACC) * inv_t)
    log_d_s = tl.log(d_s)
    log_d_t = tl.log(d_t)

    kl_pm = tl.zeros((), ACC)  # forward KL: the loss
    kl_qm = tl.zeros((), ACC)  # jsd: KL(q || m) over the support, then with the tail
    q_support = tl.zeros((), ACC)
    for start in range(0, K, BLOCK_K):
        ok = start + ks < K
        idx = tl.load(i_row + start + ks, mask=ok, other=0)
        log_q = (tl.load(z_row + idx, mask=ok, other=0).to(ACC) * inv_t - m_s) - log_d_s
        log_p = (tl.load(v_row + start + ks, mask=ok, other=0).to(ACC) * inv_t - m_t) - log_d_t
        tl.store(lq_row + start + ks, log_q, mask=ok)
        p = tl.exp(log_p)
        if KIND == 0:
            kl_pm += tl.sum(tl.where(ok & (p > 0), p * (log_p - log_q), 0.0), axis=0)
        else:
            q = tl.exp(log_q)
            log_m = _log_mixture(log_p, log_q, log_beta, log_one_minus_beta)
            kl_pm += tl.sum(tl.where(ok & (p > 0), p * (log_p - log_m), 0.0), axis=0)
            kl_qm += tl.sum(tl.where(ok, q * (log_q - log_m), 0.0), axis=0)
            q_support += tl.sum(tl.where(ok, q, 0.0), axis=0)
    off_support = -log_one_minus_beta  # jsd: log q - log m wherever p = 0
    if KIND == 0:
        loss = kl_pm
        tail = 1.0  # gradient q - p, and p = 0 off the support
    else:
        kl_qm += (1.0 - q_support) * off_support
        loss = beta * kl_pm + (1.0 - beta) * kl_qm
        tail = (1.0 - beta) * (off_support - kl_qm)

    for start in range(0, V, BLOCK_V):
        ok = start + cols < V
        log_q = (tl.load(z_row + start + cols, mask=ok, other=0).to(ACC) * inv_t - m_s) - log_d_s
        tl.store(z_row + start + cols, tl.exp(log_q) * tail * t_scale, mask=ok)
    tl.debug_barrier()  # the support's entries below replace what other threads just wrote there
    for start in range(0, K, BLOCK_K):
        ok = start + ks < K
        idx = tl.load(i_row + start + ks, mask=ok, other=0)
        log_q = tl.load(lq_row + start + ks, mask=ok, other=0)
        log_p = (tl.load(v_row + start + ks, mask=ok, other=0).to(ACC) * inv_t - m_t) - log_d_t
        q = tl.exp(log_q)
        if KIND == 0:
            grad = q - tl.exp(log_p)
        else:
            log_m = _log_mixture(log_p, log_q, log_beta, log_one_minus_beta)
            grad = (1.0 - beta) * q * (log_q - log_m - kl_qm)
        tl.store(z_row + idx, grad * t_scale, mask=ok)
    tl.store(loss_ptr + row, loss * t_scale * t_scale)


def kd_rows(z, teacher_logits, topk_values, topk_indices, kind, beta, temperature):
    """The ``rows_fn`` of :func:`flexkd.ops.linear_logit_kd_impl.fwd_chunked` (same contract as ``kd_rows_``)."""
    # fp64 rows take the torch form (Triton passes Python floats as fp32, which would round T and beta
    # below fp64's precision), and so does reverse KL against a top-K teacher (+inf, which it reports).
    if z.dtype == torch.float64 or (topk_values is not None and kind == "reverse_kl"):
        return linear_logit_kd_impl.kd_rows_(z, teacher_logits, topk_values, topk_indices, kind, beta, temperature)
    rows, vocab = z.shape
    loss = z.new_empty((rows,))
    if rows == 0:
        return loss, z
    beta = min(max(beta, 1e-12), 1 - 1e-12)  # only jsd reads it; keep both logs finite
    block_v = min(triton.next_power_of_2(vocab), _MAX_BLOCK_V)
    if topk_values is not None:
        top_k = topk_values.shape[1]
        values = topk_values if topk_values.stride(-1) == 1 else topk_values.contiguous()
        indices = topk_indices if topk_indices.stride(-1) == 1 else topk_indices.contiguous()
        launch(_kd_rows_topk_kernel)[(rows,)](
            z, z.stride(0), values, values.stride(0), indices, indices.stride(0),
            z.new_empty((rows, top_k)), loss, vocab, top_k,
            1.0 / temperature, float(temperature), math.log(beta), math.log1p(-beta), beta,
            KIND=_KIND_IDS[kind], BLOCK_V=block_v, BLOCK_K=min(triton.next_power_of_2(top_k), _MAX_BLOCK_V),
            ACC=tl_dtype(z.dtype), num_warps=8,
        )  # fmt: skip
        return loss, z
    if teacher_logits.stride(-1) != 1:
        teacher_logits = teacher_logits.contiguous()
    launch(_kd_rows_kernel)[(rows,)](
        z, z.stride(0), teacher_logits, teacher_logits.stride(0), loss, vocab,
        1.0 / temperature, float(temperature), math.log(beta), math.log1p(-beta), beta,
        KIND=_KIND_IDS[kind], BLOCK_V=block_v, ACC=tl_dtype(z.dtype), num_warps=8,
    )  # fmt: skip
    return loss, z


def linear_logit_kd_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    topk_values: torch.Tensor | None,
    topk_indices: torch.Tensor | None,
    mask: torch.Tensor | None,
    kind: str,
    beta: float,
    temperature: float,
    chunk_size: int,
    hidden_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The body of ``flexkd::linear_logit_kd_fwd_triton``. ``triton_op`` infers the schema from these
    annotations (it has no ``schema=``); a test checks it equals ``LINEAR_LOGIT_KD_SCHEMA``."""
    return linear_logit_kd_impl.fwd_chunked(
        hidden, weight, bias, teacher_logits, topk_values, topk_indices, mask, kind, beta,
        temperature, chunk_size, hidden_grad, weight_grad, bias_grad, rows_fn=kd_rows,
    )  # fmt: skip


linear_logit_kd_fwd_triton = torch.library.triton_op(
    "flexkd::linear_logit_kd_fwd_triton",
    linear_logit_kd_fwd,
    mutates_args=(),
)
_registration.register_linear_logit_kd("flexkd::linear_logit_kd_fwd_triton")
