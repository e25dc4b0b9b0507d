"""examples/hf_trainer.py, as the README runs it: two CPU processes (torchrun, gloo) with 2 rows each,
their teacher sharded with FSDP2 (``--shard-teacher``), must log the terms, the evaluation and the final
student of one process with 4 rows and the whole teacher."""

import json
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "hf_trainer.py"
SIZE = ["--max-steps", "4", "--train-rows", "32"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_log_and_train_like_one(tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    argv = [str(EXAMPLE), "--output-dir", str(one), "--batch-size", "4", *SIZE]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(EXAMPLE), run_name="__main__")  # one process: in this one
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    torchrun += ["--master_port", str(_free_port())]
    sharded = ["--batch-size", "2", "--shard-teacher"]
    _run([*torchrun, str(EXAMPLE), "--output-dir", str(two), *sharded, *SIZE])

    single, dual = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert (single["world_size"], dual["world_size"]) == (1, 2)
    assert (single["teacher_sharded"], dual["teacher_sharded"]) == (False, True)
    logs_one, logs_two = single["log_history"], dual["log_history"]
    assert len(logs_one) == len(logs_two)
    compared = 0
    for a, b in zip(logs_one, logs_two, strict=True):
        for key, value in a.items():
            if (
                key.startswith(("distill/", "eval_"))
                and "runtime" not in key
                and "per_second" not in key
            ):
                assert b[key] == pytest.approx(value, rel=1e-4), (a["step"], key)
                compared += 1
    assert compared >= 2 * 4 + 6  # two training logs of 4 terms, an evaluation of 6 metrics
    assert any("eval_accuracy" in entry for entry in logs_two)
    a, b = (load_file(d / "student" / "model.safetensors") for d in (one, two))
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=1e-4, atol=1e-5)
