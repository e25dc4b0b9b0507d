"""``flexkd.distributed`` on one process: the launcher warning (a launcher asked for several processes
but the run has one) and the models ``shard_model`` refuses before touching any process group."""

import warnings

import _tiny_hf as tiny
import pytest
import torch

from flexkd import distributed

LAUNCHER_VARIABLES = ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


@pytest.fixture
def clean_launcher(monkeypatch):
    for name in (*LAUNCHER_VARIABLES, "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_warned", False)
    return monkeypatch


@pytest.mark.parametrize("variable", LAUNCHER_VARIABLES)
def test_a_launcher_asking_for_two_processes_warns_once_with_the_working_commands(
    clean_launcher, variable
):
    clean_launcher.setenv(variable, "2")
    with pytest.warns(RuntimeWarning, match=rf"{variable}=2.*2 processes.*world size of 1") as seen:
        distributed.warn_if_fewer_processes(1)
    assert "torchrun --nproc_per_node N" in str(seen[0].message)
    assert "accelerate launch --multi_gpu --num_processes N" in str(seen[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distributed.warn_if_fewer_processes(1)  # once per process


def test_no_warning_when_the_world_has_the_processes_asked_for(clean_launcher):
    clean_launcher.setenv("WORLD_SIZE", "2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distributed.warn_if_fewer_processes(2)
        clean_launcher.setenv("WORLD_SIZE", "1")
        distributed.warn_if_fewer_processes(1)


def test_accelerate_launch_cpu_is_read_from_the_parent_command_line(clean_launcher, tmp_path):
    """``accelerate launch --cpu --num_processes 2`` starts one process and sets no size variable."""
    cmdline = tmp_path / "cmdline"
    for args, asked in (
        (["accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "flexkd"], 2),
        (["accelerate", "launch", "--num_processes=3", "train.py"], 3),
        (["accelerate", "launch", "train.py"], None),
    ):
        cmdline.write_bytes("\0".join(args).encode() + b"\0")
        assert distributed._accelerate_num_processes(cmdline) == asked
    assert distributed._accelerate_num_processes(tmp_path / "missing") is None
    clean_launcher.setenv("ACCELERATE_USE_CPU", "True")
    clean_launcher.setattr(distributed, "_accelerate_num_processes", lambda path: 2)
    with pytest.warns(RuntimeWarning, match="accelerate launch --num_processes 2"):
        distributed.warn_if_fewer_processes(1)


def test_shard_model_refuses_mixed_or_integer_parameters_naming_the_model():
    model = tiny.build("llama")
    model.lm_head.to(torch.float16)
    with pytest.raises(ValueError, match=r"model: FSDP shards .*one float dtype.*float16.*float32"):
        distributed.shard_model(model)
    model = tiny.build("llama").to(torch.float16)
    quantized = torch.ones(tiny.HIDDEN, dtype=torch.int8)
    model.model.norm.weight = torch.nn.Parameter(quantized, requires_grad=False)
    with pytest.raises(ValueError, match=r"one float dtype.*int8"):
        distributed.shard_model(model)


def test_shard_model_needs_a_process_group():
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed initialised.*torchrun"):
        distributed.shard_model(tiny.build("llama"))
    assert not distributed.is_sharded(tiny.build("llama"))


def test_a_sharded_checkpoint_is_refused_by_an_unsharded_student(tmp_path):
    import json

    from flexkd.checkpoint import load_checkpoint
    from flexkd.errors import ResumeMismatchError

    state = {"step": 2, "epoch": 0, "position": 2, "seed": 0, "world_size": 1}
    (tmp_path / "state.json").write_text(json.dumps(state))
    (tmp_path / "sharded").mkdir()
    student = tiny.build("llama")
    with pytest.raises(ResumeMismatchError, match="sharded student.*not sharded.*fsdp.student"):
        load_checkpoint(
            tmp_path,
            student=student,
            feature_losses=torch.nn.ModuleList(),
            optimizer=torch.optim.AdamW(student.parameters()),
            scheduler=None,
        )
