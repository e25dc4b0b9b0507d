"""Resuming a run folder: a run killed at step k resumes only with the config it was started with (the
fields that cannot change the result may differ), says where it resumes from, survives a damaged latest
checkpoint, and every unreadable file is named in one line."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from _train_helpers import write_causal_config
from transformers import AutoModelForCausalLM

from flexkd.cli import main
from flexkd.config import load_config
from flexkd.training import train
from flexkd.training.run_dir import RUN_CONFIG_NAME, changed_fields, start_metrics

TRAIN = {"max_steps": 6, "checkpoint_every": 2, "keep_checkpoints": 3}
DISTILL = {"feature": "projector"}

# Runs `flexkd distill CONFIG` and SIGKILLs itself inside the forward of step KILL_AT.
_KILLED_AT_STEP = """
import os, signal, sys
from flexkd.distill import Distiller
real, calls = Distiller.forward, []
def forward(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *args, **kwargs)
Distiller.forward = forward
from flexkd.cli import main
sys.exit(main(["distill", sys.argv[1]]))
"""


def _student(folder):
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def _assert_same_weights(want, got):
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("flexkd distill: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def one_thread():
    """The killed run uses one thread (its OMP_NUM_THREADS); bitwise-equal weights need the in-process
    runs to reduce in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_run_killed_at_step_five_refuses_a_changed_config_and_resumes_with_neutral_changes(
    tmp_path, capsys, one_thread
):
    path = write_causal_config(tmp_path, train=TRAIN, distill=DISTILL)
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_AT_STEP, str(path), "5"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    out = tmp_path / "out"
    assert (out / RUN_CONFIG_NAME).is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    metrics_before = (out / "metrics.jsonl").read_text()

    changed = ["train.lr=0.05", "distill.feature_loss=corr", "train.seed=1"]
    assert main(["distill", str(path), *(f"--set={c}" for c in changed)]) == 2
    line = _error_line(capsys)
    for field in ("train.lr: 0.001 -> 0.05", "distill.feature_loss: 'mse' -> 'corr'"):
        assert field in line
    assert "train.seed: 0 -> 1" in line and "step-000004" in line
    assert "--set train.resume=false" in line and "train.output_dir" in line
    assert "train.log_every" not in line
    assert (out / "metrics.jsonl").read_text() == metrics_before  # the refused run wrote nothing
    assert not (out / "student").exists()

    neutral = ["train.log_every=2", "train.progress=false", "train.keep_checkpoints=2"]
    neutral += ["train.checkpoint_every=3", "eval.batch_size=4"]
    assert main(["distill", str(path), *(f"--set={c}" for c in neutral)]) == 0
    err = capsys.readouterr().err
    assert f"resuming from step 4 of 6 ({out / 'checkpoints' / 'step-000004'})" in err

    whole_dir = tmp_path / "whole"
    whole_dir.mkdir()
    for name in ("train.jsonl", "val.jsonl"):
        shutil.copy(tmp_path / name, whole_dir / name)
    whole = load_config(write_causal_config(whole_dir, train=TRAIN, distill=DISTILL))
    train(whole)
    _assert_same_weights(_student(whole.student_path), _student(out / "student"))


def test_a_damaged_latest_checkpoint_is_skipped_and_named_and_the_result_is_unchanged(
    tmp_path, capsys
):
    path = write_causal_config(tmp_path, train={**TRAIN, "max_steps": 4}, distill=DISTILL)
    assert main(["distill", str(path)]) == 0
    out = tmp_path / "out"
    want = _student(out / "student")
    assert "resuming" not in capsys.readouterr().err

    weights = out / "checkpoints" / "step-000004" / "student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["distill", str(path)]) == 0
    err = capsys.readouterr().err
    assert f"skipping checkpoint step-000004: {weights}: is 100 bytes" in err
    assert "resuming from step 2 of 4" in err
    _assert_same_weights(want, _student(out / "student"))

    for step in ("step-000002", "step-000004"):
        (out / "checkpoints" / step / "state.json").write_text('{"step": 2, "epo')
    assert main(["distill", str(path)]) == 2
    line = _error_line(capsys)
    assert "no intact checkpoint" in line and "--set train.resume=false" in line
    assert str(out / "checkpoints" / "step-000002" / "state.json") in line

    assert main(["distill", str(path), "--set", "train.resume=false"]) == 0
    assert "resuming" not in capsys.readouterr().err
    _assert_same_weights(want, _student(out / "student"))


def test_a_resume_after_the_last_checkpoint_continues_a_finished_run_without_steps(
    tmp_path, capsys
):
    path = write_causal_config(tmp_path, train={**TRAIN, "max_steps": 2}, distill=DISTILL)
    assert main(["distill", str(path)]) == 0
    capsys.readouterr()
    assert main(["distill", str(path)]) == 0
    assert "resuming from step 2 of 2" in capsys.readouterr().err


