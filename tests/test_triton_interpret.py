"""What is specific to the Triton launchers, on CPU tensors under ``TRITON_INTERPRET=1``: multi-program
merges, determinism, the registered ops, their argument checks, the tile heuristics.

The op suites themselves (``test_ops_feature_loss.py``, ``test_ops_importance.py``, ``test_ops_realistic.py``,
``test_ops_nonfinite.py``) run the Triton backend as one of their targets (``_targets.op_targets``).
``tests/conftest.py`` chooses the interpreter before anything imports triton on machines without a
GPU; with a GPU the kernels are JIT-compiled and these tests skip (the suites' ``triton-cuda`` target
covers them there).
"""

import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

import triton_env  # noqa: E402
from _cases import make_mask, random_index  # noqa: E402
from _tolerances import assert_grad_close, assert_loss_close  # noqa: E402

from flexkd.ops import flex_feature_loss, importance_scores, reference  # noqa: E402

triton_env.import_kernels()

from flexkd.kernels import feature_loss as triton_feature_loss  # noqa: E402
from flexkd.kernels import importance as triton_importance  # noqa: E402

pytestmark = pytest.mark.skipif(
    not triton_env.interpreter_usable(),
    reason="the Triton kernels are JIT-compiled here (a GPU is present, or TRITON_INTERPRET was set late)",
)


# ------------------------------------------------------------------- what the launchers add


def test_corr_merges_tiles_and_row_programs_stably():
    """Several row tiles per statistics program and several programs, columns far from zero: the
    pairwise merges of the moments must keep fp32 close to an fp64 reference."""
    n, k, width = triton_feature_loss._CORR_ROWS_PER_PROGRAM * 2 + 37, 130, 150
    rows_per_tile, _ = triton_feature_loss.tile_shape(
        n, k, triton_feature_loss._CORR_STATS_MAX_COLS
    )
    assert rows_per_tile < triton_feature_loss._CORR_ROWS_PER_PROGRAM
    base = torch.randn(n, k, dtype=torch.float64)
    student = (1000.0 + base + 0.3 * torch.randn(n, k, dtype=torch.float64)).float()
    index = random_index(k, width)
    teacher = torch.randn(n, width, dtype=torch.float64)
    teacher[:, index] = -500.0 + 2 * base + 0.5 * teacher[:, index]
    teacher = teacher.float()
    mask = make_mask("float", (n,))
    s = student.clone().requires_grad_()
    value = flex_feature_loss(
        s, teacher, index, mask, loss="corr", reduction="none", backend="triton"
    )
    upstream = torch.randn(k)
    (value * upstream).sum().backward()
    s64 = student.double().requires_grad_()
    expected = reference.flex_feature_loss(
        s64, teacher.double(), index, mask.double(), loss="corr", reduction="none"
    )
    (expected * upstream.double()).sum().backward()
    torch.testing.assert_close(value.double(), expected.detach(), rtol=0, atol=2e-4)
    grad_scale = s64.grad.abs().max().item()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-3, atol=1e-3 * grad_scale)


