"""Pure-PyTorch reference for the three flexkd ops: the ground truth every backend is tested against.

Two forms of the feature loss live here:

* :func:`flex_feature_loss` is the math of DESIGN §2 written as plainly as possible. It materialises
  ``teacher[..., index]`` and lets autograd find the gradients, which makes it the thing to trust.
* :func:`feature_loss_fwd` is the closed form that every kernel implements: the loss together with the
  gradient for ``grad_output == 1``. It is the ``torch`` backend and documents the formulas the C++,
  CUDA and Triton kernels follow; tests check it against autograd of :func:`flex_feature_loss`.
"""

from __future__ import annotations

import torch

LOSSES = ("mse", "corr")
REDUCTIONS = ("mean", "sum", "none")
STATS = ("grad_x_act", "grad", "grad_sq")
ORDERS = ("index", "score")


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 when any input is fp64, fp32 otherwise (bf16/fp16 are never accumulated in themselves)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _row_weights(mask: torch.Tensor | None, leading_shape: torch.Size, dtype, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(leading_shape, dtype=dtype, device=device)
    return mask.to(dtype)


def flex_feature_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    index: torch.Tensor,
    mask: torch.Tensor | None = None,
    loss: str = "mse",
    reduction: str = "mean",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Flex-KD feature loss between ``student [..., k]`` and the selected columns of ``teacher [..., D]``."""
    acc = accumulation_dtype(student, teacher)
    s = student.to(acc)
    t = teacher.index_select(-1, index.long()).to(acc)
    w = _row_weights(mask, student.shape[:-1], acc, student.device)
    k = student.shape[-1]
    if loss == "mse":
        per_row = w * (s - t).pow(2).sum(-1)
        if reduction == "none":
            return per_row
        if reduction == "sum":
            return per_row.sum()
        total_weight = w.sum()
        return torch.where(total_weight > 0, per_row.sum() / (k * total_weight.clamp_min(1e-30)), 0.0)
    if loss == "corr":
        s, t, w = s.reshape(-1, k), t.reshape(-1, k), w.reshape(-1, 1)
        total_weight = w.sum()
        enough_rows = (w > 0).sum() >= 2
        safe_weight = torch.where(enough_rows, total_weight, 1.0)
        a = s - (w * s).sum(0) / safe_weight
        b = t - (w * t).sum(0) / safe_weight
        cov = (w * a * b).sum(0) / safe_weight
        var_s = (w * a * a).sum(0) / safe_weight
        var_t = (w * b * b).sum(0) / safe_weight
        per_dim = torch.where(enough_rows, 1 - cov / torch.sqrt(var_s * var_t + eps), 0.0)
        if reduction == "none":
            return per_dim
        return per_dim.mean() if reduction == "mean" else per_dim.sum()
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def _mse_fwd(s, t, w, reduction):
    k = s.shape[-1]
    diff = s - t
    per_row = w * diff.pow(2).sum(-1)
    grad = 2 * w.unsqueeze(-1) * diff
    if reduction == "none":
        return per_row, grad
    if reduction == "sum":
        return per_row.sum(), grad
    total_weight = w.sum()
    scale = torch.where(total_weight > 0, 1 / (k * total_weight.clamp_min(1e-30)), 0.0)
    return per_row.sum() * scale, grad * scale


def _corr_fwd(s, t, w, reduction, eps):
    k = s.shape[-1]
    enough_rows = (w > 0).sum() >= 2
    total_weight = torch.where(enough_rows, w.sum(), 1.0)
    w_col = w.unsqueeze(-1)
    a = s - (w_col * s).sum(0) / total_weight
    b = t - (w_col * t).sum(0) / total_weight
    cov = (w_col * a * b).sum(0) / total_weight
    var_s = (w_col * a * a).sum(0) / total_weight
    var_t = (w_col * b * b).sum(0) / total_weight
    q = var_s * var_t + eps
    rsqrt_q = q.rsqrt()
    per_dim = torch.where(enough_rows, 1 - cov * rsqrt_q, 0.0)
    c = 1 / k if reduction == "mean" else 1.0
    coef = torch.where(enough_rows, -c * rsqrt_q, 0.0) * w_col / total_weight
    grad_s = coef * (b - (cov * var_t / q) * a)
    grad_t = coef * (a - (cov * var_s / q) * b)
    if reduction == "none":
        return per_dim, grad_s, grad_t
    loss = per_dim.mean() if reduction == "mean" else per_dim.sum()
    return loss, grad_s, grad_t


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
    """Closed-form kernel contract on 2-D inputs: ``(loss, grad_student, grad_teacher_columns)``.

    ``student [N,k]``, ``teacher [N,D]``, ``index`` int64 ``[k]``, ``mask`` None or ``[N]``. The gradients
    are for ``grad_output == 1`` (the autograd backward scales them); a gradient not asked for is an empty
    ``[0]`` tensor. ``grad_teacher_columns`` is ``[N,k]``: the gradient of the selected teacher columns.
    """
    acc = accumulation_dtype(student, teacher)
    s = student.to(acc)
    t = teacher.index_select(-1, index).to(acc)
    w = _row_weights(mask, student.shape[:-1], acc, student.device)
    if loss == "mse":
        value, grad_s = _mse_fwd(s, t, w, reduction)
        grad_t = -grad_s
    elif loss == "corr":
        value, grad_s, grad_t = _corr_fwd(s, t, w, reduction, eps)
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    empty_s = student.new_empty(0)
    empty_t = teacher.new_empty(0)
    return (
        value,
        grad_s.to(student.dtype).contiguous() if student_grad else empty_s,
        grad_t.to(teacher.dtype).contiguous() if teacher_grad else empty_t,
    )


def importance_scores(
    hidden: torch.Tensor,
    grad: torch.Tensor,
    mask: torch.Tensor | None = None,
    stat: str = "grad_x_act",
) -> torch.Tensor:
    """``score_j = Σ_n w_n · f(h_nj, g_nj)`` over all leading dims, fp32 ``[D]``."""
    acc = accumulation_dtype(hidden, grad)
    h, g = hidden.to(acc), grad.to(acc)
    if stat == "grad_x_act":
        per_element = (h * g).abs()
    elif stat == "grad":
        per_element = g.abs()
    elif stat == "grad_sq":
        per_element = g * g
    else:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    if mask is not None:
        per_element = per_element * mask.to(acc).unsqueeze(-1)
    return per_element.reshape(-1, hidden.shape[-1]).sum(0).to(torch.float32)


def select_top_k(scores: torch.Tensor, k: int, order: str = "index") -> torch.Tensor:
    """The ``k`` largest scores, ties to the lower index; sorted by index or by descending score."""
    # A stable descending sort keeps equal scores in index order, which is exactly the tie rule.
    by_score = torch.sort(scores, descending=True, stable=True).indices[:k]
    if order == "score":
        return by_score.to(torch.int64)
    if order == "index":
        return torch.sort(by_score).values.to(torch.int64)
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
