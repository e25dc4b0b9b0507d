"""flex_feature_loss on every CPU backend against the torch reference: forward and gradients."""

import pytest
import torch
from _cases import FLOAT_DTYPES, MASK_KINDS, cpu_backends, make_mask, random_index
from _tolerances import assert_grad_close, assert_loss_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexkd.ops import LOSSES, REDUCTIONS, flex_feature_loss, reference

BACKENDS = cpu_backends()


def run_both(student, teacher, index, mask, loss, reduction, backend, teacher_grad=False):
    """Loss and grads from ``backend`` and from the reference's autograd, on copies of the inputs."""
    results = []
    for fn in (
        lambda s, t: flex_feature_loss(s, t, index, mask, loss=loss, reduction=reduction, backend=backend),
        lambda s, t: reference.flex_feature_loss(s, t, index, mask, loss=loss, reduction=reduction),
    ):
        s = student.detach().clone().requires_grad_(True)
        t = teacher.detach().clone().requires_grad_(teacher_grad)
        value = fn(s, t)
        upstream = torch.randn_like(value) if value.dim() else torch.tensor(1.7, dtype=value.dtype)
        (value * upstream).sum().backward()
        results.append((value.detach(), s.grad, t.grad, upstream))
        torch.manual_seed(0)  # same upstream gradient for both calls
    return results


def corr_scales(student, teacher, index, mask, reduction, upstream):
    """Sizes of the terms whose difference is the corr loss (1 and r) and its gradient."""
    s, t = student.double().flatten(0, -2), teacher.double()[..., index.long()].flatten(0, -2)
    w = torch.ones(s.shape[0], dtype=torch.float64) if mask is None else mask.double().flatten()
    total = w.sum().clamp_min(1e-30)
    a = s - (w[:, None] * s).sum(0) / total
    b = t - (w[:, None] * t).sum(0) / total
    sigmas = reference.clamped_sigma((w[:, None] * a * a).sum(0) / total, 1e-8) * reference.clamped_sigma(
        (w[:, None] * b * b).sum(0) / total, 1e-8
    )
    c = 1 / s.shape[1] if reduction == "mean" else 1.0
    terms = c * w[:, None] / total * (a.abs() + b.abs()) / sigmas
    loss_scale = float(s.shape[1]) if reduction == "sum" else 1.0
    return loss_scale, float(terms.max() * upstream.abs().max()) if terms.numel() else 0.0


def check(student, teacher, index, mask, loss, reduction, backend, teacher_grad=False):
    torch.manual_seed(0)
    (value, gs, gt, upstream), (ref_value, ref_gs, ref_gt, _) = run_both(
        student, teacher, index, mask, loss, reduction, backend, teacher_grad
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


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(0, 70),
    width=st.integers(1, 80),
    k_fraction=st.floats(0.0, 1.0),
    leading_3d=st.booleans(),
    dtype=st.sampled_from(FLOAT_DTYPES),
    loss=st.sampled_from(LOSSES),
    reduction=st.sampled_from(REDUCTIONS),
    mask_kind=st.sampled_from(MASK_KINDS),
    index_dtype=st.sampled_from([torch.int32, torch.int64]),
    teacher_grad=st.booleans(),
)
def test_matches_reference_random(
    backend, n, width, k_fraction, leading_3d, dtype, loss, reduction, mask_kind, index_dtype, teacher_grad
):
    k = max(1, round(k_fraction * width))
    leading = (2, n) if leading_3d else (n,)
    student = torch.randn(*leading, k).to(dtype)
    teacher = (torch.randn(*leading, width) * 3 + 0.5).to(dtype)
    mask = make_mask(mask_kind, leading)
    check(student, teacher, random_index(k, width, index_dtype), mask, loss, reduction, backend, teacher_grad)


