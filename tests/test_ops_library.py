"""torch.library integration: opcheck of every kernel-level op, torch.compile(fullgraph=True) on CPU."""

import pytest
import torch
from _cases import cpu_backends, random_index

import flexkd.ops
from flexkd.ops import LOSSES, REDUCTIONS, STATS, flex_feature_loss, importance_scores

BACKENDS = cpu_backends()
FEATURE_LOSS_OP = {"torch": "feature_loss_fwd_torch", "cpu": "feature_loss_fwd"}
IMPORTANCE_OP = {"torch": "importance_scores_acc_torch", "cpu": "importance_scores_acc"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck_feature_loss(backend, loss, reduction, with_mask):
    op = getattr(torch.ops.flexkd, FEATURE_LOSS_OP[backend])
    student = torch.randn(6, 3, requires_grad=True)
    teacher = torch.randn(6, 9, requires_grad=True)
    mask = torch.rand(6) if with_mask else None
    args = (student, teacher, random_index(3, 9), mask, loss, reduction, 1e-6, True, True)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stat", STATS)
def test_opcheck_importance(backend, stat):
    op = getattr(torch.ops.flexkd, IMPORTANCE_OP[backend])
    args = (torch.randn(7, 5), torch.randn(7, 5), torch.rand(7), stat, torch.zeros(5))
    torch.library.opcheck(op, args)


def test_opcheck_select_top_k():
    torch.library.opcheck(torch.ops.flexkd.select_top_k, (torch.randn(20), 5, "index"))
    torch.library.opcheck(torch.ops.flexkd.select_top_k, (torch.randn(20), 5, "score"))


def distill_step(student, teacher, index, mask, hidden, grad, loss, backend):
    """What a training step does with the ops: a feature loss and a running importance buffer."""
    value = flex_feature_loss(student, teacher, index, mask, loss=loss, backend=backend)
    scores = importance_scores(hidden, grad, mask, backend=backend)
    return value * 2 + 1, scores


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_compile_fullgraph_matches_eager(backend, loss):
    torch._dynamo.reset()
    student = torch.randn(2, 9, 6, requires_grad=True)
    teacher = torch.randn(2, 9, 20)
    index, mask = random_index(6, 20), torch.rand(2, 9) > 0.2
    hidden, grad = torch.randn(2, 9, 20), torch.randn(2, 9, 20)
    args = (teacher, index, mask, hidden, grad, loss, backend)

    eager_value, eager_scores = distill_step(student, *args)
    (eager_grad,) = torch.autograd.grad(eager_value, student)
    compiled = torch.compile(distill_step, fullgraph=True)
    value, scores = compiled(student, *args)
    (grad_student,) = torch.autograd.grad(value, student)

    torch.testing.assert_close(value, eager_value)
    torch.testing.assert_close(scores, eager_scores)
    torch.testing.assert_close(grad_student, eager_grad)


def test_public_names():
    assert {"flex_feature_loss", "importance_scores", "select_top_k"} <= set(flexkd.ops.__all__)
