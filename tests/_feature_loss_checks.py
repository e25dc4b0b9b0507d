"""How the feature-loss suites compare a target (backend + device) with the torch reference: loss,
student and teacher gradients for the same seeded upstream gradient, within the per-dtype tolerances
of ``_tolerances.py`` scaled by the size of the terms that cancel."""

import torch
from _targets import Target
from _tolerances import assert_grad_close, assert_loss_close

from flexkd.ops import flex_feature_loss, reference


def run_both(student, teacher, index, mask, loss, reduction, target: Target, teacher_grad=False):
    """Loss and grads from ``target`` and from the reference's autograd, on copies of the inputs, for
    the same seeded upstream gradient; everything returned on the CPU."""
    on_target = (target.put(index), target.put(mask))
    results = []
    for fn, move in (
        (
            lambda s, t: flex_feature_loss(
                s, t, *on_target, loss=loss, reduction=reduction, backend=target.backend
            ),
            target.put,
        ),
        (lambda s, t: reference.flex_feature_loss(s, t, index, mask, loss=loss, reduction=reduction), lambda x: x),
    ):
        s = move(student.detach().clone()).requires_grad_(True)
        t = move(teacher.detach().clone()).requires_grad_(teacher_grad)
        value = fn(s, t)
        generator = torch.Generator().manual_seed(0)
        upstream = (
            torch.randn(value.shape, generator=generator, dtype=value.dtype)
            if value.dim()
            else torch.tensor(1.7, dtype=value.dtype)
        )
        (value * upstream.to(value.device)).sum().backward()
        results.append((Target.back(value), Target.back(s.grad), Target.back(t.grad), upstream))
    return results


def corr_scales(student, teacher, index, mask, reduction, upstream, eps=1e-8):
    """Sizes of the terms whose difference is the corr loss (1 and r) and its gradient."""
    s, t = student.double().flatten(0, -2), teacher.double()[..., index.long()].flatten(0, -2)
    w = torch.ones(s.shape[0], dtype=torch.float64) if mask is None else mask.double().flatten()
    total = w.sum().clamp_min(1e-30)
    a = s - (w[:, None] * s).sum(0) / total
    b = t - (w[:, None] * t).sum(0) / total
    sigmas = reference.clamped_sigma((w[:, None] * a * a).sum(0) / total, eps) * reference.clamped_sigma(
        (w[:, None] * b * b).sum(0) / total, eps
    )
    c = 1 / s.shape[1] if reduction == "mean" else 1.0
    terms = c * w[:, None] / total * (a.abs() + b.abs()) / sigmas
    loss_scale = float(s.shape[1]) if reduction == "sum" else 1.0
    return loss_scale, float(terms.max() * upstream.abs().max()) if terms.numel() else 0.0


def check(student, teacher, index, mask, loss, reduction, target: Target, teacher_grad=False):
    (value, gs, gt, upstream), (ref_value, ref_gs, ref_gt, _) = run_both(
        student, teacher, index, mask, loss, reduction, target, teacher_grad
    )
    dtype = student.dtype
    loss_scale = grad_scale = None
    if loss == "corr":
        loss_scale, grad_scale = corr_scales(student, teacher, index, mask, reduction, upstream)
    assert_loss_close(value, ref_value, dtype, "loss", loss_scale)
    assert_grad_close(gs, ref_gs, dtype, "student grad", grad_scale)
    if teacher_grad:
        assert_grad_close(gt, ref_gt, teacher.dtype, "teacher grad", grad_scale)
    assert torch.isfinite(value).all() and torch.isfinite(gs).all()
