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
  ``dh = G W``, ``dW += Gᵀ h``, ``db += Σ G`` (16-bit GEMMs for bf16 inputs: :func:`gemm_dtype`).
  At most a few ``[chunk, V]`` buffers are alive.

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

from flexkd import _native

KINDS = ("forward_kl", "reverse_kl", "jsd")

# A chunk of rows keeps one [chunk, V] accumulation-dtype buffer near 2**23 elements (32 MiB in fp32;
# forward_kl/reverse_kl hold four such buffers, jsd six), and has at least 256 rows: each chunk's
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


def gemm_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype the three matmuls run in, or None for the accumulation dtype.

    With bf16 hidden and weight (fp16 too on CUDA) the logits ``h Wᵀ + b`` are a 16-bit GEMM rounded to
    that dtype, exactly as the formula ``hidden @ weight.T + bias`` written on those tensors gives them,
    then widened to fp32 for the softmax and KL; ``G`` is rounded to that dtype for ``G W`` and ``Gᵀ h``,
    as in eager autograd of the formula, and ``dW`` is summed over chunks in fp32. The GEMMs accumulate
    in fp32. On a CPU with AVX512-BF16 a bf16 GEMM is about 4x an fp32 one (Zen 5, 1 thread,
    ``[2048, 1024] x [1024, 32000]``: 336 vs 1313 ms), and on a GPU it runs on the tensor cores; fp16
    GEMMs on the CPU are emulated (hundreds of times slower), so fp16 stays in fp32 there."""
    dtype = weight.dtype
    if hidden.dtype != dtype:
        return None
    if dtype == torch.bfloat16 or (dtype == torch.float16 and weight.device.type == "cuda"):
        return dtype
    return None


def _logits_16bit(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, acc: torch.dtype):
    """``h Wᵀ + b`` as the formula computes it on 16-bit ``h`` and ``weight``, widened to ``acc``."""
    if bias is not None and bias.dtype == weight.dtype:
        return torch.addmm(bias, h, weight.T).to(acc)
    z = (h @ weight.T).to(acc)
    return z if bias is None else z.add_(bias.to(acc))


def _log_softmax_(x: torch.Tensor, with_probs: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log_softmax(x)`` in place, as ``(x - max) - log Σ exp(x - max)`` (``x - logsumexp(x)`` would
    round the row's shift to the size of ``max``, an error that a KL of two close distributions does
    not cancel), and ``softmax(x)`` in a new buffer (the ``exp`` the sum needs, divided by the sum)
    when ``with_probs``, else None."""
    x.sub_(x.amax(dim=-1, keepdim=True))
    probs = torch.exp(x)
    total = probs.sum(dim=-1, keepdim=True)
    x.sub_(total.log())
    return x, probs.div_(total) if with_probs else None


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
    log_q, q = _log_softmax_(z.div_(t) if t != 1.0 else z)
    if topk_values is not None:
        return _kd_rows_topk_(log_q, q, topk_values, topk_indices, kind, beta, t)
    log_p = teacher_logits.to(z.dtype, copy=True)
    log_p, p = _log_softmax_(log_p.div_(t) if t != 1.0 else log_p, with_probs=kind != "reverse_kl")
    # 0 · log 0 = 0 (the reference's convention): a teacher logit of -inf gives p = 0 and log p = -inf;
    # clamped to the lowest finite value its term is 0 · (finite) = 0, with no mask pass.
    lowest = torch.finfo(z.dtype).min
    if kind == "forward_kl":
        loss = _row_dot(p, log_p.clamp_min_(lowest).sub_(log_q))
        grad = q.sub_(p)
    elif kind == "reverse_kl":
        diff = _zero_where_(log_p.neg_().add_(log_q), q)  # log q − log p
        loss = _row_dot(q, diff)
        grad = diff.sub_(loss.unsqueeze(-1)).mul_(q)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        kl_pm = _row_dot(p, log_p.clamp_min_(lowest).sub_(log_m))
        del p, log_p
        diff_q = _zero_where_(log_m.neg_().add_(log_q), q)  # log q − log m
        kl_qm = _row_dot(q, diff_q)
        loss = beta * kl_pm + (1.0 - beta) * kl_qm
        grad = diff_q.sub_(kl_qm.unsqueeze(-1)).mul_(q).mul_(1.0 - beta)
    return loss.mul_(t * t), grad.mul_(t)


