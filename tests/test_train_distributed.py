"""Two CPU processes (torchrun, gloo) distil like one process over the same rows.

With 2 processes x 2 rows the data order hands each step exactly the rows a single process
gets with 4 rows per step, so the selection (scores summed over processes), the first step's
loss and gradient norm, and the final student must agree with the single-process run.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_helpers import write_causal_config
from transformers import AutoModelForCausalLM

from flexkd.config import load_config
from flexkd.selection import DimensionSelection
from flexkd.training import train

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(cfg):
    return [
        json.loads(line) for line in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stored", [False, True], ids=["live-teacher", "stored-teacher-outputs"])
def test_two_processes_match_one_process(tmp_path, stored):
    """``stored``: the two processes read the teacher's outputs from ``distill.teacher_outputs`` (rank 0
    writes the store while rank 1 waits) and must still match the single process's live teacher."""
    common = {"max_steps": 3, "checkpoint_every": 2}
    distill = {"weights": {"task": 1.0, "logit": 0.5, "feature": 1.0}}
    dual_distill = {**distill, "teacher_outputs": "teacher-outputs"} if stored else distill
    selection = {"batch_size": 4}  # 24 rows: 6 batches on one process, 3 on each of two
    single = load_config(
        write_causal_config(
            tmp_path,
            train={**common, "batch_size": 4, "output_dir": "single"},
            distill=distill,
            selection=selection,
            dropout=0.0,
            rows=24,
            name="single.yaml",
        )
    )
    dual_path = write_causal_config(
        tmp_path,
        train={**common, "batch_size": 2, "output_dir": "dual"},
        distill=dual_distill,
        selection=selection,
        dropout=0.0,
        name="dual.yaml",
    )
    dual = load_config(dual_path)
    train(single)

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "flexkd",
        "distill",
        str(dual_path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "teacher-outputs" / "meta.json").is_file() == stored

    ours, theirs = (
        DimensionSelection.load(dual.selection_path),
        DimensionSelection.load(single.selection_path),
    )
    assert ours.tokens_seen == theirs.tokens_seen
    assert torch.allclose(ours.scores(-1), theirs.scores(-1), rtol=1e-5)
    assert torch.equal(ours.index(-1), theirs.index(-1))

    one, two = _metrics(single), _metrics(dual)
    assert [m["step"] for m in two] == [1, 2, 3]
    assert two[0]["units_task"] == one[0]["units_task"]
    for term in ("task", "logit", "feature", "total", "grad_norm"):
        assert two[0][term] == pytest.approx(one[0][term], rel=1e-4), term
    assert [p.name for p in sorted((dual.output_dir / "checkpoints").iterdir())] == ["step-000002"]
    assert sorted(
        p.name for p in (dual.output_dir / "checkpoints" / "step-000002" / "rng").iterdir()
    ) == [
        "rank-0.pt",
        "rank-1.pt",
    ]
    a = AutoModelForCausalLM.from_pretrained(single.student_path).state_dict()
    b = AutoModelForCausalLM.from_pretrained(dual.student_path).state_dict()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name
