"""A run folder is locked while a run writes it: a second run fails at once naming the folder and the
process holding it; a lock left by a dead process is taken over with a message."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from _train_helpers import write_causal_config

from flexkd.config import load_config
from flexkd.errors import RunFolderLockedError
from flexkd.training import train
from flexkd.training.run_dir import LOCK_NAME, RunLock

_HOLD = (
    "import sys; from flexkd.training.run_dir import RunLock\n"
    "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); sys.stdin.read(); lock.release()"
)


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_a_second_run_into_a_held_folder_fails_at_once_naming_the_holder(tmp_path):
    path = write_causal_config(tmp_path)
    out = load_config(path).output_dir
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "flexkd", "distill", str(path)],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=300,
        )
        elapsed = time.monotonic() - started
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert second.returncode == 2, second.stderr
    error_lines = [line for line in second.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1 and "Traceback" not in second.stderr
    assert str(out) in error_lines[0]
    assert f"process {holder.pid} on {socket.gethostname()}" in error_lines[0]
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    assert elapsed < 120  # it fails before building models or scoring
    assert not (out / LOCK_NAME).exists()  # the holder released it


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "run"
    folder.mkdir()
    stale = {"pid": dead.pid, "host": socket.gethostname(), "started": "earlier"}
    (folder / LOCK_NAME).write_text(json.dumps(stale))
    with RunLock(folder):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert f"process {dead.pid}" in capsys.readouterr().err
        with pytest.raises(RunFolderLockedError, match=f"in use by process {os.getpid()}"):
            RunLock(folder).acquire()
    assert not (folder / LOCK_NAME).exists()


def test_a_lock_from_another_host_is_refused(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
    with pytest.raises(RunFolderLockedError, match=r"process 1 on elsewhere .* delete"):
        RunLock(folder).acquire()


def test_train_releases_the_lock_when_it_ends(tmp_path):
    cfg = load_config(write_causal_config(tmp_path, train={"max_steps": 1}))
    train(cfg)
    assert not (cfg.output_dir / LOCK_NAME).exists()
    train(cfg)  # a later run into the same folder is fine
