"""importance_scores on every backend (``_targets.op_targets``) against the torch reference."""

import pytest
import torch
from _cases import FLOAT_DTYPES, MASK_KINDS, make_mask
from _targets import Target, op_targets, seeded
from hypothesis import given, settings
from hypothesis import strategies as st

from flexkd.ops import STATS, importance_scores, reference

TARGETS = op_targets()


def run(target: Target, hidden, grad, mask=None, **kwargs):
    """``importance_scores`` on ``target`` (inputs moved there), back on the CPU."""
    out = kwargs.pop("out", None)
    scores = importance_scores(
        target.put(hidden), target.put(grad), target.put(mask), out=out, backend=target.backend, **kwargs
    )
    return scores if out is not None else Target.back(scores)
RTOL = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def assert_scores_close(actual, expected, dtype):
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=RTOL[dtype], atol=RTOL[dtype] * scale + 1e-30)


@pytest.mark.parametrize("target", TARGETS)
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 90),
    width=st.integers(1, 300),
    leading_3d=st.booleans(),
    dtype=st.sampled_from(FLOAT_DTYPES),
    stat=st.sampled_from(STATS),
    mask_kind=st.sampled_from(MASK_KINDS),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_reference_random(target, n, width, leading_3d, dtype, stat, mask_kind, seed):
    g = seeded(seed)
    leading = (3, n) if leading_3d else (n,)
    hidden = torch.randn(*leading, width, generator=g).to(dtype)
    grad = torch.randn(*leading, width, generator=g).to(dtype)
    mask = make_mask(mask_kind, leading, g)
    actual = run(target, hidden, grad, mask, stat=stat)
    assert_scores_close(actual, reference.importance_scores(hidden, grad, mask, stat), dtype)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shape", [(1, 4099), (517, 1), (2, 65, 33), (4096, 48)], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_odd_shapes(target, shape, dtype):
    hidden, grad = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    mask = torch.rand(shape[:-1]) > 0.5
    for stat in STATS:
        actual = run(target, hidden, grad, mask, stat=stat)
        assert_scores_close(actual, reference.importance_scores(hidden, grad, mask, stat), dtype)


@pytest.mark.parametrize("target", TARGETS)
def test_strided_and_mixed_dtypes(target):
    hidden = torch.randn(5, 40, 2 * 24)[..., 24:]
    grad = torch.randn(5, 24, 40).transpose(1, 2).to(torch.bfloat16)
    actual = run(target, hidden, grad)
    torch.testing.assert_close(actual, reference.importance_scores(hidden, grad), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", TARGETS)
def test_out_accumulates_in_place(target):
    buffer = target.put(torch.zeros(16))
    batches = [(torch.randn(7, 16), torch.randn(7, 16)) for _ in range(3)]
    for hidden, grad in batches:
        returned = run(target, hidden, grad, out=buffer)
        assert returned is buffer
    expected = sum(reference.importance_scores(h, g) for h, g in batches)
    torch.testing.assert_close(Target.back(buffer), expected)


@pytest.mark.parametrize("target", TARGETS)
def test_all_masked_and_zero_rows(target):
    assert (run(target, torch.randn(4, 8), torch.randn(4, 8), torch.zeros(4)) == 0).all()
    assert (run(target, torch.randn(0, 8), torch.randn(0, 8)) == 0).all()


@pytest.mark.parametrize("target", TARGETS)
def test_does_not_track_gradients(target):
    hidden = target.put(torch.randn(3, 5)).requires_grad_()
    scores = importance_scores(hidden, target.put(torch.randn(3, 5)), backend=target.backend)
    assert not scores.requires_grad


@pytest.mark.parametrize("target", TARGETS)
def test_deterministic(target):
    hidden, grad, mask = torch.randn(20000, 64), torch.randn(20000, 64), torch.rand(20000)
    first = run(target, hidden, grad, mask)
    for _ in range(3):
        assert torch.equal(run(target, hidden, grad, mask), first)
