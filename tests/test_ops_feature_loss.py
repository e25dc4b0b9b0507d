"""flex_feature_loss on every backend (``_targets.op_targets``) against the torch reference: forward and
gradients, odd shapes, strides, masks, dtypes, degenerate cases."""

import sys

import pytest
import torch
from _cases import FLOAT_DTYPES, MASK_KINDS, make_mask, random_index
from _feature_loss_checks import check
from _targets import Target, op_targets, seeded
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexkd.ops import LOSSES, REDUCTIONS, flex_feature_loss, reference

TARGETS = op_targets()


def run(target: Target, student, teacher, index, mask=None, **kwargs):
    """``flex_feature_loss`` on ``target`` with the inputs already on its device."""
    return flex_feature_loss(student, teacher, target.put(index), target.put(mask), backend=target.backend, **kwargs)


@pytest.mark.parametrize("target", TARGETS)
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
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_reference_random(
    target, n, width, k_fraction, leading_3d, dtype, loss, reduction, mask_kind, index_dtype, teacher_grad, seed
):
    g = seeded(seed)
    k = max(1, round(k_fraction * width))
    leading = (2, n) if leading_3d else (n,)
    student = torch.randn(*leading, k, generator=g).to(dtype)
    teacher = (torch.randn(*leading, width, generator=g) * 3 + 0.5).to(dtype)
    mask = make_mask(mask_kind, leading, g)
    index = random_index(k, width, index_dtype, g)
    check(student, teacher, index, mask, loss, reduction, target, teacher_grad)


