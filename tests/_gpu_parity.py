"""Checks shared by the GPU backend tests (``test_ops_gpu.py``): a
backend on the GPU against the torch reference on CPU copies, ``torch.library.opcheck`` of its
registered ops, and ``torch.compile(fullgraph=True)`` against eager. Each takes the backend (or
its ops) to check; the test modules keep their own parametrisation and ``cuda`` marker.
"""

import torch
from _cases import make_mask, random_index
from _feature_loss_checks import corr_scales
from _tolerances import GRAD_RTOL, assert_close, assert_grad_close, assert_loss_close

from flexkd.ops import LOSSES, REDUCTIONS, flex_feature_loss, importance_scores, reference

ODD_SHAPES = {
    "k=1": ((33,), 17, 1),
    "k=D": ((19,), 24, 24),
    "N=1": ((1,), 40, 9),
    "D=4099": ((3,), 4099, 1537),
    "3-D": ((2, 7), 50, 13),
    "many-rows": ((2500,), 300, 96),
}


def loss_and_grads(fn, student, teacher, upstream_seed=1):
    """``fn(student, teacher)``, its student and teacher grads for a seeded random upstream
    gradient, and that upstream gradient, all on CPU."""
    s = student.detach().clone().requires_grad_(True)
    t = teacher.detach().clone().requires_grad_(True)
    value = fn(s, t)
    generator = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.randn(value.shape, generator=generator, dtype=value.dtype).to(value.device)
    (value * upstream).sum().backward()
    return value.detach().cpu(), s.grad.cpu(), t.grad.cpu(), upstream.cpu()


def check_parity(
    student, teacher, index, mask, loss, reduction, backend, on_device=lambda x: x.cuda()
):
    """``backend`` on the GPU against the reference's autograd on CPU: loss, student and teacher
    grads.

    ``on_device`` moves student and teacher to the GPU; it may keep a strided layout there.
    """
    cuda_index = index.cuda()
    cuda_mask = None if mask is None else mask.cuda()
    value, gs, gt, upstream = loss_and_grads(
        lambda s, t: flex_feature_loss(
            s, t, cuda_index, cuda_mask, loss=loss, reduction=reduction, backend=backend
        ),
        on_device(student),
        on_device(teacher),
    )
    ref_value, ref_gs, ref_gt, _ = loss_and_grads(
        lambda s, t: reference.flex_feature_loss(s, t, index, mask, loss=loss, reduction=reduction),
        student,
        teacher,
    )
    loss_scale = grad_scale = None
    if loss == "corr":
        loss_scale, grad_scale = corr_scales(student, teacher, index, mask, reduction, upstream)
    assert_loss_close(value, ref_value, student.dtype, "loss", loss_scale)
    assert_grad_close(gs, ref_gs, student.dtype, "student grad", grad_scale)
    assert_grad_close(gt, ref_gt, teacher.dtype, "teacher grad", grad_scale)


def check_column_slice_teacher_parity(dtype, loss, reduction, mask_kind, backend):
    """A contiguous student against a teacher that is a column slice of a wider tensor."""
    n, width, k = 300, 200, 64  # k % 8 == 0 and a contiguous student: CUDA's vectorised path
    student = torch.randn(n, k).to(dtype)
    teacher = (torch.randn(n, width + 16) * 3 + 0.5).to(dtype)[:, 8 : 8 + width]
    index = random_index(k, width)
    check_parity(student, teacher, index, make_mask(mask_kind, (n,)), loss, reduction, backend)


def check_odd_shape_parity(shape, dtype, loss, backend):
    """``shape`` is ``(leading dims, teacher width, k)``, as in :data:`ODD_SHAPES`; every reduction."""
    leading, width, k = shape
    student = torch.randn(*leading, k).to(dtype)
    teacher = torch.randn(*leading, width).to(dtype)
    for reduction in REDUCTIONS:
        check_parity(
            student,
            teacher,
            random_index(k, width),
            make_mask("float", leading),
            loss,
            reduction,
            backend,
        )


def check_strided_3d_student_and_int32_index_parity(backend):
    student = torch.randn(3, 20, 11).transpose(1, 2)[..., :13]
    teacher = torch.randn(3, 11, 128)[..., 7 : 7 + 64]
    index = random_index(13, 64, torch.int32)
    for loss in LOSSES:
        check_parity(student, teacher, index, torch.rand(3, 11) > 0.2, loss, "mean", backend)


def check_importance_parity(dtype, stat, shape, backend):
    """Scores accumulated into a non-zero ``out`` on the GPU against the reference on CPU."""
    hidden, grad = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    mask = torch.rand(shape[:-1])
    start = torch.randn(shape[-1])
    out = start.cuda()
    importance_scores(hidden.cuda(), grad.cuda(), mask.cuda(), stat=stat, out=out, backend=backend)
    expected = start + reference.importance_scores(hidden, grad, mask, stat)
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5 * scale)


def opcheck_feature_loss(op, loss, reduction, k):
    """``torch.library.opcheck`` of a ``feature_loss_fwd`` op, with and without a mask."""
    student = torch.randn(40, k, device="cuda", requires_grad=True)
    teacher = torch.randn(40, 30, device="cuda", requires_grad=True)
    index, mask = random_index(k, 30).cuda(), torch.rand(40, device="cuda")
    for args in (
        (student, teacher, index, mask, loss, reduction, 1e-8, True, True),
        (student, teacher, index, None, loss, reduction, 1e-8, True, False),
    ):
        torch.library.opcheck(op, args)


def opcheck_importance(op, stat):
    """``torch.library.opcheck`` of an ``importance_scores_acc`` op, with and without a mask."""
    hidden, grad = torch.randn(50, 33, device="cuda"), torch.randn(50, 33, device="cuda")
    for mask in (None, torch.rand(50, device="cuda")):
        out = torch.zeros(33, device="cuda")
        torch.library.opcheck(op, (hidden, grad, mask, stat, out))


def check_compile_fullgraph_matches_eager(loss, backend):
    """A step calling both ops, compiled with ``fullgraph=True``, against the same step in eager."""

    def step(student, teacher, index, mask, scores):
        value = flex_feature_loss(student, teacher, index, mask, loss=loss, backend=backend)
        importance_scores(
            teacher.detach(), teacher.detach() * 0.5, mask, out=scores, backend=backend
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
