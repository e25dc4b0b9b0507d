"""The backends the op suites run on, each with the device its tensors live on.

Every op test module parametrises over :func:`op_targets`: ``torch`` and ``cpu`` on CPU tensors, the
Triton kernels under the interpreter on CPU tensors (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``
on machines without a GPU, before anything imports triton), and ``cuda`` and ``triton`` on CUDA
tensors, marked ``cuda`` (skipped without a GPU). A test moves its inputs with :meth:`Target.put` and
compares on the CPU with :meth:`Target.back`.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from flexkd import _native


@dataclasses.dataclass(frozen=True)
class Target:
    backend: str  # the ``backend=`` argument
    device: str  # where the inputs live

    @property
    def id(self) -> str:
        if self.backend == "triton":
            return "triton-cuda" if self.device == "cuda" else "triton-interpret"
        return self.backend

    def put(self, x):
        """``x`` (a tensor or None) on this target's device, keeping its strides where it can."""
        if x is None or self.device == "cpu":
            return x
        if x.is_contiguous():
            return x.to(self.device)
        # A strided view stays a strided view of the same shape: copy its whole storage.
        storage = torch.empty_strided((x.untyped_storage().nbytes() // x.element_size(),), (1,), dtype=x.dtype)
        storage.copy_(torch.as_strided(x, storage.shape, (1,), 0))
        return torch.as_strided(storage.to(self.device), x.shape, x.stride(), x.storage_offset())

    @staticmethod
    def back(x):
        return None if x is None else x.detach().cpu()


def _triton_interpreter_reason() -> str | None:
    """None when the Triton kernels run under the interpreter in this process, else why not."""
    try:
        import triton_env

        triton_env.import_kernels()
    except ImportError as err:
        return f"triton is not importable: {err}"
    if torch.cuda.is_available():
        return "a GPU is present: the Triton kernels are compiled and run as triton-cuda"
    if not triton_env.interpreter_usable():
        return "triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it)"
    return None


def op_targets() -> list:
    """``pytest.param`` of every :class:`Target`, with the marks that skip or expect what cannot run."""
    params = [pytest.param(Target("torch", "cpu"), id="torch")]
    cpu = Target("cpu", "cpu")
    if _native.load() is not None:
        params.append(pytest.param(cpu, id=cpu.id))
    elif os.environ.get("FLEXKD_ALLOW_NO_NATIVE") != "1":
        params.append(pytest.param(cpu, id=cpu.id, marks=pytest.mark.xfail(reason="flexkd._C not built", strict=True)))
    interpreter = Target("triton", "cpu")
    reason = _triton_interpreter_reason()
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    params.append(pytest.param(interpreter, id=interpreter.id, marks=marks))
    for target in (Target("cuda", "cuda"), Target("triton", "cuda")):
        params.append(pytest.param(target, id=target.id, marks=pytest.mark.cuda))
    return params


def seeded(seed: int) -> torch.Generator:
    """A CPU generator for tensors a hypothesis example draws: the seed is drawn too, so it replays."""
    return torch.Generator().manual_seed(seed)