_NATIVE_TEACHER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kd_rows_fused_(
    z: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    topk_values: torch.Tensor | None,
    topk_indices: torch.Tensor | None,
    kind: str,
    beta: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kd_rows_` through ``flexkd._C``'s fused row kernel (``flexkd::kd_rows_``: every kind against
    a dense teacher, forward KL and JSD against a top-K one; fp32 logits on the CPU, an fp32/bf16/fp16
    teacher): a few passes over each row, which stays in cache, instead of a dozen over the chunk.
    Anything else (fp64, another device, no extension built) takes the torch formulation."""
    teacher = teacher_logits if topk_values is None else topk_values
    if (
        z.device.type == "cpu"
        and z.dtype == torch.float32
        and teacher.dtype in _NATIVE_TEACHER_DTYPES
        and not (kind == "reverse_kl" and topk_values is not None)
        and _native.load() is not None
    ):
        indices = None if topk_indices is None else topk_indices.contiguous()
        teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
        return torch.ops.flexkd.kd_rows_(z, teacher, indices, kind, beta, temperature), z
    return kd_rows_(z, teacher_logits, topk_values, topk_indices, kind, beta, temperature)


def _kd_rows_topk_(log_q, q, values, indices, kind, beta, t):
    log_p = torch.log_softmax(values.to(log_q.dtype) / t, dim=-1)
    p = log_p.exp()
    log_q_k = log_q.gather(-1, indices)
    if kind == "forward_kl":
        loss = torch.where(p > 0, p * (log_p - log_q_k), 0.0).sum(-1)
        grad = q.scatter_add_(-1, indices, -p)
    elif kind == "jsd":
        log_m_k = torch.logaddexp(log_p + math.log(beta), log_q_k + math.log1p(-beta))
        q_k = log_q_k.exp()
        off_support = -math.log1p(-beta)  # log q − log m wherever p = 0
        kl_pm = torch.where(p > 0, p * (log_p - log_m_k), 0.0).sum(-1)
        kl_qm = (q_k * (log_q_k - log_m_k)).sum(-1) + (1.0 - q_k.sum(-1)) * off_support
        loss = beta * kl_pm + (1.0 - beta) * kl_qm
        on_support = (1.0 - beta) * q_k * (log_q_k - log_m_k - kl_qm.unsqueeze(-1))
        grad = q.mul_(((1.0 - beta) * (off_support - kl_qm)).unsqueeze(-1))
        grad.scatter_(-1, indices, on_support)
    else:
        raise ValueError("kind='reverse_kl' is +inf against a top-K teacher")
    return loss.mul_(t * t), grad.mul_(t)


def _add_widened_(acc: torch.Tensor, src: torch.Tensor) -> None:
    """``acc += src`` for the fp32 weight gradient and a chunk's 16-bit product: ``flexkd._C``'s one
    vectorised pass on the CPU (torch's mixed-dtype ``add_`` takes 59 ms for a ``[32000, 1024]`` bf16
    chunk on Zen 5 at 1 thread, about a third of the bandwidth), torch's ``add_`` elsewhere."""
    if acc.device.type == "cpu" and _native.load() is not None:
        torch.ops.flexkd.add_widened_(acc, src)
    else:
        acc += src


RowsFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


def _narrowed(acc: torch.Tensor, buffer: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``acc`` in ``dtype``, written into ``buffer`` (the chunks' 16-bit product, free by now) if there is
    one: a new ``[V, H]`` tensor at the end would raise the op's peak by its size."""
    return acc.to(dtype) if buffer is None else buffer.copy_(acc)


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
    rows_fn: RowsFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and gradients chunk by chunk over rows; ``rows_fn`` has the contract of :func:`kd_rows_`
    (default :func:`kd_rows_fused_`)."""
    rows_fn = kd_rows_fused_ if rows_fn is None else rows_fn
    acc = accumulation_dtype(hidden, weight, bias)
    n, vocab = hidden.shape[0], weight.shape[0]
    gemm = gemm_dtype(hidden, weight)
    w_acc = weight.to(acc) if gemm is None else None
    b_acc = None if bias is None or gemm is not None else bias.to(acc)
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
    chunk_grad_w = torch.empty_like(weight) if weight_grad and gemm is not None else None
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        if gemm is None:
            h = hidden[start:end].to(acc)
            z = h @ w_acc.T if b_acc is None else torch.addmm(b_acc, h, w_acc.T)
        else:
            h = hidden[start:end]
            z = _logits_16bit(h, weight, bias, acc)
        topk = (None, None) if topk_values is None else (topk_values[start:end], topk_indices[start:end])
        teacher = None if teacher_logits is None else teacher_logits[start:end]
        rows_loss, g = rows_fn(z, teacher, *topk, kind, beta, temperature)
        row_scale = scale if row_weights is None else row_weights[start:end] * scale
        loss += (rows_loss * row_scale).sum()
        if not (hidden_grad or weight_grad or bias_grad):
            continue
        g.mul_(row_scale.unsqueeze(-1) if isinstance(row_scale, torch.Tensor) else row_scale)
        if bias_grad:
            grad_b += g.sum(0)
        if gemm is not None:
            g = g.to(gemm)
        if hidden_grad:
            grad_h[start:end] = g @ (w_acc if gemm is None else weight)
        if weight_grad:
            if gemm is None:
                grad_w.addmm_(g.T, h)
            else:
                _add_widened_(grad_w, torch.mm(g.T, h, out=chunk_grad_w))
    return (
        loss,
        grad_h,
        _narrowed(grad_w, chunk_grad_w, weight.dtype) if weight_grad else _empty(weight),
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
        temperature, max(hidden.shape[0], 1), hidden_grad, weight_grad, bias_grad, rows_fn=kd_rows_,
    )  # fmt: skip
