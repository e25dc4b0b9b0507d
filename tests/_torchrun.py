"""Run a script as 2 gloo processes on one machine (``torchrun --standalone``), for the FSDP tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _command(script: str, *args: str, nproc: int = 2, log_dir: str | None = None) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    if log_dir is not None:  # each rank's output also in its own file, so a crash shows its own lines
        launcher += ["--log-dir", log_dir, "--tee", "3"]
    return [*launcher, "--nproc_per_node", str(nproc), script, *args]


def _rank_logs(log_dir: str, chars: int = 3000) -> str:
    """The end of each rank's stdout and stderr under torchrun's ``log_dir``."""
    parts = []
    for log in sorted(Path(log_dir).rglob("*.log")):
        text = log.read_text(errors="replace").strip()
        if text:
            parts.append(f"--- {log.relative_to(log_dir)} ---\n{text[-chars:]}")
    return "\n".join(parts)


def _env() -> dict[str, str]:
    # PYTHONFAULTHANDLER: a rank that aborts (SIGABRT) prints every thread's Python stack first
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", PYTHONPATH=os.pathsep.join(sys.path))


def run_two_processes(script: str, *args: str, timeout: int, nproc: int = 2) -> None:
    """``torchrun --nproc_per_node 2 script *args`` (``nproc`` processes) with one thread per process;
    fails with its output."""
    with tempfile.TemporaryDirectory(prefix="torchrun-logs-") as log_dir:
        done = subprocess.run(
            _command(script, *args, nproc=nproc, log_dir=log_dir), env=_env(), capture_output=True,
            text=True, timeout=timeout,
        )  # fmt: skip
        assert done.returncode == 0, f"{done.stderr[-2000:]}\n{_rank_logs(log_dir)}"


def kill_two_processes_when_ready(script: str, *args: str, ready: Path, timeout: int) -> None:
    """Start ``script`` as 2 processes; once each has written its pid to ``ready/rank-<r>`` (and is
    waiting to be killed), SIGKILL both, then the launcher. Fails with the output when they end or
    time out first."""
    ready.mkdir(parents=True, exist_ok=True)
    log = ready / "launcher.log"
    with log.open("w") as out:
        launcher = subprocess.Popen(
            _command(script, *args),
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    files = [ready / f"rank-{rank}" for rank in range(2)]
    try:
        while not all(f.is_file() and f.read_text().strip() for f in files):
            if launcher.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"the processes ended or timed out before they were ready:\n{log.read_text()[-4000:]}"
                )
            time.sleep(0.1)
        for f in files:
            os.kill(int(f.read_text()), signal.SIGKILL)
    finally:
        with_children = os.getpgid(launcher.pid)
        os.killpg(with_children, signal.SIGKILL)
        launcher.wait(timeout=60)
