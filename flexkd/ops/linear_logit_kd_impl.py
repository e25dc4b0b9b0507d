"""The math of ``linear_logit_kd``: logit KD from the student's last hidden state and output projection.

Kernel-level contract (every backend; the public wrapper in ``flexkd.ops`` flattens leading dims):
``hidden [N,H]``, ``weight [V,H]``, ``bias [V]?``, one teacher (``teacher_logits [N,V]`` or
``topk_values``/``topk_indices [N,K]`` int64), row weights ``mask [N]?`` -> ``(loss, grad_hidden [N,H],
grad_weight [V,H], grad_bias [V])``: the weighted mean over rows of ``T² · D(p_n || q_n)`` and its
gradients for ``grad_output == 1`` (empty ``(0,)`` where a gradient is not asked for).

Two entry points live here:

* :func:`fwd_materialised` (the ``torch`` backend): the closed form on all ``[N,V]`` logits at once.
  (The ground truth of the tests is autograd of ``flexkd.losses.logit_kd`` on ``hidden @ weight.T + b``.)
* :func:`fwd_chunked` (``cpu``/``cuda``, and ``triton`` with a Triton ``rows_fn``): per chunk of rows,
  ``z = h Wᵀ + b`` in the accumulation dtype, then the closed form below in place on ``z``, then
  ``dh = G W``, ``dW += Gᵀ h``, ``db += Σ G``. At most a few ``[chunk, V]`` buffers are alive.

Closed forms per row, with ``s = z/T``, ``q = softmax(s)``, ``p`` the teacher's softmax at T:
``forward_kl``: ``ℓ = Σ p (log p − log q)``, ``∂ℓ/∂s = q − p``;
``reverse_kl``: ``ℓ = Σ q (log q − log p)``, ``∂ℓ/∂s = q ⊙ (log q − log p − ℓ)``;
``jsd``: ``m = βp + (1−β)q``, ``ℓ = β KL(p‖m) + (1−β) KL(q‖m)``, ``∂ℓ/∂q = (1−β)(log q − log m)`` (the
``p/m`` terms cancel), so ``∂ℓ/∂s = (1−β) q ⊙ (log q − log m − KL(q‖m))``.
The loss carries ``T²`` and ``∂/∂z = ∂/∂s / T``, so ``G = T · ∂ℓ/∂s`` times the row's ``w_n / Σw``.
A top-K teacher has ``p = 0`` off its K indices: ``forward_kl`` needs ``log q`` only there, and for
``jsd`` the off-support terms are constants (``log q − log m = −log(1−β)``), so beyond the student's
softmax everything is ``O(K)`` per row.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

KINDS = ("forward_kl", "reverse_kl", "jsd")

# A chunk of rows keeps one [chunk, V] accumulation-dtype buffer near 2**23 elements (32 MiB in fp32;
# forward_kl/reverse_kl hold three such buffers, jsd five), and has at least 256 rows: each chunk's
# three matmuls stream the whole [V, H] weight, so few rows make them memory-bound. Measured (1 thread,
# N=1024 V=151936 H=1024 fp32 fwd+bwd, thread time): 32 rows 14.7 s, 128 11.5 s, 256 9.3-9.8 s,
# 512 9.3 s; at 256 rows and V=151936 a buffer is 148 MiB.
_CHUNK_ELEMENTS = 2**23
_MIN_CHUNK_ROWS = 256


def default_chunk_size(vocab: int) -> int:
    """Rows per chunk for a vocabulary of ``vocab``: a power of two, ``[chunk, V]`` ≈ 2**23 elements."""
    rows = max(1, _CHUNK_ELEMENTS // max(1, vocab))
    return max(_MIN_CHUNK_ROWS, 1 << (rows.bit_length() - 1))


def accumulation_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """In place, as ``(x - max) - log Σ exp(x - max)``: ``x - logsumexp(x)`` would round the row's
    shift to the size of ``max``, an error that a KL of two close distributions does not cancel."""
    x.sub_(x.amax(dim=-1, keepdim=True))
    return x.sub_(torch.logsumexp(x, dim=-1, keepdim=True))


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1)`` for ``[c, V]`` operands without a ``[c, V]`` temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(a.shape[0])


def _zero_where_(x: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """``x`` with 0 where ``prob == 0``: the ``0 · log 0 = 0`` convention of the reference."""
    return x.masked_fill_(prob == 0, 0.0)


def kd_rows_(
    z: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    topk_values: torch.Tensor | None,
    topk_indices: torch.Tensor | None,
    kind: str,
    beta: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``T² D(p || q)`` of student logits ``z [c, V]`` (accumulation dtype, overwritten) and its
    gradient w.r.t. ``z`` (returned in ``z``'s storage or a buffer of the same shape)."""
    t = temperature
    log_q = _log_softmax_(z.div_(t) if t != 1.0 else z)
    if topk_values is not None:
        return _kd_rows_topk_(log_q, topk_values, topk_indices, kind, beta, t)
    log_p = teacher_logits.to(z.dtype, copy=True)
    log_p = _log_softmax_(log_p.div_(t) if t != 1.0 else log_p)
    if kind == "forward_kl":
        p = log_p.exp()
        loss = _zero_where_(log_p.sub_(log_q).mul_(p), p).sum(-1)
        grad = log_q.exp_().sub_(p)
    elif kind == "reverse_kl":
        q = log_q.exp()
        diff = _zero_where_(log_p.neg_().add_(log_q), q)  # log q − log p
        loss = _row_dot(q, diff)
        grad = diff.sub_(loss.unsqueeze(-1)).mul_(q)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        p, q = log_p.exp(), log_q.exp()
        kl_pm = _zero_where_(log_p.sub_(log_m).mul_(p), p).sum(-1)
        del p, log_p
        diff_q = _zero_where_(log_m.neg_().add_(log_q), q)  # log q − log m
        kl_qm = _row_dot(q, diff_q)
        loss = beta * kl_pm + (1.0 - beta) * kl_qm
        grad = diff_q.sub_(kl_qm.unsqueeze(-1)).mul_(q).mul_(1.0 - beta)
    return loss.mul_(t * t), grad.mul_(t)


