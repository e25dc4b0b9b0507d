"""The CPU feature loss's gradient outputs of 1 MiB and more reuse the memory of freed ones
(``csrc/cpu/gradient_buffers.h``), so a training step's gradient is not fresh pages every call."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from flexkd import _native
from flexkd.ops import flex_feature_loss

pytestmark = pytest.mark.skipif(_native.load() is None, reason="flexkd._C is not built")

N, D, K = 1024, 512, 256  # an fp32 [N, K] gradient of exactly 1 MiB


def _inputs(dtype=torch.float32, teacher_grad=False):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(N, K, generator=generator, dtype=dtype).requires_grad_()
    teacher = torch.randn(N, D, generator=generator, dtype=dtype).requires_grad_(teacher_grad)
    index = torch.randperm(D, generator=generator)[:K]
    mask = (torch.rand(N, generator=generator) > 0.2).float()
    return student, teacher, index, mask


@pytest.mark.parametrize("teacher_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss", ["mse", "corr"])
def test_a_freed_gradient_is_reused_and_overwritten_whole(dtype, loss, teacher_grad):
    """Reused blocks poisoned with NaN between calls: every element is written again. With a teacher
    gradient its [N, k] columns (freed inside backward) share the cache with the student's."""
    student, teacher, index, mask = _inputs(dtype, teacher_grad)
    if dtype == torch.bfloat16:  # the same 1 MiB in 16 bits
        student, teacher = (x.detach().repeat(2, 1).requires_grad_(x.requires_grad) for x in (student, teacher))
        mask = mask.repeat(2)
    inputs = (student, teacher) if teacher_grad else (student,)
    want = torch.autograd.grad(flex_feature_loss(student, teacher, index, mask, loss=loss, backend="torch"), inputs)
    tolerance = dict(rtol=2e-2, atol=1e-6) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-9)
    seen = []
    for _ in range(3):
        got = torch.autograd.grad(flex_feature_loss(student, teacher, index, mask, loss=loss, backend="cpu"), inputs)
        seen.append(got[0].data_ptr())
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, **tolerance)
            g.fill_(float("nan"))  # what a stale block would leak into the next call
        del got, g  # the last one too
    assert len(set(seen)) == 1


def test_a_gradient_in_use_is_never_handed_out_again():
    student, teacher, index, mask = _inputs()
    grads = [
        torch.autograd.grad(flex_feature_loss(student, teacher, index, mask, backend="cpu"), student)[0]
        for _ in range(4)
    ]
    assert len({g.data_ptr() for g in grads}) == 4
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=0, atol=0)


def test_a_leaf_accumulates_into_its_reused_gradient():
    student, teacher, index, mask = _inputs()
    (once,) = torch.autograd.grad(flex_feature_loss(student, teacher, index, mask, backend="cpu"), student)
    once = once.clone()
    for _ in range(3):
        student.grad = None
        flex_feature_loss(student, teacher, index, mask, backend="cpu").backward()
        flex_feature_loss(student, teacher, index, mask, backend="cpu").backward()
        torch.testing.assert_close(student.grad, 2 * once)


def _run_with_cache_mib(value: str) -> subprocess.CompletedProcess:
    code = (
        "import torch; from flexkd.ops import flex_feature_loss\n"
        f"s = torch.randn({N}, {K}, requires_grad=True); t = torch.randn({N}, {D})\n"
        f"flex_feature_loss(s, t, torch.arange({K}), backend='cpu').backward()\n"
        "print(float(s.grad.abs().sum()) > 0)\n"
    )
    env = dict(os.environ, FLEXKD_CPU_GRAD_CACHE_MIB=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_the_cache_can_be_turned_off_and_a_bad_size_is_refused_by_name():
    off = _run_with_cache_mib("0")
    assert off.returncode == 0 and off.stdout.strip() == "True", off.stderr
    bad = _run_with_cache_mib("lots")
    assert bad.returncode != 0
    assert "ValueError" in bad.stderr and "FLEXKD_CPU_GRAD_CACHE_MIB" in bad.stderr


def _child_step(queue):
    # One thread, as DataLoader workers run: after fork, torch's own ops hang here at the parent's thread
    # count (its OpenMP pool does not survive fork), with or without flexkd.
    torch.set_num_threads(1)
    student, teacher, index, mask = _inputs()
    (grad,) = torch.autograd.grad(flex_feature_loss(student, teacher, index, mask, backend="cpu"), student)
    queue.put(float(grad.abs().sum()))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_uses_the_cache_it_inherited():
    import multiprocessing

    student, teacher, index, mask = _inputs()
    (grad,) = torch.autograd.grad(flex_feature_loss(student, teacher, index, mask, backend="cpu"), student)
    want = float(grad.abs().sum())
    del grad  # its block is in the cache when the child is forked
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_step, args=(queue,))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == pytest.approx(want, rel=1e-6)
