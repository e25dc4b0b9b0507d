"""The GPU backends, ``cuda`` (``csrc/cuda``) and ``triton`` (``kernels/``, JIT-compiled), on a GPU: what
the shared suites (``test_ops_*.py``, which run both as targets) do not cover. Parity with the torch
reference on CPU copies for every dtype, mask kind and odd shape (several column tiles included), mixed
student/teacher dtypes, the vectorised and the scalar kernel paths, zero rows, fp64 gradcheck,
determinism at size, bad arguments of the kernel-level ops, ``torch.library.opcheck``,
``torch.compile(fullgraph=True)``, and the two backends agreeing with each other.

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

GPU_BACKENDS = ["cuda", "triton"]
FEATURE_LOSS_OP = {"cuda": "feature_loss_fwd", "triton": "feature_loss_fwd_triton"}
IMPORTANCE_OP = {"cuda": "importance_scores_acc", "triton": "importance_scores_acc_triton"}
ODD_SHAPES = {**_gpu_parity.ODD_SHAPES, "two-column-tiles": ((5,), 9000, 4104)}


@pytest.fixture(autouse=True)
def _backend_available(request):
    backend = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    if backend in (None, "cuda") and (_native.load() is None or not _native.has_cuda_kernels()):
        pytest.fail(f"flexkd._C has no CUDA kernels (build info: {_native.build_info()})")
    if backend in (None, "triton"):
        pytest.importorskip("triton")
        import triton_env

        triton_env.import_kernels()
        if triton_env.kernels_interpreted():
            pytest.skip("TRITON_INTERPRET is set: the kernels are interpreted, not compiled")


def _op(table, backend):
    return getattr(torch.ops.flexkd, table[backend])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_feature_loss_parity(backend, dtype, loss, reduction, mask_kind):
    _gpu_parity.check_column_slice_teacher_parity(dtype, loss, reduction, mask_kind, backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", ODD_SHAPES.values(), ids=ODD_SHAPES.keys())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_feature_loss_odd_shapes(backend, shape, dtype, loss):
    _gpu_parity.check_odd_shape_parity(shape, dtype, loss, backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
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
def test_feature_loss_mixed_dtypes(backend, student_dtype, teacher_dtype, loss):
    n, width, k = 257, 96, 40
    student = torch.randn(n, k).to(student_dtype)
    teacher = torch.randn(n, width).to(teacher_dtype)
    for reduction in REDUCTIONS:
        check_parity(student, teacher, random_index(k, width), make_mask("float", (n,)), loss, reduction, backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_feature_loss_strided_inputs_take_the_scalar_path(backend, loss):
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
                student, teacher, random_index(24, 90), torch.rand(70) > 0.2, loss, reduction, backend,
                on_device=on_device,
            )


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_feature_loss_int32_index_and_3d_strided_student(backend):
    _gpu_parity.check_strided_3d_student_and_int32_index_parity(backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_feature_loss_zero_rows(backend, loss, reduction):
    student = torch.randn(0, 5, device="cuda", requires_grad=True)
    teacher = torch.randn(0, 9, device="cuda")
    value = flex_feature_loss(
        student, teacher, random_index(5, 9).cuda(), loss=loss, reduction=reduction, backend=backend
    )
    expected = reference.flex_feature_loss(
        student.detach().cpu(), teacher.cpu(), random_index(5, 9), loss=loss, reduction=reduction
    )
    assert value.shape == expected.shape and not value.abs().sum()
    value.sum().backward()
    assert student.grad.shape == (0, 5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_feature_loss_fp64_gradcheck(backend):
    student = torch.randn(12, 5, device="cuda", dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(12, 9, device="cuda", dtype=torch.float64, requires_grad=True)
    index, mask = random_index(5, 9).cuda(), torch.rand(12, device="cuda", dtype=torch.float64)
    for loss in LOSSES:
        for reduction in REDUCTIONS:
            torch.autograd.gradcheck(
                lambda s, t, loss=loss, reduction=reduction: flex_feature_loss(
                    s, t, index, mask, loss=loss, reduction=reduction, backend=backend
                ),
                (student, teacher),
            )


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("stat", STATS)
@pytest.mark.parametrize("shape", [(1, 4099), (517, 1), (2, 65, 33), (8192, 300), (8192, 304), (3, 4096)], ids=str)
def test_importance_parity(backend, dtype, stat, shape):
    _gpu_parity.check_importance_parity(dtype, stat, shape, backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_importance_mixed_dtypes_strided_and_unmasked(backend):
    hidden = torch.randn(600, 130, dtype=torch.bfloat16)
    grad = torch.randn(130, 600, dtype=torch.float32).t()  # column stride 600
    for mask in (None, torch.rand(600)):
        out = importance_scores(
            hidden.cuda(), grad.t().contiguous().cuda().t(), None if mask is None else mask.cuda(), backend=backend
        )
        expected = reference.importance_scores(hidden, grad, mask)
        torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_deterministic(backend):
    student = torch.randn(8192, 256, device="cuda", dtype=torch.bfloat16)
    teacher = torch.randn(8192, 1024, device="cuda", dtype=torch.bfloat16)
    index, mask = random_index(256, 1024).cuda(), torch.rand(8192, device="cuda")
    op = _op(FEATURE_LOSS_OP, backend)
    for loss in LOSSES:
        for reduction in REDUCTIONS:
            first, again = (op(student, teacher, index, mask, loss, reduction, 1e-8, True, True) for _ in range(2))
            assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    scores = [importance_scores(teacher, student.repeat(1, 4), mask, backend=backend) for _ in range(2)]
    assert torch.equal(*scores)


# Each kernel-level op checks its own arguments; the messages differ, the error types do not.
BAD_FEATURE_LOSS_ARGS = {
    "reduction": (lambda s, t, i: (s, t, i, None, "mse", "avg"), ValueError, "reduction"),
    "loss": (lambda s, t, i: (s, t, i, None, "l1", "mean"), ValueError, "loss"),
    "index-length": (lambda s, t, i: (s, t, i[:2], None, "mse", "mean"), ValueError, "index"),
    "rows": (lambda s, t, i: (s, t[:3], i, None, "mse", "mean"), ValueError, "teacher"),
}


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", BAD_FEATURE_LOSS_ARGS.values(), ids=BAD_FEATURE_LOSS_ARGS.keys())
def test_bad_arguments_raise(backend, case):
    call, error, message = case
    s, t = torch.randn(4, 3, device="cuda"), torch.randn(4, 8, device="cuda")
    with pytest.raises(error, match=message):
        _op(FEATURE_LOSS_OP, backend)(*call(s, t, random_index(3, 8).cuda()), 1e-8, True, False)
    with pytest.raises(ValueError, match="stat"):
        _op(IMPORTANCE_OP, backend)(t, t, None, "act", torch.zeros(8, device="cuda"))


def test_cuda_op_checks_dtypes():
    s, t = torch.randn(4, 3, device="cuda"), torch.randn(4, 8, device="cuda")
    index = random_index(3, 8).cuda()
    op = torch.ops.flexkd.feature_loss_fwd
    with pytest.raises(TypeError, match="mask"):
        op(s, t, index, torch.ones(4, device="cuda", dtype=torch.float64), "mse", "mean", 1e-8, True, False)
    with pytest.raises(TypeError, match="out"):
        torch.ops.flexkd.importance_scores_acc(t, t, None, "grad", torch.zeros(8, device="cuda", dtype=torch.float64))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck_feature_loss(backend, loss, reduction):
    _gpu_parity.opcheck_feature_loss(_op(FEATURE_LOSS_OP, backend).default, loss, reduction, k=8)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("stat", STATS)
def test_opcheck_importance(backend, stat):
    _gpu_parity.opcheck_importance(_op(IMPORTANCE_OP, backend).default, stat)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_torch_compile_fullgraph_matches_eager(backend, loss):
    _gpu_parity.check_compile_fullgraph_matches_eager(loss, backend)


def _on_gpu(student, teacher, index, mask, loss, reduction, backend):
    cuda_index, cuda_mask = index.cuda(), mask.cuda()
    return loss_and_grads(
        lambda s, t: flex_feature_loss(s, t, cuda_index, cuda_mask, loss=loss, reduction=reduction, backend=backend),
        student.cuda(),
        teacher.cuda(),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_cuda_agrees_with_triton(dtype, loss):
    pytest.importorskip("triton")
    from flexkd.ops import _backends

    if _backends.unavailable_reason("triton", "cuda") is not None:
        pytest.skip(f"triton backend unavailable: {_backends.unavailable_reason('triton', 'cuda')}")
    n, width, k = 1000, 512, 136
    student = torch.randn(n, k).to(dtype)
    teacher = torch.randn(n, width).to(dtype)
    index, mask = random_index(k, width), torch.rand(n)
    for reduction in REDUCTIONS:
        ours, theirs = (_on_gpu(student, teacher, index, mask, loss, reduction, b) for b in GPU_BACKENDS)
        for a, b, what in zip(ours, theirs, ("loss", "student grad", "teacher grad", "upstream"), strict=True):
            assert_close(a, b, GRAD_RTOL[dtype] if what != "loss" else 1e-4, f"cuda vs triton {what}")
    hidden = torch.randn(n, width, device="cuda", dtype=dtype)
    grad = torch.randn(n, width, device="cuda", dtype=dtype)
    cuda_mask = mask.cuda()
    ours, theirs = (importance_scores(hidden, grad, cuda_mask, backend=b) for b in GPU_BACKENDS)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
