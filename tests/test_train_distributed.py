"""Two CPU processes (torchrun, gloo) distil like one process over the same rows.

With 2 processes x 2 rows the data order hands each step exactly the rows a single process
gets with 4 rows per step, so the selection (scores summed over processes), the first step's
loss and gradient norm, and the final student must agree with the single-process run. That holds
for length-grouped batches (``data.group_by_length``) too, against a length-grouped single process.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from _torchrun import run_two_processes  # noqa: E402
from _train_helpers import write_causal_config  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from flexkd.config import load_config  # noqa: E402
from flexkd.distributed import end_launched_rank  # noqa: E402
from flexkd.selection import DimensionSelection  # noqa: E402
from flexkd.training import train  # noqa: E402

DUAL = {
    "live-teacher": "dual.yaml",
    "stored-teacher-outputs": "dual-stored.yaml",
    "length-grouped": "dual-grouped.yaml",
}


def _metrics(cfg):
    return [
        json.loads(line) for line in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()
    ]


def worker(folder: str) -> None:
    """Both two-process runs in one launch (a launch costs more than a run of this size)."""
    for name in DUAL.values():
        train(load_config(Path(folder) / name))


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """Two processes, with the live teacher and reading the teacher's outputs from
    ``distill.teacher_outputs`` (rank 0 writes the store while rank 1 waits), both match the single
    process's live teacher."""
    common = {"max_steps": 3, "checkpoint_every": 2}
    distill = {"weights": {"task": 1.0, "logit": 0.5, "feature": 1.0}}
    selection = {"batch_size": 4}  # 24 rows: 6 batches on one process, 3 on each of two
    singles = {}
    for grouped in (False, True):
        singles[grouped] = load_config(
            write_causal_config(
                tmp_path,
                train={**common, "batch_size": 4, "output_dir": f"single-{grouped}"},
                distill=distill,
                selection={**selection, "path": f"single-{grouped}.selection.safetensors"},
                data={"group_by_length": grouped},
                dropout=0.0,
                rows=24,
                name=f"single-{grouped}.yaml",
            )
        )
    duals = {}
    for run, name in DUAL.items():
        stored = run == "stored-teacher-outputs"
        path = write_causal_config(
            tmp_path,
            train={**common, "batch_size": 2, "output_dir": run},
            distill={**distill, "teacher_outputs": "teacher-outputs"} if stored else distill,
            selection={**selection, "path": f"{run}.selection.safetensors"},
            data={"group_by_length": run == "length-grouped"},
            dropout=0.0,
            name=name,
        )
        duals[run] = load_config(path)
    for single in singles.values():
        train(single)
    run_two_processes(__file__, str(tmp_path), timeout=600)
    assert (tmp_path / "teacher-outputs" / "meta.json").is_file()

    # grouping changes which rows make a step (so the comparison below is not the ungrouped one again)
    assert [m["units_task"] for m in _metrics(singles[True])] != [
        m["units_task"] for m in _metrics(singles[False])
    ]
    for run, dual in duals.items():
        single = singles[dual.data.group_by_length]
        theirs = DimensionSelection.load(single.selection_path)
        one = _metrics(single)
        a = AutoModelForCausalLM.from_pretrained(single.student_path).state_dict()
        ours = DimensionSelection.load(dual.selection_path)
        assert ours.tokens_seen == theirs.tokens_seen
        assert torch.allclose(ours.scores(-1), theirs.scores(-1), rtol=1e-5)
        assert torch.equal(ours.index(-1), theirs.index(-1))

        two = _metrics(dual)
        assert [m["step"] for m in two] == [1, 2, 3]
        assert two[0]["units_task"] == one[0]["units_task"]
        for term in ("task", "logit", "feature", "total", "grad_norm"):
            assert two[0][term] == pytest.approx(one[0][term], rel=1e-4), (run, term)
        checkpoints = dual.output_dir / "checkpoints"
        assert [p.name for p in sorted(checkpoints.iterdir())] == ["step-000002"]
        ranks = sorted(p.name for p in (checkpoints / "step-000002" / "rng").iterdir())
        assert ranks == ["rank-0.pt", "rank-1.pt"]
        b = AutoModelForCausalLM.from_pretrained(dual.student_path).state_dict()
        for name in a:
            assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), (run, name)


if __name__ == "__main__":
    worker(sys.argv[1])
    end_launched_rank()
