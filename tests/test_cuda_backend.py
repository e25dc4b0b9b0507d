"""The CUDA backend (``csrc/cuda``) on a GPU: parity with the torch reference for every dtype, mixed
student/teacher dtypes, odd shapes, strided inputs, masks, both losses and all reductions; both the
vectorised and the scalar kernel paths; several column tiles; determinism; fp64 gradcheck;
``torch.library.opcheck``; ``torch.compile(fullgraph=True)``; and agreement with the Triton backend.

Marked ``cuda``: skipped on machines without a GPU (CI); ``benchmarks/gpu_check.sh`` runs them.
"""

import _gpu_parity
import pytest
import torch
from _cases import FLOAT_DTYPES, MASK_KINDS, make_mask, random_index
from _gpu_parity import check_parity, loss_and_grads
from _tolerances import GRAD_RTOL, assert_close

from flexkd import _native
from flexkd.ops import LOSSES, REDUCTIONS, STATS, flex_feature_loss, importance_scores, reference

pytestmark = pytest.mark.cuda

ODD_SHAPES = {**_gpu_parity.ODD_SHAPES, "two-column-tiles": ((5,), 9000, 4104)}


@pytest.fixture(autouse=True)
def _cuda_kernels():
    if _native.load() is None or not _native.has_cuda_kernels():
        pytest.fail(f"flexkd._C has no CUDA kernels (build info: {_native.build_info()})")


def _on_gpu(student, teacher, index, mask, loss, reduction, backend="cuda"):
    cuda = [x if x is None else x.cuda() for x in (index, mask)]
    return loss_and_grads(
        lambda s, t: flex_feature_loss(
            s, t, cuda[0], cuda[1], loss=loss, reduction=reduction, backend=backend
        ),
        student.cuda(),
        teacher.cuda(),
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_feature_loss_parity(dtype, loss, reduction, mask_kind):
    _gpu_parity.check_column_slice_teacher_parity(dtype, loss, reduction, mask_kind, "cuda")


@pytest.mark.parametrize("shape", ODD_SHAPES.values(), ids=ODD_SHAPES.keys())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_feature_loss_odd_shapes(shape, dtype, loss):
    _gpu_parity.check_odd_shape_parity(shape, dtype, loss, "cuda")


@pytest.mark.parametrize(
    "student_dtype,teacher_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16),
        (torch.bfloat16, torch.float64),
        (torch.float64, torch.float16),
    ],
    ids=str,
)
@pytest.mark.parametrize("loss", LOSSES)
def test_feature_loss_mixed_dtypes(student_dtype, teacher_dtype, loss):
    n, width, k = 257, 96, 40
    student = torch.randn(n, k).to(student_dtype)
    teacher = torch.randn(n, width).to(teacher_dtype)
    for reduction in REDUCTIONS:
        check_parity(
            student,
            teacher,
            random_index(k, width),
            make_mask("float", (n,)),
            loss,
            reduction,
            "cuda",
        )


@pytest.mark.parametrize("loss", LOSSES)
def test_feature_loss_strided_inputs_take_the_scalar_path(loss):
    # A transposed student (column stride != 1) and a misaligned one (storage offset 1), each with a
    # teacher that is a column slice of a wider, transposed tensor: no kernel may copy them.
    def transposed(x):
        return x.t().contiguous().cuda().t()

    def offset_by_one(x):
        wide = torch.empty(x.shape[0], x.shape[1] + 1, dtype=x.dtype, device="cuda")
        wide[:, 1:] = x.cuda()
        return wide[:, 1:]

    for on_device in (transposed, offset_by_one):
        student = torch.randn(70, 24, dtype=torch.bfloat16)
        teacher = torch.randn(70, 90, dtype=torch.bfloat16)
        for reduction in REDUCTIONS:
            check_parity(
                student,
                teacher,
                random_index(24, 90),
                torch.rand(70) > 0.2,
                loss,
                reduction,
                "cuda",
                on_device=on_device,
            )


def test_feature_loss_int32_index_and_3d_strided_student():
    _gpu_parity.check_strided_3d_student_and_int32_index_parity("cuda")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_feature_loss_zero_rows(loss, reduction):
    student = torch.randn(0, 5, device="cuda", requires_grad=True)
    teacher = torch.randn(0, 9, device="cuda")
    value = flex_feature_loss(
        student, teacher, random_index(5, 9).cuda(), loss=loss, reduction=reduction, backend="cuda"
    )
    expected = reference.flex_feature_loss(
        student.detach().cpu(), teacher.cpu(), random_index(5, 9), loss=loss, reduction=reduction
    )
    assert value.shape == expected.shape and not value.abs().sum()
    value.sum().backward()
    assert student.grad.shape == (0, 5)