@pytest.mark.parametrize("loss", ["mse", "corr"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_feature_loss_is_bitwise_deterministic(loss, reduction):
    student, teacher = torch.randn(1500, 21), torch.randn(1500, 40)
    index, mask = random_index(21, 40), torch.rand(1500)

    def run():
        return torch.ops.flexkd.feature_loss_fwd_triton(
            student, teacher, index, mask, loss, reduction, 1e-8, True, True
        )

    first = run()
    for again in (run(), run()):
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("n", [5, 300, 2100], ids=["one-chunk", "chunks", "many-chunks"])
def test_importance_chunked_reduction(n):
    """One row chunk adds straight into ``out``; several go through the ordered second stage."""
    hidden, grad = torch.randn(n, 70), torch.randn(n, 70)
    mask = torch.rand(n)
    start = torch.randn(70)
    out = start.clone()
    returned = importance_scores(hidden, grad, mask, out=out, backend="triton")
    assert returned is out
    expected = start + reference.importance_scores(hidden, grad, mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    again = start.clone()
    importance_scores(hidden, grad, mask, out=again, backend="triton")
    assert torch.equal(out, again)


def test_importance_mixed_fp64_accumulates_in_fp64():
    hidden = torch.randn(64, 9, dtype=torch.float64) * 1e4
    grad = torch.randn(64, 9, dtype=torch.float16)
    actual = importance_scores(hidden, grad, backend="triton")
    torch.testing.assert_close(actual, reference.importance_scores(hidden, grad), rtol=1e-6, atol=0)


@pytest.mark.parametrize("student_dtype", [torch.bfloat16, torch.float16])
def test_mixed_dtypes_against_fp64_teacher(student_dtype):
    """An fp64 teacher makes fp64 the accumulation dtype; the student grad is stored as bf16/fp16."""
    student = torch.randn(23, 6).to(student_dtype)
    teacher = torch.randn(23, 15, dtype=torch.float64)
    index = random_index(6, 15)
    for loss in ("mse", "corr"):
        s = student.clone().requires_grad_()
        value = flex_feature_loss(s, teacher, index, loss=loss, backend="triton")
        value.backward()
        s_ref = student.clone().requires_grad_()
        expected = reference.flex_feature_loss(s_ref, teacher, index, loss=loss)
        expected.backward()
        assert value.dtype == torch.float64
        assert_loss_close(value, expected.detach(), torch.float64)
        assert_grad_close(s.grad, s_ref.grad, student_dtype)


def test_op_returns_empty_grads_when_not_asked():
    student, teacher, index = torch.randn(8, 3), torch.randn(8, 5), random_index(3, 5)
    for loss in ("mse", "corr"):
        value, grad_s, grad_t = torch.ops.flexkd.feature_loss_fwd_triton(
            student, teacher, index, None, loss, "sum", 1e-8, False, False
        )
        assert grad_s.shape == (0,) and grad_t.shape == (0,)
        expected = reference.feature_loss_fwd(
            student, teacher, index, None, loss, "sum", 1e-8, False, False
        )
        torch.testing.assert_close(value, expected[0])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s, t, i: (s, t, i, None, "l1", "mean"), "loss must be one of"),
        (lambda s, t, i: (s, t, i, None, "mse", "max"), "reduction must be one of"),
        (lambda s, t, i: (s, t, i.int(), None, "mse", "mean"), "index must be int64"),
        (lambda s, t, i: (s[:3], t, i, None, "mse", "mean"), "student and teacher must be"),
    ],
    ids=["loss", "reduction", "index-dtype", "rows"],
)
def test_op_rejects_bad_arguments(call, message):
    args = call(torch.randn(4, 2), torch.randn(4, 6), random_index(2, 6))
    with pytest.raises(ValueError, match=message):
        torch.ops.flexkd.feature_loss_fwd_triton(*args, 1e-8, True, False)


def test_importance_op_rejects_bad_arguments():
    hidden = torch.randn(4, 6)
    with pytest.raises(ValueError, match="stat must be one of"):
        torch.ops.flexkd.importance_scores_acc_triton(hidden, hidden, None, "act", torch.zeros(6))
    with pytest.raises(ValueError, match="out must be a contiguous fp32"):
        torch.ops.flexkd.importance_scores_acc_triton(
            hidden, hidden, None, "grad", torch.zeros(6, dtype=torch.float64)
        )


def test_opcheck_schema_fake_and_autograd_registration():
    """What opcheck can test without compiling (aot_dispatch traces into the kernels, which needs a GPU)."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    student = torch.randn(9, 3, requires_grad=True)
    teacher = torch.randn(9, 7, requires_grad=True)
    index, mask = random_index(3, 7), torch.rand(9)
    for loss, reduction in (("mse", "mean"), ("mse", "none"), ("corr", "sum"), ("corr", "none")):
        torch.library.opcheck(
            torch.ops.flexkd.feature_loss_fwd_triton.default,
            (student, teacher, index, mask, loss, reduction, 1e-8, True, True),
            test_utils=utils,
        )
    torch.library.opcheck(
        torch.ops.flexkd.importance_scores_acc_triton.default,
        (torch.randn(9, 7), torch.randn(9, 7), mask, "grad_x_act", torch.zeros(7)),
        test_utils=utils,
    )


def test_import_without_triton_raises_import_error():
    """An ImportError (not some other error) is what ``flexkd.ops`` reads as "backend unavailable"."""
    program = textwrap.dedent(
        f"""
        import sys
        sys.modules["triton"] = None  # what an environment without triton looks like to import
        sys.path[:0] = [{str(triton_env.REPO_ROOT / "tests")!r}, {str(triton_env.REPO_ROOT)!r}]
        import triton_env
        try:
            triton_env.import_kernels()
        except ImportError as err:
            assert "needs the 'triton' package" in str(err), err
        else:
            raise AssertionError("flexkd.kernels imported without triton")
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]


def test_tile_heuristic_bounds():
    import triton

    assert triton_importance._row_chunks(1, 10, 16, 256) == 1
    for n, k in [(1, 1), (7, 4099), (16384, 2048), (3, 1)]:
        rows, cols = triton_feature_loss.tile_shape(n, k)
        assert cols <= 1024 and rows * cols <= max(4096, cols)
        assert rows <= triton.next_power_of_2(n)
