"""Checkpoints are complete or ignored: a manifest of sizes and sha256 written last is checked before
loading, a damaged checkpoint is skipped for the newest intact one, and every file that still fails to
load is named in one line."""

import json

import pytest
import torch
from _train_helpers import STUDENT_HIDDEN, build, gpt2_config

from flexkd.checkpoint import (
    MANIFEST,
    RunState,
    load_checkpoint,
    resume_point,
    save_checkpoint,
    verify_checkpoint,
)
from flexkd.errors import DamagedCheckpointError, FlexKDError, ResumeMismatchError

FILES = [
    "student/model.safetensors",
    "student/config.json",
    "feature_losses.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "state.json",
    "rng/rank-0.pt",
]


def _parts(seed=0):
    student = build(gpt2_config(STUDENT_HIDDEN, 1), seed=seed)
    projector = torch.nn.Linear(STUDENT_HIDDEN, 8)
    params = [*student.parameters(), *projector.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return student, projector, optimizer, scheduler


def _step(student, projector, optimizer, scheduler):
    ids = torch.randint(3, 64, (2, 6))
    loss = student(input_ids=ids, labels=ids).loss + projector(torch.randn(2, STUDENT_HIDDEN)).sum()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _two_checkpoints(root):
    parts = _parts()
    for step in (1, 2, 3, 4):
        _step(*parts)
        if step % 2 == 0:
            save_checkpoint(
                root,
                state=RunState(step=step, epoch=0, position=step, seed=0, world_size=1),
                student=parts[0],
                feature_losses=parts[1],
                optimizer=parts[2],
                scheduler=parts[3],
            )
    return parts


def _load(path, **kwargs):
    student, projector, optimizer, scheduler = _parts(seed=1)
    state = load_checkpoint(
        path,
        student=student,
        feature_losses=projector,
        optimizer=optimizer,
        scheduler=scheduler,
        **kwargs,
    )
    return state, student, projector


def test_manifest_lists_every_file_and_an_intact_checkpoint_restores_exactly(tmp_path):
    student, projector, _, _ = _two_checkpoints(tmp_path)
    newest = tmp_path / "step-000004"
    manifest = json.loads((newest / MANIFEST).read_text())
    assert set(FILES) <= set(manifest["files"])
    for name, entry in manifest["files"].items():
        assert entry["size"] == (newest / name).stat().st_size
    verify_checkpoint(newest)
    assert resume_point(tmp_path) == (newest, [])
    state, loaded, loaded_projector = _load(newest)
    assert state.step == 4
    for name, value in student.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    assert torch.equal(projector.weight, loaded_projector.weight)


def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _flip_a_byte(file):
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte, lambda f: f.unlink()])
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_file_makes_resume_fall_back_naming_it(tmp_path, name, damage):
    _two_checkpoints(tmp_path)
    file = tmp_path / "step-000004" / name
    damage(file)
    found, skipped = resume_point(tmp_path)
    assert found == tmp_path / "step-000002"
    [(path, reason)] = skipped
    assert path == tmp_path / "step-000004"
    assert str(file) in reason and "\n" not in reason
    with pytest.raises(DamagedCheckpointError, match=str(file)):
        verify_checkpoint(path)


@pytest.mark.parametrize(
    "manifest_damage, says",
    [
        (lambda f: f.unlink(), "missing"),
        (_truncate, "not valid JSON"),
        (lambda f: f.write_text("[1, 2]"), "manifest"),
    ],
)
def test_a_missing_or_broken_manifest_skips_the_checkpoint(tmp_path, manifest_damage, says):
    _two_checkpoints(tmp_path)
    manifest_damage(tmp_path / "step-000004" / MANIFEST)
    found, [(_, reason)] = resume_point(tmp_path)
    assert found.name == "step-000002"
    assert str(tmp_path / "step-000004" / MANIFEST) in reason and says in reason


def test_a_file_that_fails_to_load_is_named_in_one_line(tmp_path):
    """Past the manifest (written by hand, or damaged before the manifest was computed), a reader's own
    error (PytorchStreamReader, SafetensorError, JSONDecodeError) is reported naming the file."""
    _two_checkpoints(tmp_path)
    newest = tmp_path / "step-000004"
    for name in ("optimizer.pt", "feature_losses.safetensors", "state.json"):
        file = newest / name
        original = file.read_bytes()
        _truncate(file)
        with pytest.raises(DamagedCheckpointError) as caught:
            _load(newest)
        assert isinstance(caught.value, FlexKDError)
        assert str(caught.value).startswith(f"{file}: ") and "\n" not in str(caught.value)
        file.write_bytes(original)


def test_a_checkpoint_of_another_world_size_is_refused(tmp_path):
    _two_checkpoints(tmp_path)
    with pytest.raises(ResumeMismatchError, match="written by 1 processes, this run has 2"):
        _load(tmp_path / "step-000004", world_size=2)


def test_no_checkpoints_is_no_resume_point(tmp_path):
    assert resume_point(tmp_path / "absent") == (None, [])
