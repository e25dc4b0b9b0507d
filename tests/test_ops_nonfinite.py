"""The non-finite policy (``flexkd.ops`` docstrings, README "Ops"): NaN and inf in the data propagate as
in torch's ``mask * loss``, on every backend, also from rows of weight 0; a finite result never hides one.
A mask weight that is NaN, inf or negative is refused (ValueError naming ``mask``) in eager mode; under
``torch.compile`` the weights are not read (no host sync) and NaN/inf still propagate.

Each case poisons one element of the student or of a selected teacher column, in a row of positive or
of zero weight, and requires the backend's loss and gradients to be non-finite exactly where the
reference's are (as torch computes them from the plain formula).
"""

import math

import pytest
import torch
from _targets import Target, op_targets

from flexkd.ops import (
    LOSSES,
    REDUCTIONS,
    STATS,
    flex_feature_loss,
    importance_scores,
    reference,
    select_top_k,
)

TARGETS = op_targets()
N, WIDTH, K, ROW = 40, 12, 5, 7
INDEX = torch.tensor([9, 2, 5, 0, 11])


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, K, generator=g), torch.randn(N, WIDTH, generator=g), torch.rand(N, generator=g) + 0.5


def _run(fn, student, teacher, mask, upstream=None):
    s = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_()
    value = fn(s, t, mask)
    grad = torch.ones_like(value) if upstream is None else torch.full_like(value, upstream)
    value.backward(grad)
    return [Target.back(x) for x in (value, s.grad, t.grad)]


def _both(target, student, teacher, mask, loss, reduction, upstream=None):
    got = _run(
        lambda s, t, m: flex_feature_loss(
            s, t, target.put(INDEX), target.put(m), loss=loss, reduction=reduction, backend=target.backend
        ),
        target.put(student), target.put(teacher), mask, upstream,
    )
    want = _run(
        lambda s, t, m: reference.flex_feature_loss(s, t, INDEX, m, loss=loss, reduction=reduction),
        student, teacher, mask, upstream,
    )
    return got, want


def _assert_same_non_finite(got, want):
    for name, a, b in zip(("loss", "student grad", "teacher grad"), got, want, strict=True):
        assert torch.equal(~torch.isfinite(a), ~torch.isfinite(b)), (
            f"{name}: non-finite at {(~torch.isfinite(a)).nonzero().tolist()}, "
            f"the reference at {(~torch.isfinite(b)).nonzero().tolist()}"
        )


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("row_weight", [1.0, 0.0], ids=["weighted-row", "masked-row"])
def test_feature_loss_propagates(target, loss, reduction, where, bad, row_weight):
    student, teacher, mask = _inputs()
    mask[ROW] = row_weight
    if where == "student":
        student[ROW, 3] = bad
    else:
        teacher[ROW, INDEX[1]] = bad
    got, want = _both(target, student, teacher, mask, loss, reduction)
    assert not torch.isfinite(want[0]).all(), "the case must poison the reference"
    _assert_same_non_finite(got, want)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("loss", LOSSES)
def test_unselected_teacher_columns_do_not_matter(target, loss):
    student, teacher, mask = _inputs()
    teacher[ROW, 1] = math.nan  # column 1 is not selected
    teacher[ROW + 1, 3] = math.inf
    got, want = _both(target, student, teacher, mask, loss, "mean")
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("loss", LOSSES)
def test_nan_grad_output_gives_nan_gradients(target, loss):
    student, teacher, mask = _inputs()
    got, want = _both(target, student, teacher, mask, loss, "mean", upstream=math.nan)
    assert torch.isnan(got[1]).all() and torch.isnan(got[2][:, INDEX]).all()
    _assert_same_non_finite(got, want)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("stat", STATS)
@pytest.mark.parametrize("where", ["hidden", "grad"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("row_weight", [1.0, 0.0], ids=["weighted-row", "masked-row"])
def test_importance_propagates(target, stat, where, bad, row_weight):
    g = torch.Generator().manual_seed(1)
    hidden, grad = torch.randn(N, WIDTH, generator=g), torch.randn(N, WIDTH, generator=g)
    mask = torch.rand(N, generator=g) + 0.5
    mask[ROW] = row_weight
    {"hidden": hidden, "grad": grad}[where][ROW, 4] = bad
    actual = Target.back(
        importance_scores(target.put(hidden), target.put(grad), target.put(mask), stat=stat, backend=target.backend)
    )
    expected = reference.importance_scores(hidden, grad, mask, stat)
    # "grad" and "grad_sq" never read hidden: a non-finite hidden leaves them finite.
    assert torch.isfinite(expected).all() == (where == "hidden" and stat != "grad_x_act")
    assert torch.equal(~torch.isfinite(actual), ~torch.isfinite(expected))


BAD_WEIGHTS = [math.nan, math.inf, -math.inf, -0.5]
BAD_IDS = ["nan", "inf", "-inf", "negative"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bad", BAD_WEIGHTS, ids=BAD_IDS)
def test_bad_mask_weights_are_refused(target, dtype, bad):
    student, teacher, mask = _inputs()
    mask = mask.to(dtype)
    mask[ROW] = bad
    with pytest.raises(ValueError, match=r"mask weights must be finite and >= 0, got 1 that are not"):
        flex_feature_loss(target.put(student), target.put(teacher), target.put(INDEX), target.put(mask),
                          backend=target.backend)
    with pytest.raises(ValueError, match=r"mask weights must be finite and >= 0"):
        importance_scores(target.put(teacher), target.put(teacher), target.put(mask), backend=target.backend)


def test_zero_and_bool_weights_pass():
    student, teacher, mask = _inputs()
    mask[:3] = 0.0
    assert torch.isfinite(flex_feature_loss(student, teacher, INDEX, mask))
    assert torch.isfinite(flex_feature_loss(student, teacher, INDEX, mask > 0.6))
    empty = torch.zeros(0, K), torch.zeros(0, WIDTH), torch.zeros(0)
    assert flex_feature_loss(*empty[:2], INDEX, empty[2]).item() == 0.0


def test_under_compile_mask_weights_are_not_read():
    """No host sync in the graph: a bad weight is not refused there, and NaN/inf still propagate."""
    student, teacher, mask = _inputs()
    compiled = torch.compile(
        lambda s, t, m: flex_feature_loss(s, t, INDEX, m, backend="torch"), fullgraph=True, dynamic=False
    )
    torch.testing.assert_close(compiled(student, teacher, mask), reference.flex_feature_loss(student, teacher, INDEX, mask))
    for bad in (math.nan, math.inf):
        poisoned = mask.clone()
        poisoned[ROW] = bad
        assert not torch.isfinite(compiled(student, teacher, poisoned))
    negative = mask.clone()
    negative[ROW] = -0.5
    compiled(student, teacher, negative)  # used as given, not refused


def test_select_top_k_rejects_nan_and_ranks_inf():
    with pytest.raises(ValueError, match="NaN"):
        select_top_k(torch.tensor([1.0, math.nan, 0.5]), 1)
    assert select_top_k(torch.tensor([1.0, math.inf, -math.inf, 0.5]), 2).tolist() == [0, 1]
