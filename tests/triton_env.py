"""Test helper for the Triton backend: interpreter mode and importing ``flexkd.kernels``.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a function, so it must be set before
``triton`` (whose library has ``@triton.jit`` functions) and ``flexkd.kernels`` are first imported. In an installed flexkd, ``flexkd.kernels`` is the wheel's copy of ``kernels/``; in a source
checkout that was not installed, :func:`import_kernels` loads ``kernels/`` under that name.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def import_kernels():
    """``flexkd.kernels``, loaded from the source tree's ``kernels/`` when it is not installed."""
    if "flexkd.kernels" in sys.modules:
        return sys.modules["flexkd.kernels"]
    import flexkd

    if importlib.util.find_spec("flexkd.kernels") is None:
        source = REPO_ROOT / "kernels" / "__init__.py"
        spec = importlib.util.spec_from_file_location(
            "flexkd.kernels", source, submodule_search_locations=[str(source.parent)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["flexkd.kernels"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["flexkd.kernels"]
            raise
        flexkd.kernels = module
        return module
    return importlib.import_module("flexkd.kernels")


def kernels_interpreted() -> bool:
    """Whether the imported kernels are interpreter functions (run on CPU tensors)."""
    from flexkd.kernels import feature_loss
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(feature_loss._mse_kernel, InterpretedFunction)


def interpreter_usable() -> bool:
    """Whether the kernels can run under the interpreter in this process: they and Triton's own
    ``@triton.jit`` library functions were both created with ``TRITON_INTERPRET=1``."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return kernels_interpreted() and isinstance(tl.zeros, InterpretedFunction)
