"""The Triton backend on a GPU: parity with the torch reference for every dtype and odd shapes,
``torch.library.opcheck`` of both ops, and ``torch.compile(fullgraph=True)`` matching eager.

Marked ``cuda``: skipped on machines without a GPU (CI); ``benchmarks/gpu_check.sh`` runs them.
"""

import pytest
import torch
from _cases import FLOAT_DTYPES, MASK_KINDS, make_mask, random_index
from _tolerances import GRAD_RTOL, assert_close, assert_grad_close, assert_loss_close
from test_ops_feature_loss import corr_scales

from flexkd.ops import LOSSES, REDUCTIONS, STATS, flex_feature_loss, importance_scores, reference

pytestmark = pytest.mark.cuda

ODD_SHAPES = {
    "k=1": ((33,), 17, 1),
    "k=D": ((19,), 24, 24),
    "N=1": ((1,), 40, 9),
    "D=4099": ((3,), 4099, 1537),
    "3-D": ((2, 7), 50, 13),
    "many-rows": ((2500,), 300, 96),
}


@pytest.fixture(autouse=True)
def _triton_kernels():
    pytest.importorskip("triton")
    import triton_env

    kernels = triton_env.import_kernels()
    if triton_env.kernels_interpreted():
        pytest.skip("TRITON_INTERPRET is set: the kernels are interpreted, not compiled")
    return kernels


def _loss_and_grads(fn, student, teacher, upstream_seed):
    s = student.detach().clone().requires_grad_(True)
    t = teacher.detach().clone().requires_grad_(True)
    value = fn(s, t)
    generator = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.randn(value.shape, generator=generator, dtype=value.dtype).to(value.device)
    (value * upstream).sum().backward()
    return value.detach().cpu(), s.grad.cpu(), t.grad.cpu(), upstream.cpu()


def check_parity(student, teacher, index, mask, loss, reduction):
    """Triton on the GPU against the reference on CPU copies: loss, student and teacher gradients."""
    cuda = [x if x is None else x.cuda() for x in (student, teacher, index, mask)]
    triton_value, triton_gs, triton_gt, upstream = _loss_and_grads(
        lambda s, t: flex_feature_loss(
            s, t, cuda[2], cuda[3], loss=loss, reduction=reduction, backend="triton"
        ),
        cuda[0],
        cuda[1],
        upstream_seed=1,
    )
    ref_value, ref_gs, ref_gt, _ = _loss_and_grads(
        lambda s, t: reference.flex_feature_loss(s, t, index, mask, loss=loss, reduction=reduction),
        student,
        teacher,
        upstream_seed=1,
    )
    loss_scale = grad_scale = None
    if loss == "corr":
        loss_scale, grad_scale = corr_scales(student, teacher, index, mask, reduction, upstream)
    assert_loss_close(triton_value, ref_value, student.dtype, "loss", loss_scale)
    assert_grad_close(triton_gs, ref_gs, student.dtype, "student grad", grad_scale)
    assert_grad_close(triton_gt, ref_gt, teacher.dtype, "teacher grad", grad_scale)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_feature_loss_parity(dtype, loss, reduction, mask_kind):
    n, width, k = 300, 200, 64
    student = torch.randn(n, k).to(dtype)
    teacher = (torch.randn(n, width + 16) * 3 + 0.5).to(dtype)[:, 8 : 8 + width]
    index = random_index(k, width)
    check_parity(student, teacher, index, make_mask(mask_kind, (n,)), loss, reduction)


@pytest.mark.parametrize("shape", ODD_SHAPES.values(), ids=ODD_SHAPES.keys())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_feature_loss_odd_shapes(shape, dtype, loss):
    leading, width, k = shape
    student = torch.randn(*leading, k).to(dtype)
    teacher = torch.randn(*leading, width).to(dtype)
    for reduction in REDUCTIONS:
        check_parity(
            student, teacher, random_index(k, width), make_mask("float", leading), loss, reduction
        )


