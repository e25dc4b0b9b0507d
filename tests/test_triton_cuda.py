"""The Triton backend on a GPU: parity with the torch reference for every dtype and odd shapes,
``torch.library.opcheck`` of both ops, and ``torch.compile(fullgraph=True)`` matching eager.

Marked ``cuda``: skipped on machines without a GPU (CI); ``benchmarks/gpu_check.sh`` runs them.
"""

import _gpu_parity
import pytest
import torch
from _cases import FLOAT_DTYPES, MASK_KINDS, random_index
from _gpu_parity import ODD_SHAPES

from flexkd.ops import LOSSES, REDUCTIONS, STATS, importance_scores

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _triton_kernels():
    pytest.importorskip("triton")
    import triton_env

    kernels = triton_env.import_kernels()
    if triton_env.kernels_interpreted():
        pytest.skip("TRITON_INTERPRET is set: the kernels are interpreted, not compiled")
    return kernels


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_feature_loss_parity(dtype, loss, reduction, mask_kind):
    _gpu_parity.check_column_slice_teacher_parity(dtype, loss, reduction, mask_kind, "triton")


@pytest.mark.parametrize("shape", ODD_SHAPES.values(), ids=ODD_SHAPES.keys())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_feature_loss_odd_shapes(shape, dtype, loss):
    _gpu_parity.check_odd_shape_parity(shape, dtype, loss, "triton")


def test_feature_loss_strided_student_and_int32_index():
    _gpu_parity.check_strided_3d_student_and_int32_index_parity("triton")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("stat", STATS)
@pytest.mark.parametrize("shape", [(1, 4099), (517, 1), (2, 65, 33), (8192, 300)], ids=str)
def test_importance_parity(dtype, stat, shape):
    _gpu_parity.check_importance_parity(dtype, stat, shape, "triton")


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
    _gpu_parity.opcheck_feature_loss(
        torch.ops.flexkd.feature_loss_fwd_triton.default, loss, reduction, k=6
    )


@pytest.mark.parametrize("stat", STATS)
def test_opcheck_importance(stat):
    _gpu_parity.opcheck_importance(torch.ops.flexkd.importance_scores_acc_triton.default, stat)


@pytest.mark.parametrize("loss", LOSSES)
def test_torch_compile_fullgraph_matches_eager(loss):
    _gpu_parity.check_compile_fullgraph_matches_eager(loss, "triton")