def test_a_corrupt_selection_file_is_named_in_one_line(tmp_path, capsys):
    path = write_causal_config(tmp_path, distill={"feature": "flex"})
    (tmp_path / "out").mkdir()
    selection = tmp_path / "out" / "selection.safetensors"
    selection.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    assert main(["distill", str(path)]) == 2
    line = _error_line(capsys)
    assert f"{selection}: is not a readable safetensors file" in line


def test_a_corrupt_teacher_outputs_meta_is_named_in_one_line(tmp_path, capsys):
    path = write_causal_config(tmp_path, distill={**DISTILL, "teacher_outputs": "store"})
    (tmp_path / "store").mkdir()
    meta = tmp_path / "store" / "meta.json"
    meta.write_text('{"format": 1, "layers": [')
    assert main(["distill", str(path)]) == 2
    assert f"{meta}: is not valid JSON" in _error_line(capsys)


@pytest.mark.parametrize(
    "content, says",
    [(b"train: [1, 2\nmodel: {", "not valid YAML"), (b"\xff\xfe\x00bad", "cannot be read")],
)
def test_a_broken_config_file_is_named_in_one_line(tmp_path, capsys, content, says):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(content)
    assert main(["distill", str(path)]) == 2
    line = _error_line(capsys)
    assert str(path) in line and says in line


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    start_metrics(metrics, resume_step=2)
    assert metrics.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_only_the_small_allow_list_of_fields_may_change():
    old = {
        "train": {"lr": 0.001, "log_every": 1, "progress": True, "output_dir": "/a"},
        "eval": {"batch_size": 16},
        "distill": {"layer_pairs": [[0, 1]], "weights": {"task": 1.0}},
    }
    new = {
        "train": {"lr": 0.001, "log_every": 5, "progress": False, "output_dir": "/b"},
        "eval": {"batch_size": 2},
        "distill": {"layer_pairs": [[0, 0]], "weights": {"task": 1.0, "logit": 0.5}},
    }
    assert changed_fields(old, new) == [
        ("distill.layer_pairs", [[0, 1]], [[0, 0]]),
        ("distill.weights.logit", None, 0.5),
    ]


def test_the_record_holds_resolved_paths_so_the_same_file_named_two_ways_is_no_change(tmp_path):
    path = write_causal_config(tmp_path)
    cfg = load_config(path)
    record = cfg.resolved()
    assert record["data"]["train"] == str(tmp_path / "train.jsonl")
    assert record["selection"]["path"] == str(tmp_path / "out" / "selection.safetensors")
    moved = load_config(path, [f"data.train={tmp_path / 'train.jsonl'}"])
    assert changed_fields(record, moved.resolved()) == []
    other = load_config(path, ["data.train=other.jsonl"])
    assert changed_fields(record, other.resolved()) == [
        ("data.train", str(tmp_path / "train.jsonl"), str(tmp_path / "other.jsonl"))
    ]


def test_starting_over_with_another_seed_names_the_stale_selection_to_delete(tmp_path, capsys):
    """The teacher built from a config depends on train.seed, so the selection scored on the old one
    does not fit it; the message says what to delete, which the CLI can do (no check_weights escape)."""
    path = write_causal_config(tmp_path, train={"max_steps": 2, "checkpoint_every": 2})
    assert main(["distill", str(path)]) == 0
    capsys.readouterr()
    assert main(["distill", str(path), "--set", "train.seed=1"]) == 2
    assert "train.seed: 0 -> 1" in _error_line(capsys)
    assert main(["distill", str(path), "--set", "train.seed=1", "--set", "train.resume=false"]) == 2
    selection = tmp_path / "out" / "selection.safetensors"
    assert f"to score this teacher again, delete {selection}" in capsys.readouterr().err
    selection.unlink()
    assert main(["distill", str(path), "--set", "train.seed=1", "--set", "train.resume=false"]) == 0
    assert main(["distill", str(path), "--set", "train.seed=1"]) == 0
    assert "resuming from step 2 of 2" in capsys.readouterr().err


def test_a_field_a_later_flexkd_added_resumes_at_its_default_only(tmp_path):
    """A run recorded before ``data.group_by_length`` existed resumes when the field keeps its default."""
    cfg = load_config(write_causal_config(tmp_path))
    record = cfg.resolved()
    del record["data"]["group_by_length"]
    assert changed_fields(record, cfg.resolved()) == []
    grouped = load_config(write_causal_config(tmp_path), ["data.group_by_length=true"])
    assert changed_fields(record, grouped.resolved()) == [("data.group_by_length", None, True)]
