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
    eps: float = 1e-8,
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
        # `!= 0`, not `> 0`: a NaN weight must reach the loss, not turn it into 0.
        safe_weight = torch.where(total_weight != 0, total_weight, 1.0)
        return torch.where(total_weight != 0, per_row.sum() / (k * safe_weight), 0.0)
    if loss == "corr":
        s, t, w = s.reshape(-1, k), t.reshape(-1, k), w.reshape(-1, 1)
        total_weight = w.sum()
        enough_rows = weighted_rows(w) >= 2
        safe_weight = torch.where(enough_rows, total_weight, 1.0)
        a = s - (w * s).sum(0) / safe_weight
        b = t - (w * t).sum(0) / safe_weight
        cov = (w * a * b).sum(0) / safe_weight
        var_s = (w * a * a).sum(0) / safe_weight
        var_t = (w * b * b).sum(0) / safe_weight
        r = cov / (clamped_sigma(var_s, eps) * clamped_sigma(var_t, eps))
        per_dim = torch.where(enough_rows, 1 - r, 0.0)
        if reduction == "none":
            return per_dim
        return per_dim.mean() if reduction == "mean" else per_dim.sum()
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def weighted_rows(w: torch.Tensor) -> torch.Tensor:
    """The number of rows whose weight is not 0 (for valid weights, those > 0; a NaN weight counts,
    so it reaches the result instead of making the row count look too small)."""
    return (w != 0).sum()


def clamped_sigma(var: torch.Tensor, eps: float) -> torch.Tensor:
    """``max(sqrt(var), eps)`` written as ``sqrt(max(var, eps²))``: equal values, and the gradient is 0
    (not 0·inf) where ``var < eps²``. NaN stays NaN (``clamp_min`` propagates it)."""
    return var.clamp_min(eps * eps).sqrt()


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
    safe_weight = torch.where(total_weight != 0, total_weight, 1.0)
    scale = torch.where(total_weight != 0, 1 / (k * safe_weight), 0.0)
    return per_row.sum() * scale, grad * scale


# ------------------------------------------------------------------------------ corr statistics
#
# Every backend computes the corr column statistics the same way: the rows are cut into blocks, each
# block yields its weight W_b and, per column, the weighted means mean_s, mean_t, the centred second
# moments m2_s = Σ w (s − mean_s)², m2_t and the co-moment co_m2 = Σ w (s − mean_s)(t − mean_t), and the
# blocks are merged with Chan, Golub & LeVeque's pairwise update
#     W = W_a + W_b,  f = W_b / W,  g = W_a · f,  d_s = mean_s_b − mean_s_a,  d_t = ...
#     mean_s = mean_s_a + f d_s,  m2_s = m2_s_a + m2_s_b + g d_s²,  co_m2 = co_a + co_b + g d_s d_t.
# Nothing is ever taken as E[x²] − E[x]², so the result is exact to rounding whatever the column means
# and whichever row comes first. (The C++ kernel merges 32-row blocks, each two-pass like these; the CUDA
# kernel updates one row at a time, the same merge with a one-row block; the Triton kernel merges tiles;
# here blocks are merged in closed form.)
# Then, with c = 1/k for the mean reduction and 1 otherwise,
#     var_s = m2_s / W,  sigma_s = max(sqrt(var_s), eps)  (likewise t),  cov = co_m2 / W,
#     r = cov / (sigma_s sigma_t),  loss_j = 1 − r,
#     grad_s = coef · w · (b − alpha_s · a),  grad_t = coef · w · (a − alpha_t · b),
#     coef = −c / (W sigma_s sigma_t),  alpha_s = cov / var_s if var_s > eps² else 0  (likewise t),
# with a = s − mean_s and b = t − mean_t: the gradient of the clamped form, where a clamped sigma is a
# constant.

CORR_BLOCK_ROWS = 256


