"""flexkd.losses against hand-written formulas (fp64 loops), fresh random inputs every run."""

import math

import pytest
import torch
import torch.nn.functional as F

from flexkd.losses import (
    CKAFeatureLoss,
    FlexFeatureLoss,
    ProjectorFeatureLoss,
    linear_cka,
    logit_kd,
    task_loss,
)
from flexkd.ops import reference


def _probs(logits, temperature):
    return [[math.exp(v / temperature) for v in row] for row in logits.tolist()]


def _normalise(rows):
    return [[v / sum(row) for v in row] for row in rows]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def _hand_kd(student, teacher, kind, temperature, beta, valid):
    """Per-position formula on Python floats, averaged over valid positions, times T^2."""
    q_rows = _normalise(_probs(student.reshape(-1, student.shape[-1]), temperature))
    p_rows = _normalise(_probs(teacher.reshape(-1, teacher.shape[-1]), temperature))
    total, count = 0.0, 0
    for p, q, ok in zip(p_rows, q_rows, valid.reshape(-1).tolist(), strict=True):
        if not ok:
            continue
        if kind == "forward_kl":
            value = _kl(p, q)
        elif kind == "reverse_kl":
            value = _kl(q, p)
        else:
            m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q, strict=True)]
            value = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
        total += value * temperature**2
        count += 1
    return total / count if count else 0.0


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_logit_kd_matches_hand_formula(kind, temperature):
    student = torch.randn(2, 5, 7, dtype=torch.float64) * 2
    teacher = torch.randn(2, 5, 7, dtype=torch.float64) * 2
    labels = torch.randint(0, 7, (2, 5))
    labels[0, :2] = -100
    labels[1, 4] = -100
    beta = 0.3
    got = logit_kd(student, teacher, kind=kind, temperature=temperature, beta=beta, labels=labels)
    want = _hand_kd(student, teacher, kind, temperature, beta, labels != -100)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_logit_kd_sum_and_none_reductions_agree_with_mean():
    student, teacher = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    mask = torch.rand(3, 4) > 0.3
    mask[0, 0] = True
    mean = logit_kd(student, teacher, mask=mask)
    total = logit_kd(student, teacher, mask=mask, reduction="sum")
    per_position = logit_kd(student, teacher, mask=mask, reduction="none")
    assert per_position.shape == (3, 4)
    assert torch.allclose(per_position.sum(), total)
    assert torch.allclose(mean, total / mask.sum())


def test_jsd_is_symmetric_at_half_and_not_otherwise():
    a, b = torch.randn(4, 9), torch.randn(4, 9)
    assert torch.allclose(
        logit_kd(a, b, kind="jsd", beta=0.5), logit_kd(b, a, kind="jsd", beta=0.5), atol=1e-6
    )
    assert not torch.allclose(
        logit_kd(a, b, kind="jsd", beta=0.2), logit_kd(b, a, kind="jsd", beta=0.2), atol=1e-6
    )


def test_kd_of_identical_logits_is_zero_and_temperature_scales_by_t_squared():
    logits = torch.randn(5, 11)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert logit_kd(logits, logits.clone(), kind=kind).abs().item() < 1e-6
    # for tiny logits, KL(softmax(a/T) || softmax(b/T)) ~ ||a-b||^2 / T^2 up to O(1/T^3), so T^2 * KL is T-invariant
    a, b = (
        torch.randn(3, 8, dtype=torch.float64) * 1e-3,
        torch.randn(3, 8, dtype=torch.float64) * 1e-3,
    )
    low, high = logit_kd(a, b, temperature=1.0), logit_kd(a, b, temperature=4.0)
    assert high.item() == pytest.approx(low.item(), rel=1e-2)


def test_logit_kd_all_ignored_gives_zero_and_zero_gradient():
    student = torch.randn(2, 3, 5, requires_grad=True)
    loss = logit_kd(student, torch.randn(2, 3, 5), labels=torch.full((2, 3), -100))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_logit_kd_rejects_different_vocabularies_and_bad_arguments():
    with pytest.raises(ValueError, match="vocabulary"):
        logit_kd(torch.randn(2, 5), torch.randn(2, 6))
    with pytest.raises(ValueError, match="kind"):
        logit_kd(torch.randn(2, 5), torch.randn(2, 5), kind="kl")
    with pytest.raises(ValueError, match="temperature"):
        logit_kd(torch.randn(2, 5), torch.randn(2, 5), temperature=0)
    with pytest.raises(ValueError, match="beta"):
        logit_kd(torch.randn(2, 5), torch.randn(2, 5), kind="jsd", beta=1.0)
    with pytest.raises(ValueError, match="labels"):
        logit_kd(torch.randn(2, 5), torch.randn(2, 5), labels=torch.zeros(3, dtype=torch.long))