ODD_SHAPES = {
    "k=1": dict(n=33, width=17, k=1),
    "k=D": dict(n=19, width=24, k=24),
    "N=1": dict(n=1, width=40, k=9),
    "D=4099": dict(n=3, width=4099, k=1537),
    "wide-k": dict(n=5, width=1200, k=1100),
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shape", ODD_SHAPES.values(), ids=ODD_SHAPES.keys())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_odd_shapes(target, shape, dtype, loss):
    n, width, k = shape["n"], shape["width"], shape["k"]
    student = torch.randn(n, k).to(dtype)
    teacher = torch.randn(n, width).to(dtype)
    for reduction in REDUCTIONS:
        check(student, teacher, random_index(k, width), make_mask("float", (n,)), loss, reduction, target)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("loss", LOSSES)
def test_strided_inputs_3d(target, loss):
    """A teacher that is a column slice of a wider tensor, a transposed student, 3-D [B,T,·] inputs."""
    wide = torch.randn(3, 11, 2 * 64)
    teacher = wide[..., 7 : 7 + 64]
    assert not teacher.is_contiguous()
    student = torch.randn(3, 20, 11).transpose(1, 2)[..., :13]
    assert not student.is_contiguous()
    mask = torch.rand(3, 11) > 0.2
    for reduction in REDUCTIONS:
        check(student, teacher, random_index(13, 64), mask, loss, reduction, target, teacher_grad=True)


@pytest.mark.parametrize("target", TARGETS)
def test_column_strided_teacher(target):
    teacher = torch.randn(30, 50).t()  # column stride != 1
    student = torch.randn(50, 7)
    for loss in LOSSES:
        check(student, teacher, random_index(7, 30), None, loss, "mean", target, teacher_grad=True)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_rows(target, loss, reduction):
    student = target.put(torch.randn(0, 5)).requires_grad_()
    value = run(target, student, target.put(torch.randn(0, 9)), random_index(5, 9), loss=loss, reduction=reduction)
    expected = reference.flex_feature_loss(
        torch.randn(0, 5), torch.randn(0, 9), random_index(5, 9), loss=loss, reduction=reduction
    )
    assert value.shape == expected.shape
    assert (value == 0).all()
    value.sum().backward()
    assert student.grad.shape == (0, 5)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_all_masked_is_zero_without_nan(target, loss, reduction, mask_dtype):
    student = target.put(torch.randn(6, 4, 3)).requires_grad_()
    teacher = target.put(torch.randn(6, 4, 10)).requires_grad_()
    mask = torch.zeros(6, 4, dtype=mask_dtype)
    value = run(target, student, teacher, random_index(3, 10), mask, loss=loss, reduction=reduction)
    assert (value == 0).all()
    value.sum().backward()
    assert (student.grad == 0).all() and (teacher.grad == 0).all()


@pytest.mark.parametrize("target", TARGETS)
def test_corr_with_one_weighted_row_is_zero(target):
    student = target.put(torch.randn(5, 3)).requires_grad_()
    mask = torch.tensor([0.0, 2.0, 0.0, 0.0, 0.0])
    value = run(target, student, target.put(torch.randn(5, 8)), random_index(3, 8), mask, loss="corr")
    value.backward()
    assert value == 0 and (student.grad == 0).all()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_output_dtypes(target, dtype):
    student = target.put(torch.randn(4, 3).to(dtype)).requires_grad_()
    teacher = target.put(torch.randn(4, 8, dtype=torch.float32))
    value = run(target, student, teacher, random_index(3, 8))
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    value.backward()
    assert student.grad.dtype == dtype


@pytest.mark.parametrize("target", TARGETS)
def test_teacher_without_grad_gets_none(target):
    student = target.put(torch.randn(4, 3)).requires_grad_()
    teacher = target.put(torch.randn(4, 8))
    run(target, student, teacher, random_index(3, 8)).backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize("target", TARGETS)
def test_teacher_grad_lands_in_selected_columns(target):
    student = target.put(torch.randn(7, 3)).requires_grad_()
    teacher = target.put(torch.randn(7, 10)).requires_grad_()
    index = torch.tensor([8, 1, 4])
    run(target, student, teacher, index).backward()
    unselected = [j for j in range(10) if j not in index.tolist()]
    index = target.put(index)
    assert (teacher.grad[:, unselected] == 0).all()
    torch.testing.assert_close(teacher.grad[:, index], -student.grad)


@pytest.mark.parametrize("target", TARGETS)
def test_no_grad_mode_runs(target):
    student = target.put(torch.randn(5, 3)).requires_grad_()
    with torch.no_grad():
        value = run(target, student, target.put(torch.randn(5, 8)), random_index(3, 8))
    assert not value.requires_grad


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_fp64(target, loss, reduction):
    student = target.put(torch.randn(9, 4, dtype=torch.float64)).requires_grad_()
    teacher = target.put(torch.randn(9, 7, dtype=torch.float64)).requires_grad_()
    mask = torch.rand(9, dtype=torch.float64)
    index = torch.tensor([5, 0, 3, 6])
    assert torch.autograd.gradcheck(
        lambda s, t: run(target, s, t, index, mask, loss=loss, reduction=reduction), (student, teacher)
    )


@pytest.mark.parametrize("target", TARGETS)
def test_deterministic(target):
    student, teacher = target.put(torch.randn(4096, 96)), target.put(torch.randn(4096, 256))
    index, mask = random_index(96, 256), torch.rand(4096)
    for loss in LOSSES:
        first = run(target, student, teacher, index, mask, loss=loss)
        for _ in range(3):
            assert torch.equal(run(target, student, teacher, index, mask, loss=loss), first)


@pytest.mark.parametrize("target", TARGETS)
def test_reference_closed_form_matches_autograd(target):
    """The torch backend's closed-form gradient equals autograd of the plain formula (fp64)."""
    student = torch.randn(13, 5, dtype=torch.float64)
    teacher = torch.randn(13, 9, dtype=torch.float64)
    check(student, teacher, random_index(5, 9), make_mask("float", (13,)), "corr", "mean", target, True)


@pytest.mark.parametrize("target", TARGETS)
def test_backward_twice_and_weighted(target):
    """The saved gradient serves a retained second backward and a weighted loss alike."""
    student = target.put(torch.randn(6, 4)).requires_grad_()
    teacher, index = target.put(torch.randn(6, 9)), random_index(4, 9)
    value = run(target, student, teacher, index)
    (first,) = torch.autograd.grad(value, student, retain_graph=True)
    (second,) = torch.autograd.grad(value, student, retain_graph=True)
    (weighted,) = torch.autograd.grad(0.25 * value, student)
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(weighted, 0.25 * first)


@pytest.mark.parametrize("target", TARGETS)
def test_leaf_grad_accumulates_over_steps(target):
    """``loss.backward()`` hands the saved gradient itself to a leaf's ``.grad`` (grad_output 1 on the CPU):
    the next steps must add into it, not into a buffer another step still holds."""
    student = target.put(torch.randn(6, 4)).requires_grad_()
    teacher, index = target.put(torch.randn(6, 9)), random_index(4, 9)
    (once,) = torch.autograd.grad(run(target, student, teacher, index), student)
    for _ in range(3):
        run(target, student, teacher, index).backward()
    torch.testing.assert_close(student.grad, 3 * once)
    held = run(target, student, teacher, index)
    student.grad = None
    held.backward(retain_graph=True)
    held.backward()
    torch.testing.assert_close(student.grad, 2 * once)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs mprotect")
@pytest.mark.parametrize("layout", ["contiguous", "column_slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", LOSSES)
def test_cpu_reads_nothing_past_the_teachers_last_element(dtype, loss, layout):
    """The CPU kernels read a sorted selection in whole 16-column blocks except on the last row, and
    prefetch rows ahead of a column slice: a teacher whose last element sits just before an inaccessible
    page must not fault, and must match the reference."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    area = mmap.mmap(-1, 3 * page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(area))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(base + 2 * page), page, 0) == 0  # PROT_NONE
    try:
        width = 40  # not a multiple of the 16-column block
        elements = 2 * page // dtype.itemsize
        stride = width if layout == "contiguous" else 2 * width
        rows = elements // stride
        flat = torch.frombuffer(area, dtype=dtype, count=elements)
        wide = flat[elements - rows * stride :].view(rows, stride)  # ends at the guard page
        teacher = wide[:, stride - width :]
        teacher.copy_(torch.randn(rows, width, generator=torch.Generator().manual_seed(0)))
        index = torch.tensor([1, 2, 17, 30, 37, width - 1])  # sorted; the last column included
        student = torch.randn(rows, index.numel(), dtype=dtype, requires_grad=True)
        got = flex_feature_loss(student, teacher, index, loss=loss, backend="cpu")
        (grad,) = torch.autograd.grad(got, student)
        ref_student = student.detach().clone().requires_grad_(True)
        want = reference.flex_feature_loss(ref_student, teacher.clone(), index, loss=loss)
        (want_grad,) = torch.autograd.grad(want, ref_student)
        tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(got, want.to(got.dtype), rtol=tol, atol=tol)
        torch.testing.assert_close(grad.float(), want_grad.float(), rtol=tol, atol=tol)
    finally:
        libc.mprotect(ctypes.c_void_p(base + 2 * page), page, mmap.PROT_READ | mmap.PROT_WRITE)
