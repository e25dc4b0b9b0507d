"""Files flexkd writes get the process umask's modes (666/777 less the umask), as a plain ``open`` would:
the temporary-file writers behind atomic writes (``mkstemp``, ``mkdtemp``) and safetensors would
otherwise leave 0600/0700."""

import os
import stat

import _tiny_hf as tiny
import pytest

from flexkd._io import process_umask, write_text
from flexkd.training.run_dir import save_student


@pytest.fixture(params=[0o022, 0o027], ids=["umask-022", "umask-027"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_process_umask_is_read_without_changing_it(umask):
    assert process_umask() == umask
    assert process_umask() == umask


def test_atomic_writes_follow_the_umask(tmp_path, umask):
    assert _mode(write_text(tmp_path / "a.txt", "x")) == 0o666 & ~umask


def test_the_student_folder_follows_the_umask(tmp_path, umask):
    target = tmp_path / "student"
    save_student(tiny.build("gpt2"), None, target)
    files = [p for p in target.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: _mode(p) for p in files} == {p.name: 0o666 & ~umask for p in files}
    assert _mode(target) == 0o777 & ~umask


def test_a_checkpoint_follows_the_umask(tmp_path, umask):
    from test_checkpoint import _two_checkpoints

    _two_checkpoints(tmp_path)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    assert {str(p): _mode(p) for p in files} == {str(p): 0o666 & ~umask for p in files}


def _modes_under(folder):
    return {str(p): _mode(p) for p in [folder, *folder.rglob("*")]}


def _expected_modes(folder, umask):
    return {str(p): (0o777 if p.is_dir() else 0o666) & ~umask for p in [folder, *folder.rglob("*")]}


def test_a_teacher_output_store_follows_the_umask(tmp_path, umask):
    from flexkd.teacher_outputs import write_teacher_outputs
    from flexkd.training import Collator

    rows = [{"input_ids": [3, 4, 5], "attention_mask": [1, 1, 1], "labels": [3, 4, 5]}] * 2
    store = write_teacher_outputs(
        tiny.build("gpt2"), rows, tmp_path / "store", layers=[-1], topk=2,
        collate=Collator("causal_lm", pad_token_id=0), progress=False,
    )  # fmt: skip
    assert any(p.name == "logit_indices.npy" for p in store.path.iterdir())
    assert _modes_under(store.path) == _expected_modes(store.path, umask)


def test_the_labs_teacher_cache_follows_the_umask(tmp_path):
    pytest.importorskip("flexkd_lab")
    from flexkd_lab.tasks import get_task
    from flexkd_lab.tasks.teacher_cache import get_teacher
    from flexkd_lab.tasks.training import FitConfig

    old = os.umask(0o027)
    try:
        cached = get_teacher(
            get_task("debian-sections", max_length=16), tmp_path, device="cpu", eval_limit=2,
            fit_config=FitConfig(max_steps=1, batch_size=4, train_limit=4), progress=False,
        )  # fmt: skip
    finally:
        os.umask(old)
    entry = tmp_path / os.path.basename(cached.path)
    assert any(p.suffix == ".safetensors" for p in entry.iterdir())
    assert _modes_under(entry) == _expected_modes(entry, 0o027)