def test_feature_loss_fp64_gradcheck():
    student = torch.randn(12, 5, device="cuda", dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(12, 9, device="cuda", dtype=torch.float64, requires_grad=True)
    index, mask = random_index(5, 9).cuda(), torch.rand(12, device="cuda", dtype=torch.float64)
    for loss in LOSSES:
        for reduction in REDUCTIONS:
            torch.autograd.gradcheck(
                lambda s, t, loss=loss, reduction=reduction: flex_feature_loss(
                    s, t, index, mask, loss=loss, reduction=reduction, backend="cuda"
                ),
                (student, teacher),
            )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("stat", STATS)
@pytest.mark.parametrize(
    "shape", [(1, 4099), (517, 1), (2, 65, 33), (8192, 304), (3, 4096)], ids=str
)
def test_importance_parity(dtype, stat, shape):
    _gpu_parity.check_importance_parity(dtype, stat, shape, "cuda")


def test_importance_mixed_dtypes_strided_and_unmasked():
    hidden = torch.randn(600, 130, dtype=torch.bfloat16)
    grad = torch.randn(130, 600, dtype=torch.float32).t()  # column stride 600
    for mask in (None, torch.rand(600)):
        out = importance_scores(
            hidden.cuda(),
            grad.t().contiguous().cuda().t(),
            None if mask is None else mask.cuda(),
            backend="cuda",
        )
        expected = reference.importance_scores(hidden, grad, mask)
        torch.testing.assert_close(
            out.cpu(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item()
        )


def test_deterministic():
    student = torch.randn(8192, 256, device="cuda", dtype=torch.bfloat16)
    teacher = torch.randn(8192, 1024, device="cuda", dtype=torch.bfloat16)
    index, mask = random_index(256, 1024).cuda(), torch.rand(8192, device="cuda")
    for loss in LOSSES:
        for reduction in REDUCTIONS:
            first, again = (
                torch.ops.flexkd.feature_loss_fwd(
                    student, teacher, index, mask, loss, reduction, 1e-6, True, True
                )
                for _ in range(2)
            )
            assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    scores = [
        importance_scores(teacher, student.repeat(1, 4), mask, backend="cuda") for _ in range(2)
    ]
    assert torch.equal(*scores)


def test_bad_arguments_raise():
    s, t = torch.randn(4, 3, device="cuda"), torch.randn(4, 8, device="cuda")
    index = random_index(3, 8).cuda()
    op = torch.ops.flexkd.feature_loss_fwd
    with pytest.raises(TypeError, match="mask"):
        op(
            s,
            t,
            index,
            torch.ones(4, device="cuda", dtype=torch.float64),
            "mse",
            "mean",
            1e-6,
            True,
            False,
        )
    with pytest.raises(ValueError, match="reduction"):
        op(s, t, index, None, "mse", "avg", 1e-6, True, False)
    with pytest.raises(ValueError, match="index"):
        op(s, t, index[:2], None, "mse", "mean", 1e-6, True, False)
    with pytest.raises(ValueError, match="teacher"):
        op(s, t[:3], index, None, "mse", "mean", 1e-6, True, False)
    with pytest.raises(TypeError, match="out"):
        torch.ops.flexkd.importance_scores_acc(
            t, t, None, "grad", torch.zeros(8, device="cuda", dtype=torch.float64)
        )


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck_feature_loss(loss, reduction):
    _gpu_parity.opcheck_feature_loss(
        torch.ops.flexkd.feature_loss_fwd.default, loss, reduction, k=8
    )


@pytest.mark.parametrize("stat", STATS)
def test_opcheck_importance(stat):
    _gpu_parity.opcheck_importance(torch.ops.flexkd.importance_scores_acc.default, stat)


@pytest.mark.parametrize("loss", LOSSES)
def test_torch_compile_fullgraph_matches_eager(loss):
    _gpu_parity.check_compile_fullgraph_matches_eager(loss, "cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_agrees_with_triton(dtype, loss):
    pytest.importorskip("triton")
    from flexkd.ops import _backends

    if _backends.unavailable_reason("triton", "cuda") is not None:
        pytest.skip(f"triton backend unavailable: {_backends.unavailable_reason('triton', 'cuda')}")
    n, width, k = 1000, 512, 136
    student = torch.randn(n, k).to(dtype)
    teacher = torch.randn(n, width).to(dtype)
    index, mask = random_index(k, width), torch.rand(n)
    for reduction in REDUCTIONS:
        ours, theirs = (
            _on_gpu(student, teacher, index, mask, loss, reduction, backend)
            for backend in ("cuda", "triton")
        )
        for a, b, what in zip(
            ours, theirs, ("loss", "student grad", "teacher grad", "upstream"), strict=True
        ):
            assert_close(
                a, b, GRAD_RTOL[dtype] if what != "loss" else 1e-4, f"cuda vs triton {what}"
            )
    hidden, grad = (
        torch.randn(n, width, device="cuda", dtype=dtype),
        torch.randn(n, width, device="cuda", dtype=dtype),
    )
    cuda_mask = mask.cuda()
    ours, theirs = (
        importance_scores(hidden, grad, cuda_mask, backend=b) for b in ("cuda", "triton")
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
