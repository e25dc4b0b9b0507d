"""Every Triton kernel specialisation compiles for sm_80 and sm_90, no GPU needed.

Runs ``.ci/triton_compile_check.py`` (``flexkd.kernels.compile_check.main``) in a subprocess: the check
needs JIT-mode kernels, while this test session may have imported them under ``TRITON_INTERPRET=1``.
Triton caches the cubins, so after the CI step has run the script this test costs seconds.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / ".ci" / "triton_compile_check.py"
KERNELS = (
    "_mse_kernel",
    "_corr_stats_kernel",
    "_corr_grad_kernel",
    "_column_sums_kernel",
    "_add_chunk_sums_kernel",
)


def _jit_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def test_every_kernel_compiles_for_sm80_and_sm90():
    run = subprocess.run(
        [sys.executable, str(SCRIPT)], env=_jit_env(), capture_output=True, text=True, timeout=900
    )
    report = run.stdout + run.stderr[-3000:]
    assert run.returncode == 0, report
    table = run.stdout.splitlines()
    assert table[-1].endswith(" 0 failed"), report
    for kernel in KERNELS:
        for arch in ("sm_80", "sm_90"):
            rows = [line for line in table if line.startswith(kernel + " ") and f" {arch} " in line]
            assert rows and all(" ok " in row for row in rows), f"{kernel} {arch}:\n{report}"
    for dtype in ("*fp32", "*bf16", "*fp16"):
        assert any(line.startswith("_mse_kernel") and dtype in line for line in table), dtype


def test_a_kernel_that_does_not_compile_fails_the_check(tmp_path):
    """The checker reports a compile error as a failed row and a non-zero exit status."""
    (tmp_path / "broken_kernel.py").write_text(
        textwrap.dedent(
            """
            import triton
            import triton.language as tl

            @triton.jit
            def broken(x_ptr, BLOCK: tl.constexpr):
                offsets = tl.arange(0, BLOCK)
                tl.store(x_ptr + offsets, tl.load(x_ptr + offsets) @ offsets)  # 1-D dot: invalid
            """
        )
    )
    program = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = [{str(tmp_path)!r}, {str(REPO_ROOT / "tests")!r}]
        sys.path.append({str(REPO_ROOT)!r})
        import triton_env
        triton_env.import_kernels()
        from broken_kernel import broken
        from flexkd.kernels import compile_check
        spec = compile_check.Specialisation(broken, (("x_ptr", "*fp32"), ("BLOCK", "constexpr")),
                                            (("BLOCK", 16),), (0,), 4)
        compile_check._SPECS = [spec]
        result = compile_check._compile_job((0, 90))
        print(compile_check.format_table([result]))
        sys.exit(0 if not result.ok else 3)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", program], env=_jit_env(), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "FAIL" in run.stdout and run.stdout.strip().endswith("1 compiles, 1 failed")
