#!/usr/bin/env python
"""CI step: compile every Triton kernel specialisation flexkd launches for sm_80 and sm_90.

No GPU needed (ptxas ships in the Triton wheel). Prints a table; exits non-zero when a compile fails.
Extra arguments go to ``flexkd.kernels.compile_check`` (e.g. ``--arch 90``).
"""

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be JIT functions, not interpreted
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.path.append(str(REPO_ROOT))  # an installed flexkd still wins; a bare checkout works too
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from triton_env import import_kernels

    import_kernels()
    from flexkd.kernels.compile_check import main

    sys.exit(main(sys.argv[1:]))