def test_feature_loss_strided_student_and_int32_index():
    student = torch.randn(3, 20, 11).transpose(1, 2)[..., :13]
    teacher = torch.randn(3, 11, 128)[..., 7 : 7 + 64]
    index = random_index(13, 64, torch.int32)
    for loss in LOSSES:
        check_parity(student, teacher, index, torch.rand(3, 11) > 0.2, loss, "mean")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("stat", STATS)
@pytest.mark.parametrize("shape", [(1, 4099), (517, 1), (2, 65, 33), (8192, 300)], ids=str)
def test_importance_parity(dtype, stat, shape):
    hidden, grad = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    mask = torch.rand(shape[:-1])
    start = torch.randn(shape[-1])
    out = start.clone().cuda()
    importance_scores(hidden.cuda(), grad.cuda(), mask.cuda(), stat=stat, out=out, backend="triton")
    expected = start + reference.importance_scores(hidden, grad, mask, stat)
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5 * scale)


def test_deterministic_on_gpu():
    student = torch.randn(8192, 256, device="cuda", dtype=torch.bfloat16)
    teacher = torch.randn(8192, 1024, device="cuda", dtype=torch.bfloat16)
    index, mask = random_index(256, 1024).cuda(), torch.rand(8192, device="cuda")
    for loss in LOSSES:
        first = torch.ops.flexkd.feature_loss_fwd_triton(
            student, teacher, index, mask, loss, "mean", 1e-6, True, True
        )
        again = torch.ops.flexkd.feature_loss_fwd_triton(
            student, teacher, index, mask, loss, "mean", 1e-6, True, True
        )
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    scores = [importance_scores(teacher, teacher, mask, backend="triton") for _ in range(2)]
    assert torch.equal(*scores)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck_feature_loss(loss, reduction):
    student = torch.randn(40, 6, device="cuda", requires_grad=True)
    teacher = torch.randn(40, 30, device="cuda", requires_grad=True)
    index, mask = random_index(6, 30).cuda(), torch.rand(40, device="cuda")
    for args in (
        (student, teacher, index, mask, loss, reduction, 1e-6, True, True),
        (student, teacher, index, None, loss, reduction, 1e-6, True, False),
    ):
        torch.library.opcheck(torch.ops.flexkd.feature_loss_fwd_triton.default, args)


@pytest.mark.parametrize("stat", STATS)
def test_opcheck_importance(stat):
    hidden, grad = torch.randn(50, 33, device="cuda"), torch.randn(50, 33, device="cuda")
    for mask in (None, torch.rand(50, device="cuda")):
        out = torch.zeros(33, device="cuda")
        torch.library.opcheck(
            torch.ops.flexkd.importance_scores_acc_triton.default, (hidden, grad, mask, stat, out)
        )


@pytest.mark.parametrize("loss", LOSSES)
def test_torch_compile_fullgraph_matches_eager(loss):
    def step(student, teacher, index, mask, scores):
        value = flex_feature_loss(student, teacher, index, mask, loss=loss, backend="triton")
        importance_scores(
            teacher.detach(), teacher.detach() * 0.5, mask, out=scores, backend="triton"
        )
        return value * 2

    compiled = torch.compile(step, fullgraph=True)
    teacher = torch.randn(4, 64, 96, device="cuda", dtype=torch.bfloat16)
    student = torch.randn(4, 64, 32, device="cuda", dtype=torch.bfloat16)
    index, mask = random_index(32, 96).cuda(), (torch.rand(4, 64, device="cuda") > 0.1)
    results = []
    for fn in (step, compiled):
        s = student.clone().requires_grad_(True)
        t = teacher.clone().requires_grad_(True)
        scores = torch.zeros(96, device="cuda")
        value = fn(s, t, index, mask, scores)
        value.backward()
        results.append((value.detach(), s.grad, t.grad, scores))
    for eager, traced in zip(*results, strict=True):
        rtol = GRAD_RTOL[eager.dtype] if eager.dtype == torch.bfloat16 else 1e-5
        assert_close(traced, eager, rtol, "compiled vs eager")
