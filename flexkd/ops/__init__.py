"""The Flex-KD ops. DESIGN §2 is their contract; ``reference.py`` is their ground truth.

Each public function validates its arguments, resolves the backend (``_backends``), flattens the
leading dims into rows and calls the kernel-level ``torch.library`` op of that backend
(``_registration``), so every backend works under ``torch.compile`` and autograd the same way.
"""

from __future__ import annotations

import torch

from flexkd.ops import (
    _backends,
    _registration,  # noqa: F401  (registers the ops)
    _validate,
    linear_logit_kd_impl,
    reference,
)
from flexkd.ops._backends import BACKENDS
from flexkd.ops.reference import LOSSES, ORDERS, REDUCTIONS, STATS

__all__ = [
    "flex_feature_loss",
    "importance_scores",
    "select_top_k",
    "linear_logit_kd",
    "resolve_backend",
    "reference",
    "BACKENDS",
    "LOSSES",
    "REDUCTIONS",
    "STATS",
    "ORDERS",
]

_FEATURE_LOSS_OPS = {
    "torch": "feature_loss_fwd_torch",
    "cpu": "feature_loss_fwd",
    "cuda": "feature_loss_fwd",
    "triton": "feature_loss_fwd_triton",
}
_IMPORTANCE_OPS = {
    "torch": "importance_scores_acc_torch",
    "cpu": "importance_scores_acc",
    "cuda": "importance_scores_acc",
    "triton": "importance_scores_acc_triton",
}
_LINEAR_LOGIT_KD_OPS = {
    "torch": "linear_logit_kd_fwd_torch",
    "cpu": "linear_logit_kd_fwd_chunked",
    "cuda": "linear_logit_kd_fwd_chunked",
    "triton": "linear_logit_kd_fwd_triton",
}


