"""HSDP (``distributed.fsdp.replicas``) on 4 gloo processes: teacher and student sharded within 2 groups
of 2 and replicated across them take the steps a 4-process DDP run takes, checkpoint and resume; and
replica counts that cannot work fail before any model is built, naming the field.

The 4-process part runs as ``torchrun --nproc_per_node 4 tests/test_fsdp_hsdp.py FOLDER``.
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
from flexkd.distributed import check_sharding, end_launched_rank  # noqa: E402
from flexkd.errors import ConfigError  # noqa: E402
from flexkd.training import train  # noqa: E402

HSDP = ["distributed.fsdp.teacher=true", "distributed.fsdp.student=true", "distributed.fsdp.replicas=2"]
RUNS = {"ddp": [], "hsdp": HSDP}


def worker(folder: str) -> None:
    import torch.distributed as dist

    for name, overrides in RUNS.items():
        cfg = load_config(Path(folder) / "cfg.yaml", [*overrides, f"train.output_dir={name}"])
        train(cfg)
        if name == "hsdp" and dist.get_rank() == 0:
            from flexkd.distributed import sharding_mesh

            mesh = sharding_mesh(cfg, "cpu")
            Path(folder, "mesh.json").write_text(json.dumps(
                {"shape": list(mesh.shape), "names": list(mesh.mesh_dim_names)}
            ))  # fmt: skip


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
@pytest.mark.slow
def test_hsdp_steps_match_ddp_on_four_processes(tmp_path):
    write_causal_config(
        tmp_path, train={"max_steps": 3, "checkpoint_every": 2, "batch_size": 1}, dropout=0.0
    )
    run_two_processes(__file__, str(tmp_path), timeout=600, nproc=4)
    assert json.loads((tmp_path / "mesh.json").read_text()) == {
        "shape": [2, 2],
        "names": ["replicate", "shard"],
    }
    assert (tmp_path / "hsdp" / "checkpoints" / "step-000002" / "sharded" / ".metadata").is_file()
    ddp, hsdp = _metrics(tmp_path / "ddp"), _metrics(tmp_path / "hsdp")
    assert [m["step"] for m in hsdp] == [1, 2, 3]
    for one, two in zip(ddp, hsdp, strict=True):
        for term in ("task", "logit", "feature", "total", "grad_norm", "units_task"):
            assert two[term] == pytest.approx(one[term], rel=1e-5), (one["step"], term)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp" / "student").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "hsdp" / "student").state_dict()
    for name, want in a.items():
        torch.testing.assert_close(b[name], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["distributed.fsdp.student=true", "distributed.fsdp.replicas=3"], 4, "3 replicas of 4"),
        (["distributed.fsdp.student=true", "distributed.fsdp.replicas=2"], 2, "at least 2 processes"),
        (["distributed.fsdp.replicas=2"], 4, "replicas of what"),
    ],
)
def test_replica_counts_that_cannot_work_are_refused(tmp_path, overrides, world, message):
    cfg = load_config(write_causal_config(tmp_path), overrides)
    with pytest.raises(ConfigError, match=rf"distributed\.fsdp\.replicas: .*{message}"):
        check_sharding(cfg, world)


def test_replicas_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="replicas"):
        load_config(write_causal_config(tmp_path), ["distributed.fsdp.replicas=0"])


if __name__ == "__main__":
    worker(sys.argv[1])
    end_launched_rank()
