"""Distillation losses: task cross-entropy, logit KD, and the feature terms.

Every loss can report a *sum* together with the number of *units* it was summed over
(tokens, sequences, or one unit per call for losses built from batch statistics), so a
training loop can normalise a gradient-accumulation window by its total valid units
instead of averaging per-micro-batch means. ``reduction="mean"`` is ``sum / units``.

Feature losses share one calling convention::

    loss_module(student_hidden, teacher_hidden, mask=None, reduction="mean") -> Tensor

and a class attribute ``per_token``: ``True`` when the loss is a sum over rows (its units
are the mask's total weight), ``False`` when it is built from statistics over the batch
(correlation, CKA: one unit per call).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexkd.ops import _validate, flex_feature_loss

LOGIT_KD_KINDS = ("forward_kl", "reverse_kl", "jsd")
FEATURE_LOSSES = ("mse", "corr")
# Flex-KD's feature term can also be linear CKA on the selected subspace (flexkd's variant, not the paper's)
FLEX_FEATURE_LOSSES = (*FEATURE_LOSSES, "cka")
PROJECTOR_DIRECTIONS = ("student_to_teacher", "teacher_to_student")
_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str, allowed: Sequence[str] = _REDUCTIONS) -> None:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {tuple(allowed)}, got {reduction!r}")


def _valid_weights(
    leading_shape: torch.Size,
    device: torch.device,
    labels: Tensor | None,
    ignore_index: int,
    mask: Tensor | None,
) -> Tensor:
    """fp32 weight per position: labels != ignore_index, times the mask when given."""
    weights = torch.ones(leading_shape, dtype=torch.float32, device=device)
    if labels is not None:
        if labels.shape != leading_shape:
            raise ValueError(
                f"labels must have the logits' leading shape {tuple(leading_shape)}, "
                f"got {tuple(labels.shape)}"
            )
        weights = weights * (labels != ignore_index).float()
    if mask is not None:
        if mask.shape != leading_shape:
            raise ValueError(
                f"mask must have the logits' leading shape {tuple(leading_shape)}, "
                f"got {tuple(mask.shape)}"
            )
        weights = weights * mask.float()
    return weights


def _mean_or_zero(total: Tensor, count: Tensor) -> Tensor:
    return torch.where(count > 0, total / count.clamp_min(torch.finfo(total.dtype).tiny), total * 0)


def task_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of ``logits [..., C]`` against integer ``labels [...]`` in fp32.

    Positions labelled ``ignore_index`` contribute nothing; ``"mean"`` divides by the
    number of valid positions (0 when there are none).
    """
    _check_reduction(reduction)
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a floating-point tensor")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError("labels must be an integer tensor (class indices)")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have the logits' leading shape {tuple(logits.shape[:-1])}, "
            f"got {tuple(labels.shape)}"
        )
    per_position = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    ).reshape(labels.shape)
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    return _mean_or_zero(total, (labels != ignore_index).sum().to(total.dtype))


