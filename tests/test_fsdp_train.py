"""`flexkd distill` with `distributed.fsdp` on 2 gloo processes: the steps equal a DDP run's, the
teacher's stored outputs are written by the sharded teacher, a run whose two processes are SIGKILLed
while they write the step-4 checkpoint (torch.distributed.checkpoint) resumes from the step-2 one to the
uninterrupted run's weights, the saved student is a plain HF folder; and sharding configs that cannot
work fail before any model is built.

The 2-process parts run as ``torchrun --nproc_per_node 2 tests/test_fsdp_train.py FOLDER [killed]``.
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from _torchrun import kill_two_processes_when_ready, run_two_processes  # noqa: E402
from _train_helpers import write_causal_config  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from flexkd.config import load_config  # noqa: E402
from flexkd.distributed import end_launched_rank  # noqa: E402
from flexkd.errors import ConfigError  # noqa: E402
from flexkd.training import train  # noqa: E402

FSDP = ["distributed.fsdp.teacher=true", "distributed.fsdp.student=true"]
RUNS = {
    "ddp": [],
    "fsdp": FSDP,
    "stored": [*FSDP, "distill.teacher_outputs=teacher-outputs"],
    "killed": FSDP,  # resumes the run killed by killed_worker
    "ddp-projector": ["distill.feature=projector"],
    "fsdp-projector": [*FSDP, "distill.feature=projector"],
}
KILL_AT = 4  # the checkpoint being written when both processes are killed (step 2's is complete)


def killed_worker(folder: str) -> None:
    """The "killed" run, waiting to be SIGKILLed in the middle of writing its step-4 checkpoint: the
    sharded state is on disk, the manifest, student and rename are not."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    real = dcp.save

    def save(state, *, checkpoint_id, **kwargs):
        result = real(state, checkpoint_id=checkpoint_id, **kwargs)
        if Path(checkpoint_id).parent.name == f".step-{KILL_AT:06d}.tmp":
            ready = Path(folder) / "ready" / f"rank-{dist.get_rank()}"
            ready.with_suffix(".tmp").write_text(str(os.getpid()))
            ready.with_suffix(".tmp").replace(ready)
            time.sleep(600)
        return result

    dcp.save = save
    train(load_config(Path(folder) / "cfg.yaml", [*FSDP, "train.output_dir=killed"]))
    raise AssertionError("not killed")


def worker(folder: str) -> None:
    path = Path(folder) / "cfg.yaml"
    for name, overrides in RUNS.items():
        train(load_config(path, [*overrides, f"train.output_dir={name}"]))


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_steps_match_ddp_and_resume_exactly(tmp_path):
    write_causal_config(
        tmp_path,
        train={"max_steps": 4, "checkpoint_every": 2, "batch_size": 2},
        dropout=0.0,
        rows=16,
    )
    kill_two_processes_when_ready(
        __file__, str(tmp_path), "killed", ready=tmp_path / "ready", timeout=300
    )
    killed = tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in killed.iterdir()) == [".step-000004.tmp", "step-000002"]
    assert (killed / ".step-000004.tmp" / "sharded" / ".metadata").is_file()
    assert not (killed / ".step-000004.tmp" / "manifest.json").exists()
    assert [m["step"] for m in _metrics(tmp_path / "killed")] == [1, 2, 3, 4]

    run_two_processes(__file__, str(tmp_path), timeout=400)  # "killed" resumes from step 2
    assert (tmp_path / "teacher-outputs" / "meta.json").is_file()

    metrics = {name: _metrics(tmp_path / name) for name in RUNS}
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step-000004"
    assert (checkpoint / "sharded" / ".metadata").is_file()
    assert not (checkpoint / "optimizer.pt").exists()
    assert [m["step"] for m in metrics["fsdp"]] == [1, 2, 3, 4]
    assert [m["step"] for m in metrics["killed"]] == [1, 2, 3, 4]
    assert sorted(p.name for p in killed.iterdir()) == ["step-000002", "step-000004"]
    # FSDP reduce-scatters where DDP all-reduces: the same sums in another order, so they agree to fp32
    # rounding over the 4 steps; the stored teacher outputs (fp32) stand in for the live sharded teacher
    for run, ddp in (("fsdp", "ddp"), ("stored", "ddp"), ("fsdp-projector", "ddp-projector")):
        for one, two in zip(metrics[ddp], metrics[run], strict=True):
            for term in ("task", "logit", "feature", "total", "grad_norm", "units_task"):
                assert two[term] == pytest.approx(one[term], rel=1e-5), (run, one["step"], term)

    students = {
        name: AutoModelForCausalLM.from_pretrained(tmp_path / name / "student").state_dict()
        for name in RUNS
    }
    config = json.loads((tmp_path / "fsdp" / "student" / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    for run, ddp in (("fsdp", "ddp"), ("stored", "ddp"), ("fsdp-projector", "ddp-projector")):
        assert students[run].keys() == students[ddp].keys()
        for name, want in students[ddp].items():
            torch.testing.assert_close(students[run][name], want, rtol=1e-4, atol=1e-6)
    # the killed run, resumed from its sharded step-2 checkpoint, ends bitwise where the uninterrupted one did
    for name, want in students["fsdp"].items():
        assert torch.equal(students["killed"][name], want), name
    for name in ("fsdp", "killed"):
        assert _metrics(tmp_path / name)[-1] == {
            **_metrics(tmp_path / "fsdp")[-1],
            "elapsed_s": _metrics(tmp_path / name)[-1]["elapsed_s"],
        }


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_sharding_on_one_process_fails_before_any_model_is_built(tmp_path, monkeypatch, role):
    from flexkd.training import loop

    def never(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(loop, "build_model", never)
    monkeypatch.setattr(loop, "build_tokenizer", never)
    cfg = load_config(write_causal_config(tmp_path), [f"distributed.fsdp.{role}=true"])
    with pytest.raises(
        ConfigError, match=rf"distributed\.fsdp\.{role}: sharding needs several processes.*torchrun"
    ):
        train(cfg)


def test_unknown_sharding_field_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"distributed\.fsdp\.shard_optimizer: unknown field"):
        load_config(write_causal_config(tmp_path), ["distributed.fsdp.shard_optimizer=true"])


if __name__ == "__main__":
    (killed_worker if sys.argv[2:] == ["killed"] else worker)(sys.argv[1])
    end_launched_rank()
