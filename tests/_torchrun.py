"""Run a script as 2 gloo processes on one machine (``torchrun --standalone``), for the FSDP tests."""

from __future__ import annotations

import os
import subprocess
import sys


def run_two_processes(script: str, *args: str, timeout: int) -> None:
    """``torchrun --nproc_per_node 2 script *args`` with one thread per process; fails with its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + [script, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