def corr_block_moments(s: torch.Tensor, t: torch.Tensor, w: torch.Tensor, block_rows: int = CORR_BLOCK_ROWS):
    """Per block of ``block_rows`` rows of ``s, t [N,k]`` with row weights ``w [N]``: the moments
    ``(weight [B,1], mean_s, mean_t, m2_s, m2_t, co_m2)`` (each ``[B,k]``), each block two-pass."""
    n, k = s.shape
    blocks = max(1, -(-n // block_rows))
    pad = blocks * block_rows - n
    s = torch.nn.functional.pad(s, (0, 0, 0, pad)).reshape(blocks, block_rows, k)
    t = torch.nn.functional.pad(t, (0, 0, 0, pad)).reshape(blocks, block_rows, k)
    w = torch.nn.functional.pad(w, (0, pad)).reshape(blocks, block_rows, 1)
    weight = w.sum(1)
    inv_weight = torch.where(weight != 0, 1 / torch.where(weight != 0, weight, 1.0), 0.0)
    mean_s = (w * s).sum(1) * inv_weight
    mean_t = (w * t).sum(1) * inv_weight
    a = s - mean_s.unsqueeze(1)
    b = t - mean_t.unsqueeze(1)
    wa = w * a
    return weight, mean_s, mean_t, (wa * a).sum(1), (w * b * b).sum(1), (wa * b).sum(1)


def merge_moments(weight, mean_s, mean_t, m2_s, m2_t, co_m2):
    """Merge block moments over dim 0 (``weight`` broadcasts against the others): the pairwise update
    summed in closed form, ``m2 = Σ_b m2_b + W_b (mean_b − mean)²``. A fixed-order reduction."""
    total = weight.sum(0)
    share = torch.where(total != 0, weight / torch.where(total != 0, total, 1.0), 0.0)
    merged_s = (share * mean_s).sum(0)
    merged_t = (share * mean_t).sum(0)
    d_s = mean_s - merged_s
    d_t = mean_t - merged_t
    wd_s = weight * d_s
    return (
        total,
        merged_s,
        merged_t,
        (m2_s + wd_s * d_s).sum(0),
        (m2_t + weight * d_t * d_t).sum(0),
        (co_m2 + wd_s * d_t).sum(0),
    )


def corr_terms(weight, m2_s, m2_t, co_m2, eps: float, c: float, enough_rows):
    """``(one_minus_r, coef, alpha_s, alpha_t)`` per column from the merged moments (see above); all 0
    where ``enough_rows`` is false."""
    safe_weight = torch.where(enough_rows, weight, 1.0)
    var_s, var_t, cov = m2_s / safe_weight, m2_t / safe_weight, co_m2 / safe_weight
    sigmas = clamped_sigma(var_s, eps) * clamped_sigma(var_t, eps)
    eps2 = eps * eps
    zero = torch.zeros((), dtype=var_s.dtype, device=var_s.device)
    one_minus_r = torch.where(enough_rows, 1 - cov / sigmas, zero)
    coef = torch.where(enough_rows, -c / (safe_weight * sigmas), zero)
    alpha_s = torch.where(var_s > eps2, cov / torch.where(var_s > eps2, var_s, 1.0), zero)
    alpha_t = torch.where(var_t > eps2, cov / torch.where(var_t > eps2, var_t, 1.0), zero)
    return one_minus_r, coef, alpha_s, alpha_t


def _corr_fwd(s, t, w, reduction, eps):
    k = s.shape[-1]
    weight, mean_s, mean_t, m2_s, m2_t, co_m2 = merge_moments(*corr_block_moments(s, t, w))
    c = 1 / k if reduction == "mean" else 1.0
    one_minus_r, coef, alpha_s, alpha_t = corr_terms(
        weight, m2_s, m2_t, co_m2, eps, c, weighted_rows(w) >= 2
    )
    a = s - mean_s
    b = t - mean_t
    scale = coef * w.unsqueeze(-1)
    grad_s = scale * (b - alpha_s * a)
    grad_t = scale * (a - alpha_t * b)
    if reduction == "none":
        return one_minus_r, grad_s, grad_t
    loss = one_minus_r.mean() if reduction == "mean" else one_minus_r.sum()
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
