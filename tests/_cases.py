"""Inputs shared by the op tests: backends to run, random tensors, masks of every kind."""

import os

import pytest
import torch

from flexkd import _native

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
MASK_KINDS = ["none", "float", "bool", "zeros"]


def cpu_backends() -> list:
    """Backends that run on CPU tensors. The C++ one must be built unless explicitly excused."""
    backends = ["torch"]
    if _native.load() is not None:
        backends.append("cpu")
    elif os.environ.get("FLEXKD_ALLOW_NO_NATIVE") != "1":
        backends.append(
            pytest.param("cpu", marks=pytest.mark.xfail(reason="flexkd._C not built", strict=True))
        )
    return backends


def make_mask(kind: str, shape, generator=None) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "float":
        return torch.rand(shape, generator=generator) * 2
    if kind == "bool":
        return torch.rand(shape, generator=generator) > 0.3
    if kind == "zeros":
        return torch.zeros(shape)
    raise ValueError(kind)


def random_index(k: int, width: int, dtype=torch.int64, generator=None) -> torch.Tensor:
    return torch.randperm(width, generator=generator)[:k].to(dtype)
