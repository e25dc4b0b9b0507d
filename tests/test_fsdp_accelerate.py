"""``accelerate launch --use_fsdp --fsdp_version 2`` shards the teacher and the student as the
``distributed.fsdp`` section does: on 2 CPU processes (gloo) the run equals, bit for bit, a torchrun run
with the section set. The launcher's FSDP settings are taken, refused or named in a warning."""

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from _train_helpers import write_causal_config  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from flexkd.config import load_config  # noqa: E402
from flexkd.distributed import take_accelerate_fsdp  # noqa: E402
from flexkd.errors import ConfigError  # noqa: E402
from flexkd.training.run_dir import RUN_CONFIG_NAME  # noqa: E402

DISTILL = ["-m", "flexkd", "distill", "cfg.yaml"]


def _run(command: list[str], folder: Path) -> None:
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", PYTHONPATH=os.pathsep.join(sys.path)
    )  # a rank that aborts prints its threads' Python stacks
    done = subprocess.run(
        command, cwd=folder, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _metrics(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]


@pytest.mark.distributed
@pytest.mark.slow
def test_accelerate_fsdp2_launch_equals_the_config_section(tmp_path):
    write_causal_config(
        tmp_path, train={"max_steps": 3, "checkpoint_every": 2, "batch_size": 2}, dropout=0.0
    )
    _run(
        [
            sys.executable, "-m", "accelerate.commands.launch",
            "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", "0",
            "--use_fsdp", "--fsdp_version", "2", "--fsdp_reshard_after_forward", "false",
            *DISTILL, "--set", "train.output_dir=accelerate",
        ],
        tmp_path,
    )  # fmt: skip
    _run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            *DISTILL, "--set", "train.output_dir=torchrun",
            "--set", "distributed.fsdp.teacher=true", "--set", "distributed.fsdp.student=true",
            "--set", "distributed.fsdp.reshard_after_forward=false",
        ],
        tmp_path,
    )  # fmt: skip
    launched, section = tmp_path / "accelerate", tmp_path / "torchrun"
    recorded = json.loads((launched / RUN_CONFIG_NAME).read_text())["config"]
    assert recorded["distributed"]["fsdp"] == {
        "teacher": True,
        "student": True,
        "reshard_after_forward": False,
        "replicas": 1,
    }
    assert (launched / "checkpoints" / "step-000002" / "sharded" / ".metadata").is_file()
    assert [m["step"] for m in _metrics(launched)] == [1, 2, 3]
    assert _metrics(launched) == _metrics(section)
    ours = AutoModelForCausalLM.from_pretrained(launched / "student").state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(section / "student").state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def _config(tmp_path):
    return load_config(write_causal_config(tmp_path))


def test_without_use_fsdp_the_config_is_unchanged(tmp_path):
    cfg = _config(tmp_path)
    environ = {"FSDP_VERSION": "2"}
    assert take_accelerate_fsdp(cfg, environ) is cfg
    assert environ == {"FSDP_VERSION": "2"}


def test_use_fsdp_sets_the_section_and_switches_accelerates_own_fsdp_off(tmp_path):
    cfg = _config(tmp_path)
    environ = {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": "2",
        "FSDP_RESHARD_AFTER_FORWARD": "false",
        "FSDP_OFFLOAD_PARAMS": "false",
    }
    taken = take_accelerate_fsdp(cfg, environ)
    fsdp = taken.distributed.fsdp
    assert (fsdp.teacher, fsdp.student, fsdp.reshard_after_forward) == (True, True, False)
    assert "ACCELERATE_USE_FSDP" not in environ
    assert not cfg.distributed.fsdp.student  # the given config is not changed


def test_fsdp1_and_bad_reshard_values_are_refused(tmp_path):
    cfg = _config(tmp_path)
    with pytest.raises(ConfigError, match="asks for FSDP version 1; add --fsdp_version 2"):
        take_accelerate_fsdp(cfg, {"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(ConfigError, match="fsdp_reshard_after_forward.*'full_shard'"):
        take_accelerate_fsdp(
            cfg,
            {
                "ACCELERATE_USE_FSDP": "true",
                "FSDP_VERSION": "2",
                "FSDP_RESHARD_AFTER_FORWARD": "FULL_SHARD",
            },
        )


def test_plugin_settings_flexkd_does_not_apply_are_named(tmp_path):
    environ = {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_VERSION": "2",
        "FSDP_OFFLOAD_PARAMS": "true",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_ACTIVATION_CHECKPOINTING": "false",
    }
    with pytest.warns(RuntimeWarning, match=r"not applied: --fsdp_offload_params, --fsdp_auto_wrap"):
        take_accelerate_fsdp(_config(tmp_path), environ)
