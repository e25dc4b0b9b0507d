"""``flexkd.losses.logit_kd`` against a top-K teacher ``(values, indices)``: the materialised reference
the fused op and the stored top-K teacher outputs are checked against."""

from __future__ import annotations

import math

import pytest
import torch

from flexkd.losses import logit_kd


def _topk(teacher: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = teacher.topk(k, dim=-1)
    return values, indices


def _hand_forward_kl(student, values, indices, t):
    """KL(p || q) with p the renormalised top-K: only the K support terms are nonzero."""
    p = torch.softmax(values.double() / t, -1)
    log_q = torch.log_softmax(student.double() / t, -1).gather(-1, indices)
    return (p * (p.log() - log_q)).sum(-1) * t * t


def _hand_jsd(student, values, indices, t, beta):
    """JSD over the full vocabulary with p scattered into zeros."""
    p = torch.zeros_like(student, dtype=torch.float64)
    p.scatter_(-1, indices, torch.softmax(values.double() / t, -1))
    q = torch.softmax(student.double() / t, -1)
    m = beta * p + (1 - beta) * q
    kl_pm = torch.where(p > 0, p * (p / m).log(), 0.0).sum(-1)
    kl_qm = (q * (q / m).log()).sum(-1)
    return (beta * kl_pm + (1 - beta) * kl_qm) * t * t


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_and_jsd_match_hand_formulas(temperature):
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 4, 50) * 3, torch.randn(3, 4, 50) * 3
    values, indices = _topk(teacher, 7)
    mask = torch.rand(3, 4) > 0.3
    w = mask.double()
    got = logit_kd(student, teacher_topk=(values, indices), temperature=temperature, mask=mask)
    want = (_hand_forward_kl(student, values, indices, temperature) * w).sum() / w.sum()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    got = logit_kd(
        student, teacher_topk=(values, indices), kind="jsd", beta=0.3, temperature=temperature
    )
    want = _hand_jsd(student, values, indices, temperature, 0.3).mean()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_full_vocabulary_top_k_equals_the_dense_teacher(kind):
    torch.manual_seed(1)
    student, teacher = torch.randn(5, 30), torch.randn(5, 30)
    values, indices = _topk(teacher, 30)
    dense = logit_kd(student, teacher, kind=kind, temperature=2.0)
    topk = logit_kd(student, teacher_topk=(values, indices), kind=kind, temperature=2.0)
    torch.testing.assert_close(topk, dense, rtol=1e-6, atol=1e-6)


def test_gradients_are_finite_and_match_fp64_gradcheck():
    torch.manual_seed(2)
    student = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    values, indices = _topk(torch.randn(4, 12, dtype=torch.float64), 3)
    for kind in ("forward_kl", "jsd"):
        loss = logit_kd(student, teacher_topk=(values, indices), kind=kind)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert torch.autograd.gradcheck(
            lambda s, kind=kind: logit_kd(s, teacher_topk=(values, indices), kind=kind),
            (student,),
        )


def test_a_student_matching_the_renormalised_top_k_has_zero_forward_kl():
    values = torch.tensor([[2.0, 1.0]])
    indices = torch.tensor([[3, 0]])
    student = torch.full((1, 5), -1e4)
    student[0, 3], student[0, 0] = 2.0, 1.0
    assert logit_kd(student, teacher_topk=(values, indices)).abs().item() < 1e-6
    assert logit_kd(student, teacher_topk=(values, indices), kind="jsd").abs().item() < 1e-6


def test_jsd_is_finite_when_the_student_has_mass_off_the_support():
    student = torch.zeros(1, 4)
    loss = logit_kd(student, teacher_topk=(torch.zeros(1, 1), torch.tensor([[2]])), kind="jsd")
    # p = one-hot, q uniform over 4, beta = 0.5: m = 5/8 at the support, 1/8 elsewhere.
    want = 0.5 * math.log(1 / 0.625) + 0.5 * (0.25 * math.log(0.25 / 0.625) + 0.75 * math.log(2))
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_all_masked_gives_zero_and_zero_gradient():
    student = torch.randn(2, 9, requires_grad=True)
    values, indices = _topk(torch.randn(2, 9), 4)
    loss = logit_kd(student, teacher_topk=(values, indices), mask=torch.zeros(2))
    loss.backward()
    assert loss.item() == 0.0 and not student.grad.any()


def test_bad_teacher_arguments_are_refused_naming_them():
    student = torch.randn(2, 6)
    values, indices = _topk(torch.randn(2, 6), 3)
    with pytest.raises(ValueError, match="exactly one of teacher_logits and teacher_topk"):
        logit_kd(student)
    with pytest.raises(ValueError, match="exactly one of teacher_logits and teacher_topk"):
        logit_kd(student, torch.randn(2, 6), teacher_topk=(values, indices))
    with pytest.raises(ValueError, match="kind='reverse_kl'"):
        logit_kd(student, teacher_topk=(values, indices), kind="reverse_kl")
    with pytest.raises(ValueError, match="K must lie in"):
        logit_kd(student, teacher_topk=(torch.randn(2, 7), torch.zeros(2, 7, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 6\)"):
        logit_kd(student, teacher_topk=(values, indices + 6))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 6\)"):
        logit_kd(student, teacher_topk=(values, indices - 6))
    repeated = indices.clone()
    repeated[1, 2] = repeated[1, 0]
    with pytest.raises(ValueError, match="unique within each row"):
        logit_kd(student, teacher_topk=(values, repeated))
    with pytest.raises(TypeError, match="teacher_topk indices must be an int32 or int64"):
        logit_kd(student, teacher_topk=(values, indices.float()))
    with pytest.raises(TypeError, match="teacher_topk values must be a floating-point"):
        logit_kd(student, teacher_topk=(indices, indices))
    with pytest.raises(TypeError, match="teacher_topk must be a pair"):
        logit_kd(student, teacher_topk=values)
    with pytest.raises(ValueError, match="leading shape"):
        logit_kd(student, teacher_topk=(values[:1], indices[:1]))
    with pytest.raises(ValueError, match="temperature"):
        logit_kd(student, teacher_topk=(values, indices), temperature=0.0)