def _kd_rows_topk_(log_q, values, indices, kind, beta, t):
    log_p = torch.log_softmax(values.to(log_q.dtype) / t, dim=-1)
    p = log_p.exp()
    log_q_k = log_q.gather(-1, indices)
    if kind == "forward_kl":
        loss = torch.where(p > 0, p * (log_p - log_q_k), 0.0).sum(-1)
        grad = log_q.exp_().scatter_add_(-1, indices, -p)
    elif kind == "jsd":
        log_m_k = torch.logaddexp(log_p + math.log(beta), log_q_k + math.log1p(-beta))
        q_k = log_q_k.exp()
        off_support = -math.log1p(-beta)  # log q − log m wherever p = 0
        kl_pm = torch.where(p > 0, p * (log_p - log_m_k), 0.0).sum(-1)
        kl_qm = (q_k * (log_q_k - log_m_k)).sum(-1) + (1.0 - q_k.sum(-1)) * off_support
        loss = beta * kl_pm + (1.0 - beta) * kl_qm
        q = log_q.exp_()
        on_support = (1.0 - beta) * q_k * (log_q_k - log_m_k - kl_qm.unsqueeze(-1))
        grad = q.mul_(((1.0 - beta) * (off_support - kl_qm)).unsqueeze(-1))
        grad.scatter_(-1, indices, on_support)
    else:
        raise ValueError("kind='reverse_kl' is +inf against a top-K teacher")
    return loss.mul_(t * t), grad.mul_(t)


RowsFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


def fwd_chunked(
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
    rows_fn: RowsFn = kd_rows_,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and gradients chunk by chunk over rows; ``rows_fn`` has the contract of :func:`kd_rows_`."""
    acc = accumulation_dtype(hidden, weight, bias)
    n, vocab = hidden.shape[0], weight.shape[0]
    w_acc = weight.to(acc)
    b_acc = None if bias is None else bias.to(acc)
    if mask is None:
        row_weights, scale = None, 1.0 / max(n, 1)
    else:
        row_weights = mask.to(acc)
        total = row_weights.sum()
        scale = torch.where(total != 0, 1.0 / total, 0.0)
    loss = hidden.new_zeros((), dtype=acc)
    grad_h = torch.empty_like(hidden) if hidden_grad else _empty(hidden)
    grad_w = weight.new_zeros(weight.shape, dtype=acc) if weight_grad else None
    grad_b = weight.new_zeros((vocab,), dtype=acc) if bias_grad else None
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h = hidden[start:end].to(acc)
        z = h @ w_acc.T if b_acc is None else torch.addmm(b_acc, h, w_acc.T)
        topk = (None, None) if topk_values is None else (topk_values[start:end], topk_indices[start:end])
        teacher = None if teacher_logits is None else teacher_logits[start:end]
        rows_loss, g = rows_fn(z, teacher, *topk, kind, beta, temperature)
        row_scale = scale if row_weights is None else row_weights[start:end] * scale
        loss += (rows_loss * row_scale).sum()
        if not (hidden_grad or weight_grad or bias_grad):
            continue
        g.mul_(row_scale.unsqueeze(-1) if isinstance(row_scale, torch.Tensor) else row_scale)
        if hidden_grad:
            grad_h[start:end] = g @ w_acc
        if weight_grad:
            grad_w.addmm_(g.T, h)
        if bias_grad:
            grad_b += g.sum(0)
    return (
        loss,
        grad_h,
        grad_w.to(weight.dtype) if weight_grad else _empty(weight),
        grad_b.to(bias.dtype) if bias_grad else _empty(weight),
    )


def fwd_materialised(
    hidden, weight, bias, teacher_logits, topk_values, topk_indices, mask, kind, beta, temperature,
    chunk_size, hidden_grad, weight_grad, bias_grad,
):  # fmt: skip
    """The ``torch`` backend: the closed form on the whole ``[N, V]`` logits at once (``chunk_size`` is
    ignored). Tests check every backend, this one included, against autograd of ``flexkd.losses.logit_kd``."""
    return fwd_chunked(
        hidden, weight, bias, teacher_logits, topk_values, topk_indices, mask, kind, beta,
        temperature, max(hidden.shape[0], 1), hidden_grad, weight_grad, bias_grad,
    )  # fmt: skip
