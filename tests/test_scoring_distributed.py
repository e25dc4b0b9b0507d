import os
import subprocess
import sys
from pathlib import Path

import _scoring_rows as rows_of
import _scoring_worker as worker
import _tiny_hf as tiny
import pytest
import torch

import flexkd

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("_scoring_worker.py")


def test_two_gloo_processes_score_the_same_rows_as_one(tmp_path):
    teacher = tiny.build("llama")
    teacher.save_pretrained(tmp_path / "teacher")
    # 11 rows in batches of 3, 1, 2, 3, 1, 1: 6 rows on rank 0 and 5 on rank 1
    rows = rows_of.causal_rows(11, 11, vocab=tiny.VOCAB)
    torch.save(rows, tmp_path / "rows.pt")
    env = dict(
        os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path)
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(WORKER),
            str(tmp_path / "teacher"),
            str(tmp_path / "rows.pt"),
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def one_process(chosen):
        return flexkd.score(
            teacher, [rows_of.collate(chosen)], layers=worker.LAYERS, k=worker.K, progress=False
        )

    split = flexkd.DimensionSelection.load(tmp_path / "split.safetensors", teacher)
    rows_of.assert_same_selection(split, one_process(rows))
    budget = flexkd.DimensionSelection.load(tmp_path / "budget.safetensors", teacher)
    rows_of.assert_same_selection(budget, one_process(rows[: worker.BUDGET]))
    alone = flexkd.score(
        teacher,
        rows_of.batches_of(rows, [2], "left"),
        layers=worker.LAYERS,
        k=worker.K,
        max_rows=worker.BUDGET,
        progress=False,
    )
    rows_of.assert_same_selection(budget, alone)
