"""Triton kernel of ``linear_logit_kd``, registered as ``flexkd::linear_logit_kd_fwd_triton``.

The op is ``flexkd.ops.linear_logit_kd_impl.fwd_chunked`` (matmuls per chunk of rows, on cuBLAS) with the
softmax/KD part of each chunk done by :func:`_kd_rows_kernel`: one program per row walks the vocabulary
in blocks, first for both log-sum-exps (online max/sum), then for the loss, then (``reverse_kl`` and
``jsd``, whose gradient needs the row's loss) for the gradient, written over the student logits in place.
The closed forms are those of ``flexkd/ops/linear_logit_kd_impl.py``. A top-K teacher takes the torch form
(``O(K)`` per row beyond one softmax; only the dense teacher has a Triton kernel).
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
    # exp(-inf - -inf) would be NaN while a row has seen only -inf.
    d = d * tl.where(new_m == m, 1.0, tl.exp(m - new_m)) + tl.sum(tl.exp(x - new_m), axis=0)
    return new_m, d


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
            a = log_p + log_beta
            b = log_q + log_one_minus_beta
            hi = tl.maximum(a, b)
            log_m = hi + tl.log(tl.exp(a - hi) + tl.exp(b - hi))
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
                a = log_p + log_beta
                b = log_q + log_one_minus_beta
                hi = tl.maximum(a, b)
                log_m = hi + tl.log(tl.exp(a - hi) + tl.exp(b - hi))
                grad = tl.where(q > 0, (1.0 - beta) * q * (log_q - log_m - aux), 0.0)
            tl.store(z_row + start + cols, grad * t_scale, mask=ok)
    tl.store(loss_ptr + row, loss * t_scale * t_scale)


def kd_rows(z, teacher_logits, topk_values, topk_indices, kind, beta, temperature):
    """The ``rows_fn`` of :func:`flexkd.ops.linear_logit_kd_impl.fwd_chunked` (same contract as ``kd_rows_``)."""
    if topk_values is not None:
        return linear_logit_kd_impl.kd_rows_(z, None, topk_values, topk_indices, kind, beta, temperature)
    rows, vocab = z.shape
    loss = z.new_empty((rows,))
    if rows == 0:
        return loss, z
    if teacher_logits.stride(-1) != 1:
        teacher_logits = teacher_logits.contiguous()
    beta = min(max(beta, 1e-12), 1 - 1e-12)  # only jsd reads it; keep both logs finite
    launch(_kd_rows_kernel)[(rows,)](
        z, z.stride(0), teacher_logits, teacher_logits.stride(0), loss, vocab,
        1.0 / temperature, float(temperature), math.log(beta), math.log1p(-beta), beta,
        KIND=_KIND_IDS[kind], BLOCK_V=min(triton.next_power_of_2(vocab), _MAX_BLOCK_V),
        ACC=tl_dtype(z.dtype), num_warps=8,
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
