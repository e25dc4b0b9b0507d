"""Exact resume: the real --quick study in two single-threaded workers, SIGKILLed mid-way with its whole
process group and restarted, stores exactly what an uninterrupted study stores (timings aside).

The slowest lab test (~30-60 s on two idle cores: three study commands, each spawning two workers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flexkd_lab.experiments.study import RESULTS_FOLDER, TIMING_FIELDS

ARGS = ["--quick", "--no-progress", "--workers", "2", "--no-teacher-check"]
ARGS += ["--methods", "none", "flex-corr", "--seeds", "0", "1"]  # 4 grid runs, then 2 more


def _command(tmp_path: Path, name: str) -> list[str]:
    return [
        sys.executable, "-m", "flexkd", "study", *ARGS,
        "--out", str(tmp_path / name), "--cache-dir", str(tmp_path / "cache"),
        "--work-dir", str(tmp_path / f"work-{name}"),
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _results(out: Path) -> dict[str, object]:
    """Every stored file of the study, parsed, without the fields that time the machine."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in TIMING_FIELDS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    root = out / RESULTS_FOLDER
    return {
        str(p.relative_to(root)): strip(json.loads(p.read_text()))
        for p in sorted(root.rglob("*.json"))
    }


def test_a_study_killed_mid_way_resumes_to_the_same_results(tmp_path):
    subprocess.run(_command(tmp_path, "whole"), env=_env(), check=True, capture_output=True)
    expected = _results(tmp_path / "whole")
    assert sum(name.endswith(".json") and "seed-" in name for name in expected) == 6

    killed = subprocess.Popen(
        _command(tmp_path, "killed"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    store = tmp_path / "killed" / RESULTS_FOLDER
    deadline = time.monotonic() + 300
    while len(list(store.rglob("seed-*.json"))) < 2:
        assert killed.poll() is None, "the study finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)  # the command and both workers, mid-run
    killed.wait()
    partial = len(list(store.rglob("seed-*.json")))
    assert 2 <= partial < 6

    subprocess.run(_command(tmp_path, "killed"), env=_env(), check=True, capture_output=True)
    assert _results(tmp_path / "killed") == expected
