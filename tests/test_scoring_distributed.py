import os
import subprocess
import sys
from pathlib import Path

import _tiny_hf as tiny
import pytest
import torch

import flexkd

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("_scoring_worker.py")


def test_two_gloo_processes_give_the_same_selection_as_one(tmp_path):
    teacher = tiny.build("llama")
    teacher.save_pretrained(tmp_path / "teacher")
    batches = [tiny.batch_for("llama") for _ in range(5)]  # uneven split: 3 and 2 batches
    torch.save(batches, tmp_path / "batches.pt")
    out = tmp_path / "two.safetensors"
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
            str(tmp_path / "batches.pt"),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    single = flexkd.score(teacher, batches, layers=[1, -1], k=8, progress=False)
    double = flexkd.DimensionSelection.load(out, teacher)
    assert double.tokens_seen == single.tokens_seen
    assert double.data_fingerprint == single.data_fingerprint
    for layer in single.layers:
        torch.testing.assert_close(double.scores(layer), single.scores(layer), rtol=1e-5, atol=1e-9)
        assert torch.equal(double.index(layer), single.index(layer))
