"""The lab's subcommands reach ``flexkd`` through the ``flexkd.commands`` entry-point group."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flexkd import cli

REPO = Path(__file__).resolve().parents[2]


def _run_cli_and_list_heavy_imports(argv: list[str]) -> dict:
    """Runs ``flexkd <argv>`` in a fresh interpreter; returns its exit code, stdout and which of
    torch/transformers/datasets it imported."""
    code = f"""
import contextlib, io, json, sys
from flexkd.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        exit_code = main({argv!r})
    except SystemExit as exit:
        exit_code = exit.code
heavy = sorted(m for m in ("torch", "transformers", "datasets") if m in sys.modules)
print(json.dumps({{"code": exit_code, "stdout": out.getvalue(), "heavy": heavy}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_lab_registers_demo_study_and_teacher_as_entry_points():
    entries = {e.name: e.value for e in importlib.metadata.entry_points(group=cli.ENTRY_POINT_GROUP)}
    assert entries == {
        "demo": "flexkd_lab.commands.demo",
        "study": "flexkd_lab.commands.study",
        "teacher": "flexkd_lab.commands.teacher",
    }
    found = cli.plugin_subcommands()
    assert {name: module for name, (module, _) in found.items()} == entries
    assert all(help_text for _, help_text in found.values())
    assert not set(found) & set(cli.SUBCOMMANDS)  # the library itself carries neither


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["study", "--help"]])
def test_listing_and_help_import_nothing_heavy(argv):
    result = _run_cli_and_list_heavy_imports(argv)
    assert result["code"] == 0
    assert result["heavy"] == [], f"flexkd {' '.join(argv)} imported {result['heavy']}"
    if argv == ["--help"]:
        for name in ("info", "score", "distill", "eval", "bench", "demo", "study"):
            assert f"    {name} " in result["stdout"], name
    else:
        assert "--quick" in result["stdout"] and "--seed" in result["stdout"]


def test_a_plugin_cannot_take_a_library_subcommand(monkeypatch):
    group = cli.ENTRY_POINT_GROUP
    fake = [
        importlib.metadata.EntryPoint("info", "flexkd_lab.commands.demo", group),
        importlib.metadata.EntryPoint("study", "flexkd_lab.commands.study", group),
        importlib.metadata.EntryPoint("study", "flexkd_lab.commands.demo", group),  # a second copy
    ]
    monkeypatch.setattr(cli.importlib.metadata, "entry_points", lambda group: fake)
    assert cli.plugin_subcommands() == {
        "study": ("flexkd_lab.commands.study", "the quality study (all methods, seeds and ablations)")
    }


def test_a_plugin_that_does_not_import_leaves_the_library_commands_working(monkeypatch, capsys):
    """An editable plugin installed from a folder that has moved: its entry point names a module that
    no longer imports. The library's subcommands still parse; the plugin's is left out with a warning."""
    group = cli.ENTRY_POINT_GROUP
    broken = importlib.metadata.EntryPoint("study", "flexkd_lab_moved_away.commands.study", group)
    monkeypatch.setattr(cli.importlib.metadata, "entry_points", lambda group: [broken])
    assert cli.plugin_subcommands() == {}
    assert "subcommand 'study' from flexkd_lab_moved_away.commands.study is not available" in capsys.readouterr().err
    args = cli.build_parser(["info"]).parse_args(["info"])
    assert args.command == "info"


def test_study_writes_under_the_current_directory_by_default():
    args = cli.build_parser(["study"]).parse_args(["study"])
    assert args.out == Path("flexkd-study") and not args.out.is_absolute()
    assert args.methods is None  # the study's own list, resolved when it runs, not at --help


def test_run_study_script_writes_the_committed_results(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "run_study", REPO / "benchmarks/quality/run_study.py"
    )
    run_study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_study)
    seen = []

    def record(args):
        seen.append(args)
        return 0

    monkeypatch.setattr("flexkd_lab.commands.study.run", record)
    assert run_study.main(["--report-only"]) == 0
    assert [args.out for args in seen] == [REPO / "benchmarks" / "results"]
