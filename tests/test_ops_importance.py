"""importance_scores on every CPU backend against the torch reference."""

import pytest
import torch
from _cases import FLOAT_DTYPES, MASK_KINDS, cpu_backends, make_mask
from hypothesis import given, settings
from hypothesis import strategies as st

from flexkd.ops import STATS, importance_scores, reference

BACKENDS = cpu_backends()
RTOL = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def assert_scores_close(actual, expected, dtype):
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=RTOL[dtype], atol=RTOL[dtype] * scale + 1e-30)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 90),
    width=st.integers(1, 300),
    leading_3d=st.booleans(),
    dtype=st.sampled_from(FLOAT_DTYPES),
    stat=st.sampled_from(STATS),
    mask_kind=st.sampled_from(MASK_KINDS),
)
def test_matches_reference_random(backend, n, width, leading_3d, dtype, stat, mask_kind):
    leading = (3, n) if leading_3d else (n,)
    hidden = torch.randn(*leading, width).to(dtype)
    grad = torch.randn(*leading, width).to(dtype)
    mask = make_mask(mask_kind, leading)
    actual = importance_scores(hidden, grad, mask, stat=stat, backend=backend)
    assert_scores_close(actual, reference.importance_scores(hidden, grad, mask, stat), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 4099), (517, 1), (2, 65, 33), (4096, 48)], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_odd_shapes(backend, shape, dtype):
    hidden, grad = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    mask = torch.rand(shape[:-1]) > 0.5
    for stat in STATS:
        actual = importance_scores(hidden, grad, mask, stat=stat, backend=backend)
        assert_scores_close(actual, reference.importance_scores(hidden, grad, mask, stat), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_mixed_dtypes(backend):
    hidden = torch.randn(5, 40, 2 * 24)[..., 24:]
    grad = torch.randn(5, 24, 40).transpose(1, 2).to(torch.bfloat16)
    actual = importance_scores(hidden, grad, backend=backend)
    torch.testing.assert_close(actual, reference.importance_scores(hidden, grad), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_accumulates_in_place(backend):
    buffer = torch.zeros(16)
    batches = [(torch.randn(7, 16), torch.randn(7, 16)) for _ in range(3)]
    for hidden, grad in batches:
        returned = importance_scores(hidden, grad, out=buffer, backend=backend)
        assert returned is buffer
    expected = sum(reference.importance_scores(h, g) for h, g in batches)
    torch.testing.assert_close(buffer, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_and_zero_rows(backend):
    assert (importance_scores(torch.randn(4, 8), torch.randn(4, 8), torch.zeros(4), backend=backend) == 0).all()
    assert (importance_scores(torch.randn(0, 8), torch.randn(0, 8), backend=backend) == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_does_not_track_gradients(backend):
    hidden = torch.randn(3, 5, requires_grad=True)
    scores = importance_scores(hidden, torch.randn(3, 5), backend=backend)
    assert not scores.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    hidden, grad, mask = torch.randn(20000, 64), torch.randn(20000, 64), torch.rand(20000)
    first = importance_scores(hidden, grad, mask, backend=backend)
    for _ in range(3):
        assert torch.equal(importance_scores(hidden, grad, mask, backend=backend), first)