ODD_SHAPES = {
    "k=1": dict(n=33, width=17, k=1),
    "k=D": dict(n=19, width=24, k=24),
    "N=1": dict(n=1, width=40, k=9),
    "D=4099": dict(n=3, width=4099, k=1537),
    "wide-k": dict(n=5, width=1200, k=1100),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ODD_SHAPES.values(), ids=ODD_SHAPES.keys())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_odd_shapes(backend, shape, dtype, loss):
    n, width, k = shape["n"], shape["width"], shape["k"]
    student = torch.randn(n, k).to(dtype)
    teacher = torch.randn(n, width).to(dtype)
    for reduction in REDUCTIONS:
        check(student, teacher, random_index(k, width), make_mask("float", (n,)), loss, reduction, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_strided_inputs_3d(backend, loss):
    """A teacher that is a column slice of a wider tensor, a transposed student, 3-D [B,T,·] inputs."""
    wide = torch.randn(3, 11, 2 * 64)
    teacher = wide[..., 7 : 7 + 64]
    assert not teacher.is_contiguous()
    student = torch.randn(3, 20, 11).transpose(1, 2)[..., :13]
    assert not student.is_contiguous()
    mask = torch.rand(3, 11) > 0.2
    for reduction in REDUCTIONS:
        check(student, teacher, random_index(13, 64), mask, loss, reduction, backend, teacher_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_column_strided_teacher(backend):
    teacher = torch.randn(30, 50).t()  # column stride != 1
    student = torch.randn(50, 7)
    check(student, teacher, random_index(7, 30), None, "mse", "mean", backend, teacher_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_rows(backend, loss, reduction):
    student = torch.randn(0, 5, requires_grad=True)
    value = flex_feature_loss(student, torch.randn(0, 9), random_index(5, 9), loss=loss, reduction=reduction, backend=backend)
    expected = reference.flex_feature_loss(student, torch.randn(0, 9), random_index(5, 9), loss=loss, reduction=reduction)
    assert value.shape == expected.shape
    assert (value == 0).all()
    value.sum().backward()
    assert student.grad.shape == (0, 5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_all_masked_is_zero_without_nan(backend, loss, reduction, mask_dtype):
    student = torch.randn(6, 4, 3, requires_grad=True)
    teacher = torch.randn(6, 4, 10, requires_grad=True)
    mask = torch.zeros(6, 4, dtype=mask_dtype)
    value = flex_feature_loss(student, teacher, random_index(3, 10), mask, loss=loss, reduction=reduction, backend=backend)
    assert (value == 0).all()
    value.sum().backward()
    assert (student.grad == 0).all() and (teacher.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_corr_with_one_weighted_row_is_zero(backend):
    student = torch.randn(5, 3, requires_grad=True)
    mask = torch.tensor([0.0, 2.0, 0.0, 0.0, 0.0])
    value = flex_feature_loss(student, torch.randn(5, 8), random_index(3, 8), mask, loss="corr", backend=backend)
    value.backward()
    assert value == 0 and (student.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_output_dtypes(backend, dtype):
    student = torch.randn(4, 3).to(dtype).requires_grad_()
    teacher = torch.randn(4, 8, dtype=torch.float32)
    value = flex_feature_loss(student, teacher, random_index(3, 8), backend=backend)
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    value.backward()
    assert student.grad.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_without_grad_gets_none(backend):
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(4, 8)
    flex_feature_loss(student, teacher, random_index(3, 8), backend=backend).backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_grad_lands_in_selected_columns(backend):
    student = torch.randn(7, 3, requires_grad=True)
    teacher = torch.randn(7, 10, requires_grad=True)
    index = torch.tensor([8, 1, 4])
    flex_feature_loss(student, teacher, index, backend=backend).backward()
    unselected = [j for j in range(10) if j not in index.tolist()]
    assert (teacher.grad[:, unselected] == 0).all()
    torch.testing.assert_close(teacher.grad[:, index], -student.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_mode_runs(backend):
    student = torch.randn(5, 3, requires_grad=True)
    with torch.no_grad():
        value = flex_feature_loss(student, torch.randn(5, 8), random_index(3, 8), backend=backend)
    assert not value.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_fp64(backend, loss, reduction):
    student = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(9, dtype=torch.float64)
    index = torch.tensor([5, 0, 3, 6])
    assert torch.autograd.gradcheck(
        lambda s, t: flex_feature_loss(s, t, index, mask, loss=loss, reduction=reduction, backend=backend),
        (student, teacher),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    student, teacher = torch.randn(4096, 96), torch.randn(4096, 256)
    index, mask = random_index(96, 256), torch.rand(4096)
    for loss in LOSSES:
        first = flex_feature_loss(student, teacher, index, mask, loss=loss, backend=backend)
        for _ in range(3):
            assert torch.equal(flex_feature_loss(student, teacher, index, mask, loss=loss, backend=backend), first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_closed_form_matches_autograd(backend):
    """The torch backend's closed-form gradient equals autograd of the plain formula (fp64)."""
    student = torch.randn(13, 5, dtype=torch.float64)
    teacher = torch.randn(13, 9, dtype=torch.float64)
    check(student, teacher, random_index(5, 9), make_mask("float", (13,)), "corr", "mean", backend, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice_and_weighted(backend):
    """The saved gradient serves a retained second backward and a weighted loss alike."""
    student = torch.randn(6, 4, requires_grad=True)
    teacher, index = torch.randn(6, 9), random_index(4, 9)
    value = flex_feature_loss(student, teacher, index, backend=backend)
    (first,) = torch.autograd.grad(value, student, retain_graph=True)
    (second,) = torch.autograd.grad(value, student, retain_graph=True)
    (weighted,) = torch.autograd.grad(0.25 * value, student)
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(weighted, 0.25 * first)