def logit_kd(
    student_logits: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Logit distillation between two distributions over the same vocabulary.

    With ``p = softmax(teacher / T)`` and ``q = softmax(student / T)`` per position:
    ``forward_kl`` is KL(p || q), ``reverse_kl`` is KL(q || p), and ``jsd`` is the
    generalised Jensen-Shannon divergence ``beta KL(p || m) + (1 - beta) KL(q || m)``
    with ``m = beta p + (1 - beta) q`` (symmetric at ``beta = 0.5``). Each is multiplied
    by ``T**2`` so gradient magnitudes do not shrink with the temperature.

    The teacher is either dense ``teacher_logits [..., V]`` or ``teacher_topk = (values [..., K],
    indices [..., K])``, its K largest logits: then ``p`` is the softmax of the K values at temperature
    T on their indices (the top-K renormalised) and 0 on the rest of the vocabulary. ``forward_kl``
    and ``jsd`` stay exact sums over the full vocabulary (``q`` is the student's softmax over all V
    classes; outside the support ``m = (1 - beta) q``). ``reverse_kl`` against a distribution with
    zeros is +inf wherever the student puts mass off the support, so it is refused for a top-K teacher.

    Positions whose label is ``ignore_index`` (when ``labels`` is given) or whose
    ``mask`` is 0 contribute nothing; ``"mean"`` divides by their total weight.
    Computed in fp32 (fp64 for fp64 inputs).
    """
    _check_reduction(reduction)
    if kind not in LOGIT_KD_KINDS:
        raise ValueError(f"kind must be one of {LOGIT_KD_KINDS}, got {kind!r}")
    if not (
        isinstance(temperature, int | float) and temperature > 0 and math.isfinite(temperature)
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if kind == "jsd" and not (0.0 < beta < 1.0):
        raise ValueError(f"beta must lie strictly between 0 and 1 for kind='jsd', got {beta!r}")
    if not isinstance(student_logits, Tensor) or not student_logits.is_floating_point():
        raise TypeError("student_logits must be a floating-point tensor")
    compute_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    log_q = F.log_softmax(student_logits.to(compute_dtype) / temperature, dim=-1)
    log_p = _teacher_log_probs(student_logits, teacher_logits, teacher_topk, kind, temperature)
    if kind == "forward_kl":
        per_position = _kl(log_p, log_q)
    elif kind == "reverse_kl":
        per_position = _kl(log_q, log_p)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        per_position = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    per_position = per_position * (temperature**2)

    weights = _valid_weights(
        per_position.shape, per_position.device, labels, ignore_index, mask
    ).to(compute_dtype)
    weighted = per_position * weights
    if reduction == "none":
        return weighted
    total = weighted.sum()
    if reduction == "sum":
        return total
    return _mean_or_zero(total, weights.sum())


def _teacher_log_probs(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    teacher_topk: tuple[Tensor, Tensor] | None,
    kind: str,
    temperature: float,
) -> Tensor:
    """``log softmax(teacher / T)`` over the student's vocabulary in the compute dtype: dense, or the
    top-K renormalised with ``-inf`` off its support."""
    compute_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    if (teacher_logits is None) == (teacher_topk is None):
        raise ValueError("pass exactly one of teacher_logits and teacher_topk")
    if teacher_logits is not None:
        if not isinstance(teacher_logits, Tensor) or not teacher_logits.is_floating_point():
            raise TypeError("teacher_logits must be a floating-point tensor")
        if student_logits.shape[-1] != teacher_logits.shape[-1]:
            raise ValueError(
                "logit KD needs one vocabulary: student_logits has "
                f"{student_logits.shape[-1]} classes, teacher_logits has {teacher_logits.shape[-1]}"
            )
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                f"{tuple(teacher_logits.shape)} must have the same shape"
            )
        return F.log_softmax(teacher_logits.to(compute_dtype) / temperature, dim=-1)
    values, indices = _validate.teacher_topk(teacher_topk, student_logits.shape, kind)
    log_p_topk = F.log_softmax(values.to(compute_dtype) / temperature, dim=-1)
    dense = torch.full(
        student_logits.shape, -math.inf, dtype=compute_dtype, device=student_logits.device
    )
    return dense.scatter(-1, indices.long(), log_p_topk)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) over the last dim from log-probabilities; 0 log 0 counts as 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def linear_cka(x: Tensor, y: Tensor, mask: Tensor | None = None, *, eps: float = 1e-12) -> Tensor:
    """Linear CKA between row sets ``x [..., dx]`` and ``y [..., dy]`` (same leading shape).

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with rows centred by their
    (mask-weighted) mean and weighted by ``mask``. 1 for identical (or linearly
    isometric) features, 0 for unrelated ones; 0 when fewer than two rows carry weight.
    """
    if x.shape[:-1] != y.shape[:-1]:
        raise ValueError(
            f"x and y must share their leading shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.reshape(-1, x.shape[-1]).to(compute_dtype)
    ys = y.reshape(-1, y.shape[-1]).to(compute_dtype)
    if mask is None:
        w = torch.ones(xs.shape[0], dtype=compute_dtype, device=xs.device)
    else:
        if mask.shape != x.shape[:-1]:
            raise ValueError(
                f"mask must have the features' leading shape {tuple(x.shape[:-1])}, "
                f"got {tuple(mask.shape)}"
            )
        w = mask.reshape(-1).to(compute_dtype)
    total_weight = w.sum()
    if int((w > 0).sum()) < 2:
        return (xs.sum() * 0 + ys.sum() * 0).to(compute_dtype)
    sqrt_w = w.sqrt().unsqueeze(-1)
    xc = (xs - (w @ xs) / total_weight) * sqrt_w
    yc = (ys - (w @ ys) / total_weight) * sqrt_w
    cross = (yc.T @ xc).square().sum()
    self_x = (xc.T @ xc).square().sum()
    self_y = (yc.T @ yc).square().sum()
    return cross / (self_x * self_y).sqrt().clamp_min(eps)


class FlexFeatureLoss(nn.Module):
    """The Flex-KD feature term: student hidden ``[..., k]`` against the selected teacher dims.

    Convention used throughout flexkd: the teacher side is the *kept columns*
    ``teacher_hidden[..., index]`` in selection order (what a teacher tap with
    ``columns=index`` captures), so the op is called with ``index = arange(k)``.
    With ``loss="mse"``/``"corr"`` student dim ``i`` pairs with the ``i``-th selected teacher dim.
    ``loss="cka"`` is flexkd's own variant, not the paper's: ``1 - linear_cka`` between the student
    and the selected subspace, which keeps Flex-KD's choice of teacher dims but, like CKA, does not
    pair dims one to one (it is invariant to rotations of either side).
    """

    def __init__(self, index: Tensor, *, loss: str = "mse") -> None:
        super().__init__()
        if loss not in FLEX_FEATURE_LOSSES:
            raise ValueError(f"loss must be one of {FLEX_FEATURE_LOSSES}, got {loss!r}")
        if not isinstance(index, Tensor) or index.dim() != 1 or index.is_floating_point():
            raise TypeError("index must be a 1-D integer tensor of teacher dimensions")
        if index.numel() == 0:
            raise ValueError("index must select at least one teacher dimension (k >= 1)")
        self.loss = loss
        self.per_token = loss == "mse"
        self.register_buffer("teacher_index", index.to(torch.long).clone(), persistent=False)
        self.register_buffer("_positions", torch.arange(index.numel()), persistent=False)

    @property
    def k(self) -> int:
        return int(self.teacher_index.numel())

    def forward(
        self,
        student: Tensor,
        teacher_selected: Tensor,
        mask: Tensor | None = None,
        *,
        reduction: str = "mean",
    ) -> Tensor:
        _check_reduction(reduction, ("mean", "sum"))
        if student.shape[-1] != self.k or teacher_selected.shape[-1] != self.k:
            raise ValueError(
                f"student and teacher_selected must both end in k={self.k} dims, got "
                f"{tuple(student.shape)} and {tuple(teacher_selected.shape)}"
            )
        if self.loss == "cka":
            return _one_minus_cka(student, teacher_selected, mask)
        return _mse_or_corr(student, teacher_selected, self._positions, mask, self.loss, reduction)

    def extra_repr(self) -> str:
        return f"k={self.k}, loss={self.loss!r}"


def _mse_or_corr(
    student: Tensor, teacher: Tensor, index: Tensor, mask: Tensor | None, loss: str, reduction: str
) -> Tensor:
    """``flex_feature_loss`` with the mse "sum" divided by k, so sum / units == mean."""
    if loss == "mse" and reduction == "sum":
        return (
            flex_feature_loss(student, teacher, index, mask, loss="mse", reduction="sum")
            / index.numel()
        )
    return flex_feature_loss(student, teacher, index, mask, loss=loss, reduction="mean")


class ProjectorFeatureLoss(nn.Module):
    """The paper's projector baseline: a trained linear map between the two hidden sizes.

    ``direction="student_to_teacher"`` maps the student hidden ``[..., ds]`` to ``dt`` and
    matches the full teacher hidden; ``"teacher_to_student"`` maps the teacher hidden to
    ``ds`` and matches the student. The projector's parameters belong to this module, not
    to the student, so the student's ``state_dict`` and ``save_pretrained`` never see them;
    pass ``parameters()`` of this module to the optimizer alongside the student's.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        *,
        direction: str = "student_to_teacher",
        loss: str = "mse",
        bias: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if direction not in PROJECTOR_DIRECTIONS:
            raise ValueError(f"direction must be one of {PROJECTOR_DIRECTIONS}, got {direction!r}")
        if loss not in FEATURE_LOSSES:
            raise ValueError(f"loss must be one of {FEATURE_LOSSES}, got {loss!r}")
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.direction, self.loss = direction, loss
        self.per_token = loss == "mse"
        if direction == "student_to_teacher":
            self.projector = nn.Linear(student_dim, teacher_dim, bias=bias)
            matched = teacher_dim
        else:
            self.projector = nn.Linear(teacher_dim, student_dim, bias=bias)
            matched = student_dim
        self.register_buffer("_positions", torch.arange(matched), persistent=False)

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        mask: Tensor | None = None,
        *,
        reduction: str = "mean",
    ) -> Tensor:
        _check_reduction(reduction, ("mean", "sum"))
        if student.shape[-1] != self.student_dim or teacher.shape[-1] != self.teacher_dim:
            raise ValueError(
                f"expected student [..., {self.student_dim}] and teacher [..., {self.teacher_dim}], "
                f"got {tuple(student.shape)} and {tuple(teacher.shape)}"
            )
        weight_dtype = self.projector.weight.dtype
        if self.direction == "student_to_teacher":
            predicted, target = self.projector(student.to(weight_dtype)), teacher
        else:
            predicted, target = student, self.projector(teacher.to(weight_dtype))
        return _mse_or_corr(
            predicted, target.to(predicted.dtype), self._positions, mask, self.loss, reduction
        )

    def extra_repr(self) -> str:
        return f"direction={self.direction!r}, loss={self.loss!r}"


class CKAFeatureLoss(nn.Module):
    """``1 - linear_cka(student, teacher)`` over the valid rows of a batch (full teacher hidden).

    CKA compares the two representations' row-similarity structure, so the hidden sizes
    may differ and nothing is trained besides the student. Built from batch statistics:
    one unit per call.
    """

    per_token = False

    def __init__(self, *, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        mask: Tensor | None = None,
        *,
        reduction: str = "mean",
    ) -> Tensor:
        _check_reduction(reduction, ("mean", "sum"))
        return _one_minus_cka(student, teacher, mask, eps=self.eps)


def _one_minus_cka(student: Tensor, teacher: Tensor, mask: Tensor | None, *, eps: float = 1e-12) -> Tensor:
    """``1 - linear_cka`` over the rows with weight, or 0 (with a graph) when fewer than two have weight:
    one unit per call, so ``"sum"`` and ``"mean"`` are the same."""
    if int((mask > 0).sum() if mask is not None else student[..., 0].numel()) < 2:
        return student.sum().float() * 0
    return 1.0 - linear_cka(student, teacher, mask, eps=eps)
