"""Test helper for the Triton backend: interpreter mode and importing ``flexkd.kernels``.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a function, so it must be set before
``triton`` (whose library has ``@triton.jit`` functions) and ``flexkd.kernels`` are first imported.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def import_kernels():
    """``flexkd.kernels`` (ImportError when Triton is missing)."""
    return importlib.import_module("flexkd.kernels")


def kernels_interpreted() -> bool:
    """Whether the imported kernels are interpreter functions (run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    from flexkd.kernels import feature_loss

    return isinstance(feature_loss._mse_kernel, InterpretedFunction)


def interpreter_usable() -> bool:
    """Whether the kernels can run under the interpreter in this process: they and Triton's own
    ``@triton.jit`` library functions were both created with ``TRITON_INTERPRET=1``."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return kernels_interpreted() and isinstance(tl.zeros, InterpretedFunction)