def test_task_loss_matches_cross_entropy_with_ignore_index():
    logits = torch.randn(3, 6, 10)
    labels = torch.randint(0, 10, (3, 6))
    labels[1, :3] = -100
    want = F.cross_entropy(logits.reshape(-1, 10), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(task_loss(logits, labels), want)
    assert torch.allclose(task_loss(logits, labels, reduction="sum"), want * (labels != -100).sum())
    assert task_loss(logits, torch.full((3, 6), -100)).item() == 0.0
    with pytest.raises(TypeError, match="labels"):
        task_loss(logits, labels.float())


@pytest.mark.parametrize("loss", ["mse", "corr"])
def test_flex_feature_loss_equals_reference_on_selected_columns(loss):
    teacher = torch.randn(2, 7, 24)
    index = torch.randperm(24)[:8]
    student = torch.randn(2, 7, 8, requires_grad=True)
    mask = torch.rand(2, 7) > 0.25
    mask[0, :2] = True
    module = FlexFeatureLoss(index, loss=loss)
    got = module(student, teacher[..., index], mask)
    want = reference.flex_feature_loss(student, teacher, index, mask, loss=loss)
    assert torch.allclose(got, want, atol=1e-6)
    if loss == "mse":  # sum / units recovers the mean, units = valid rows
        assert torch.allclose(
            module(student, teacher[..., index], mask, reduction="sum") / mask.sum(),
            want,
            atol=1e-6,
        )
    assert module.per_token == (loss == "mse")


def test_flex_feature_loss_rejects_wrong_widths():
    module = FlexFeatureLoss(torch.tensor([0, 3, 5]))
    with pytest.raises(ValueError, match="k=3"):
        module(torch.randn(4, 3), torch.randn(4, 6))
    with pytest.raises(TypeError, match="index"):
        FlexFeatureLoss(torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("direction", ["student_to_teacher", "teacher_to_student"])
def test_projector_loss_is_mse_through_a_trained_linear_map(direction):
    module = ProjectorFeatureLoss(6, 10, direction=direction)
    student = torch.randn(2, 5, 6, requires_grad=True)
    teacher = torch.randn(2, 5, 10)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    loss = module(student, teacher, mask)
    rows = mask.reshape(-1)
    if direction == "student_to_teacher":
        predicted, target = module.projector(student), teacher
    else:
        predicted, target = student, module.projector(teacher)
    want = (predicted - target).pow(2).reshape(-1, predicted.shape[-1])[rows].mean()
    assert torch.allclose(loss, want, atol=1e-6)
    loss.backward()
    assert module.projector.weight.grad is not None and module.projector.weight.grad.abs().sum() > 0
    assert student.grad is not None and student.grad.abs().sum() > 0


def _hsic_cka(x, y):
    """Gram-matrix CKA: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)), K = X X^T, L = Y Y^T."""
    n = x.shape[0]
    h = torch.eye(n, dtype=x.dtype) - 1.0 / n
    gram_x, gram_y = h @ x @ x.T @ h, h @ y @ y.T @ h
    return (gram_x * gram_y).sum() / torch.sqrt((gram_x * gram_x).sum() * (gram_y * gram_y).sum())


def test_linear_cka_matches_gram_formula_and_mask_drops_rows():
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    y = torch.randn(3, 6, 9, dtype=torch.float64) + x.sum(-1, keepdim=True)
    mask = torch.rand(3, 6) > 0.3
    mask[0, :3] = True
    got = linear_cka(x, y, mask)
    want = _hsic_cka(x[mask], y[mask])
    assert got.item() == pytest.approx(want.item(), rel=1e-10)


def test_cka_loss_of_identical_or_rotated_features_is_zero():
    x = torch.randn(2, 8, 6, requires_grad=True)
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    module = CKAFeatureLoss()
    assert module(x, x.detach()).item() == pytest.approx(0.0, abs=1e-5)
    assert module(x, (x.detach() @ q) * 3.0 + 1.0).item() == pytest.approx(0.0, abs=1e-5)
    unrelated = module(x, torch.randn(2, 8, 11))
    assert unrelated.item() > 0.05
    unrelated.backward()
    assert x.grad.abs().sum() > 0


def test_flex_cka_is_cka_on_the_selected_columns_and_ignores_their_pairing():
    """``FlexFeatureLoss(loss="cka")`` (flexkd's variant): ``1 - linear_cka(student, teacher_selected)``,
    one unit per call; rotating the selected subspace leaves it unchanged, unlike corr, which pairs dims."""
    student = torch.randn(3, 7, 4, dtype=torch.float64, requires_grad=True)
    selected = student.detach() @ torch.randn(4, 4, dtype=torch.float64) + 0.3 * torch.randn(3, 7, 4, dtype=torch.float64)
    mask = torch.rand(3, 7) > 0.3
    mask[0, :2] = True
    module = FlexFeatureLoss(torch.tensor([5, 1, 9, 2]), loss="cka")
    assert not module.per_token
    loss = module(student, selected, mask)
    assert loss.item() == pytest.approx(1.0 - _hsic_cka(student[mask], selected[mask]).item(), rel=1e-10)
    assert module(student, selected, mask, reduction="sum").item() == loss.item()
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    assert module(student, selected @ q, mask).item() == pytest.approx(loss.item(), rel=1e-10)
    corr = FlexFeatureLoss(torch.tensor([5, 1, 9, 2]), loss="corr")
    assert corr(student, selected @ q, mask).item() != pytest.approx(corr(student, selected, mask).item(), rel=1e-3)
    loss.backward()
    assert student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="must both end in k=4"):
        module(student, selected[..., :3])
    one_row = torch.zeros(3, 7, dtype=torch.bool)
    one_row[1, 2] = True
    assert module(student, selected, one_row).item() == 0.0


def test_cka_loss_with_fewer_than_two_rows_is_zero():
    x = torch.randn(1, 4, 3, requires_grad=True)
    mask = torch.zeros(1, 4, dtype=torch.bool)
    mask[0, 1] = True
    loss = CKAFeatureLoss()(x, torch.randn(1, 4, 5), mask)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