@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device_type: str, op_name: str) -> str:
    """The backend that ``backend`` (``"auto"`` included) runs ``op_name`` with on ``device_type``."""
    return _backends.resolve(backend, device_type, op_name)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[..., F]`` as ``[N, F]``: a view whenever the strides allow one (a column slice stays a view)."""
    return x.unsqueeze(0) if x.dim() == 1 else x.flatten(0, -2)


def _row_weights(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if mask is None else mask.reshape(-1).to(dtype).contiguous()


def flex_feature_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    index: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    loss: str = "mse",
    reduction: str = "mean",
    eps: float = 1e-8,
    backend: str = "auto",
) -> torch.Tensor:
    """Flex-KD feature loss between ``student [..., k]`` and columns ``index`` of ``teacher [..., D]``.

    ``loss="mse"``: ``Σ_n w_n Σ_j (s_nj − t_n,index[j])²`` reduced by ``mean`` (over ``k·Σw``), ``sum``
    or ``none`` (per row). ``loss="corr"``: ``1 − r_j`` per selected dim, with the weighted Pearson
    correlation over rows ``r_j = cov_j / (max(σ_s_j, eps) · max(σ_t_j, eps))`` (population moments;
    the ``cosine_similarity`` convention on weighted centred columns: invariant to per-column affine maps
    while σ > eps, 0 for a constant column), reduced by ``mean``/``sum`` over dims or ``none`` (``[k]``).
    ``mask`` holds row weights (bool or float ≥ 0) of the leading shape. Returns fp32 (fp64 for fp64
    inputs); gradients reach ``student`` and, when it requires grad, the selected columns of ``teacher``.

    Non-finite inputs propagate as in torch's ``mask * loss``: a NaN or inf in ``student`` or in a selected
    ``teacher`` column makes the loss (the affected rows for mse ``none``, every dim it
    touches for corr) and the gradients NaN or inf, also in rows of weight 0 (``0 · NaN`` is NaN). Only
    the degenerate cases of the contract return 0 whatever the values: ``mean`` with all weights 0 and
    corr with fewer than two weighted rows. A NaN ``grad_output`` gives NaN gradients. A NaN, inf or
    negative ``mask`` weight is refused in eager mode: a ValueError on CPU tensors, a device-side assert
    (``torch._assert_async``, no host sync) elsewhere; unread under ``torch.compile``.
    """
    index = _validate.feature_loss_args(student, teacher, index, mask, loss, reduction, eps)
    which = resolve_backend(backend, student.device.type, "flex_feature_loss")
    op = getattr(torch.ops.flexkd, _FEATURE_LOSS_OPS[which])
    grad_enabled = torch.is_grad_enabled()
    value, _, _ = op(
        _rows(student),
        _rows(teacher),
        index.to(torch.int64).contiguous(),
        _row_weights(mask, reference.accumulation_dtype(student, teacher)),
        loss,
        reduction,
        float(eps),
        grad_enabled and student.requires_grad,
        grad_enabled and teacher.requires_grad,
    )
    if loss == "mse" and reduction == "none":
        return value.reshape(student.shape[:-1])
    return value


def importance_scores(
    hidden: torch.Tensor,
    grad: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    stat: str = "grad_x_act",
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-dimension importance ``score_j = Σ_n w_n · f(h_nj, g_nj)`` as fp32 ``[D]``.

    ``f`` is ``|h·g|`` (``"grad_x_act"``), ``|g|`` (``"grad"``) or ``g²`` (``"grad_sq"``). With ``out``
    the scores are added into it in place and it is returned, so a pass over a data set keeps one
    running buffer. Normalising by the number of tokens is the caller's job.

    Non-finite inputs propagate: a NaN or inf in ``hidden`` or ``grad`` makes the scores of the dims it
    touches NaN or inf (also in rows of weight 0), and so does one already in ``out``. A NaN, inf or
    negative ``mask`` weight is refused as in :func:`flex_feature_loss` (propagates under
    ``torch.compile``, where it is not read).
    """
    _validate.importance_args(hidden, grad, mask, stat, out)
    which = resolve_backend(backend, hidden.device.type, "importance_scores")
    if out is None:
        out = torch.zeros(hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    op = getattr(torch.ops.flexkd, _IMPORTANCE_OPS[which])
    op(
        _rows(hidden.detach()),
        _rows(grad.detach()),
        _row_weights(mask, torch.float32),
        stat,
        out,
    )
    return out


def select_top_k(scores: torch.Tensor, k: int, *, order: str = "index") -> torch.Tensor:
    """Indices of the ``k`` largest ``scores`` (ties to the lower index) as int64 ``[k]``.

    ``order="index"`` sorts them by teacher index (student dim i pairs with the i-th selected teacher
    dim); ``order="score"`` by descending score. Scores with NaN are rejected (ValueError); ``inf``
    ranks as the largest value, ``-inf`` as the smallest.
    """
    _validate.tensor("scores", scores)
    if scores.dim() != 1 or not scores.is_floating_point():
        raise ValueError(
            f"scores must be a 1-D float tensor, got shape {tuple(scores.shape)} and {scores.dtype}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= scores.numel():
        raise ValueError(f"k must be an int in [1, {scores.numel()}], got {k!r}")
    _validate.choice("order", order, ORDERS)
    if not torch.compiler.is_compiling() and bool(torch.isnan(scores).any()):
        raise ValueError("scores must not contain NaN")
    return torch.ops.flexkd.select_top_k(scores, k, order)



def linear_logit_kd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Logit KD from the student's last hidden state ``[..., H]`` and output projection ``weight [V, H]``
    (``+ bias [V]``), never materialising the ``[N, V]`` student logits.

    Equals ``flexkd.losses.logit_kd(hidden @ weight.T + bias, teacher_logits, teacher_topk=teacher_topk,
    kind=kind, temperature=temperature, beta=beta, mask=mask, reduction="mean")`` with the logits formed
    in fp32 (fp64 for fp64 inputs; bf16/fp16 logits are never rounded to their dtype): ``T²·KL`` or
    ``T²·JSD`` of the softmaxes at temperature T, the weighted mean over positions (all weights 0 → 0
    with zero gradients). The teacher is dense ``teacher_logits [..., V]`` (any float dtype) or
    ``teacher_topk = (values [..., K], indices [..., K])``, the top-K renormalised at T (``reverse_kl`` is
    refused for it: +inf); its indices must lie in ``[0, V)`` and be unique per row, checked in eager
    mode without a host sync (a ValueError on CPU tensors, ``torch._assert_async`` elsewhere), unread
    under ``torch.compile``. ``mask`` weights are checked as in :func:`flex_feature_loss`. Gradients reach ``hidden``, ``weight`` and ``bias``; the teacher gets none.

    Rows are processed ``chunk_size`` at a time (default: ``[chunk, V]`` ≈ 2**23 elements and at least 256 rows, see
    ``flexkd.ops.linear_logit_kd_impl.default_chunk_size``), and the gradients are computed in the forward
    pass, so backward only scales them. The ``cpu`` and ``cuda`` backends are matmuls per chunk plus
    in-place torch ops; ``triton`` does the softmax/KD part of each chunk in one Triton kernel;
    ``torch`` materialises the logits (the reference). Returns an fp32 scalar (fp64 for fp64 inputs).
    """
    return _linear_logit_kd(
        hidden, weight, teacher_logits, teacher_topk, bias, mask, kind, beta, temperature, chunk_size,
        backend, read_topk_indices=True,
    )  # fmt: skip


def _linear_logit_kd(
    hidden, weight, teacher_logits, teacher_topk, bias, mask, kind, beta, temperature, chunk_size,
    backend, *, read_topk_indices: bool,
) -> torch.Tensor:
    """:func:`linear_logit_kd`; ``read_topk_indices=False`` skips reading the top-K indices back (a
    device sync) for callers whose indices are valid by construction, e.g. labels as a one-hot teacher."""
    _validate.linear_logit_kd_args(
        hidden, weight, teacher_logits, teacher_topk, bias, mask, kind, beta, temperature, chunk_size,
        read_topk_indices=read_topk_indices,
    )  # fmt: skip
    which = resolve_backend(backend, hidden.device.type, "linear_logit_kd")
    op = getattr(torch.ops.flexkd, _LINEAR_LOGIT_KD_OPS[which])
    if chunk_size is None:
        chunk_size = linear_logit_kd_impl.default_chunk_size(weight.shape[0])
    values, indices = (None, None) if teacher_topk is None else teacher_topk
    grad_enabled = torch.is_grad_enabled()
    loss, _, _, _ = op(
        _rows(hidden),
        weight,
        bias,
        None if teacher_logits is None else _rows(teacher_logits),
        None if values is None else _rows(values),
        None if indices is None else _rows(indices.to(torch.int64)),
        _row_weights(mask, linear_logit_kd_impl.accumulation_dtype(hidden, weight, bias)),
        kind,
        float(beta),
        float(temperature),
        chunk_size,
        grad_enabled and hidden.requires_grad,
        grad_enabled and weight.requires_grad,
        grad_enabled and bias is not None and bias.requires_grad,
    )
    return loss
