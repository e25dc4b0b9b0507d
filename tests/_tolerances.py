"""The one place that states how close a backend must come to the torch reference, per dtype.

Losses are computed in fp32 (fp64) from the same inputs on every backend, so they differ only by
summation order. Gradients are rounded once to the student's dtype, so bf16/fp16 grads may differ
by about one unit in the last place; ``atol`` is relative to the largest reference magnitude.
"""

import torch

LOSS_RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def assert_close(actual, expected, rtol: float, what: str = "", scale: float | None = None) -> None:
    """``|actual - expected| <= rtol * (|expected| + scale)``; ``scale`` defaults to ``max|expected|``
    and should be the size of the terms that cancel where the result is a small difference."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    actual, expected = actual.double(), expected.double()
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale + 1e-30, msg=lambda m: f"{what}: {m}")


def assert_loss_close(actual, expected, dtype, what="loss", scale=None):
    assert_close(actual, expected, LOSS_RTOL[dtype], what, scale)


def assert_grad_close(actual, expected, dtype, what="grad", scale=None):
    assert_close(actual, expected, GRAD_RTOL[dtype], what, scale)


# Against an fp64 computation on the same (already rounded) inputs, on realistic values
# (test_ops_realistic.py): the backends accumulate in fp32, so the loss may differ by fp32 rounding
# growing with the row count (a few 1e-6 of the cancelling terms' size at 1e6 rows; 1e-4 leaves room
# for the data's condition); gradients are in addition rounded once to the input dtype.
FP64_LOSS_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-4, torch.float16: 1e-4}
FP64_GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 1e-3, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def assert_close_to_fp64(actual, expected, rtol: float, what: str = "", scale: float | None = None) -> None:
    """``actual`` (any float dtype) against an fp64 ``expected``, as :func:`assert_close` does."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    assert_close(actual.double(), expected.double(), rtol, what, scale)
