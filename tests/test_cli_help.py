"""``flexkd COMMAND --help`` answers without importing torch or transformers (20-30 s under load)."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers")
PROBE = """
import sys
from flexkd.cli import main
try:
    main([{args}])
except SystemExit as done:
    assert done.code == 0, done.code
print("heavy imports:", ",".join(name for name in {heavy!r} if name in sys.modules))
"""


def heavy_imports(*args: str) -> str:
    code = PROBE.format(args=", ".join(repr(a) for a in args), heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: flexkd" in done.stdout
    return done.stdout.rsplit("heavy imports:", 1)[1].strip()


@pytest.mark.parametrize(
    "command",
    [[], ["info"], ["score"], ["distill"], ["eval"], ["teacher"], ["bench"]],  # demo, study: tests/lab/test_cli_plugins.py
    ids=lambda c: " ".join(c) or "flexkd",
)
def test_help_imports_nothing_heavy(command):
    assert heavy_imports(*command, "--help") == ""


def test_the_bench_options_name_the_benchmarks_dtypes():
    """``flexkd.bench.options`` spells out the GPU benchmark's dtype names (it cannot import torch)."""
    from flexkd.bench import ops_gpu, options

    assert tuple(ops_gpu.DTYPES) == options.GPU_DTYPES
