"""Which backend runs an op: the ``backend=`` argument, ``FLEXKD_BACKEND``, and what is available.

``auto`` picks ``cpu`` for CPU tensors (else ``torch``) and ``cuda`` → ``triton`` → ``torch`` for CUDA
tensors. An explicitly requested backend that cannot run raises; an automatic fallback warns once.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

from flexkd import _native

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")
ENV_VAR = "FLEXKD_BACKEND"


@functools.cache
def triton_error() -> str | None:
    """Why the Triton kernels cannot be imported, or None when they can."""
    try:
        importlib.import_module("flexkd.kernels")
    except ImportError as err:
        return f"{type(err).__name__}: {err}"
    return None


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Ops whose ``cpu``/``cuda`` backends are torch code (no flexkd._C kernel to be built).
PURE_TORCH_OPS = frozenset({"linear_logit_kd"})


def unavailable_reason(backend: str, device_type: str, *, native: bool = True) -> str | None:
    """None when ``backend`` can run on tensors of ``device_type``, else the reason it cannot
    (``native=False``: the op's ``cpu``/``cuda`` backends need no C++ extension)."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, got {device_type} tensors"
        if native and _native.load() is None:
            return f"the C++ extension flexkd._C is not built ({_native.load_error()})"
        return None
    if backend == "cuda":
        if device_type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got {device_type} tensors"
        if not native:
            return None
        if _native.load() is None:
            return f"the C++ extension flexkd._C is not built ({_native.load_error()})"
        if not _native.has_cuda_kernels():
            return "flexkd._C was built without CUDA kernels"
        return None
    if backend == "triton":
        if device_type == "cpu" and not _triton_interpreted():
            return "backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
        if device_type not in ("cpu", "cuda"):
            return f"backend 'triton' does not run on {device_type} tensors"
        return triton_error()
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _reason(backend: str, device_type: str, native: bool) -> str | None:
    # The two-argument call for the native ops keeps unavailable_reason's original call shape.
    if native:
        return unavailable_reason(backend, device_type)
    return unavailable_reason(backend, device_type, native=False)


_AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
_warned: set[tuple[str, str]] = set()


def _requested(backend: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    from_env = os.environ.get(ENV_VAR, "auto") or "auto"
    if from_env not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {from_env!r}")
    return from_env


def resolve(backend: str, device_type: str, op_name: str) -> str:
    """The concrete backend (``torch``/``cpu``/``cuda``/``triton``) that runs ``op_name`` here."""
    requested = _requested(backend)
    native = op_name not in PURE_TORCH_OPS
    if requested != "auto":
        reason = _reason(requested, device_type, native)
        if reason is not None:
            raise RuntimeError(f"{op_name}: backend {requested!r} is not available: {reason}")
        return requested
    reasons = []
    for candidate in _AUTO_ORDER.get(device_type, ()):
        reason = _reason(candidate, device_type, native)
        if reason is None:
            return candidate
        reasons.append(f"{candidate}: {reason}")
    if reasons and (op_name, device_type) not in _warned:
        _warned.add((op_name, device_type))
        warnings.warn(
            f"flexkd.ops.{op_name} falls back to the pure-PyTorch backend on {device_type} tensors "
            f"({'; '.join(reasons)})",
            RuntimeWarning,
            stacklevel=5,  # the caller of flexkd.ops.<op>
        )
    return "torch"
