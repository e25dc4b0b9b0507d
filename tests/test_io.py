"""Crash-safe writes leave either the old content or the new one, never a partial file."""

import json

import pytest

from flexkd import _io


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "result.json"
    _io.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), _io.atomic_open(target) as handle:
        handle.write('{"a": 2, "trunc')
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_atomic_path_and_replace_dir(tmp_path):
    with _io.atomic_path(tmp_path / "plot.png", suffix=".png") as tmp:
        tmp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"
    for version in ("old", "new"):
        staging = tmp_path / f".staging-{version}"
        staging.mkdir()
        (staging / "weights").write_text(version)
        _io.replace_dir(staging, tmp_path / "model")
    assert (tmp_path / "model" / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "plot.png"]
