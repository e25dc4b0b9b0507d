"""``flexkd demo --quick`` end to end: a tiny slice and tiny models, into a temporary run folder."""

from __future__ import annotations

import json

import pytest

from flexkd.cli import main
from flexkd_lab.experiments.budget import demo_budget
from flexkd_lab.experiments.kits import QUICK_TASK_CONFIG, build_kit
from flexkd_lab.experiments.methods import DEMO_METHODS, get_method


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out, cache = root / "run", root / "cache"
    code = main(
        [
            "demo",
            "--quick",
            "--no-progress",
            "--out",
            str(out),
            "--cache-dir",
            str(cache),
            "--seed",
            "3",
        ]
    )
    return code, out, cache


def test_demo_quick_writes_the_run_folder(demo_run, capsys):
    code, out, _ = demo_run
    assert code == 0
    for name in (
        "results.md",
        "results.json",
        "importance.png",
        "learning_curves.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert [p.name for p in out.glob("selection-top-*.safetensors")] == [
        "selection-top-last-n16.safetensors"
    ]
    for method in DEMO_METHODS:  # each student and its metrics stay in the run folder
        run = out / "runs" / method / "seed-3"
        assert (run / "student" / "model.safetensors").is_file(), method
        assert (run / "metrics.jsonl").stat().st_size > 0 and (run / "run_config.json").is_file()


def test_demo_quick_compares_the_three_methods_under_one_budget(demo_run):
    _, out, _ = demo_run
    report = json.loads((out / "results.json").read_text())
    assert report["seed"] == 3 and report["quick"] is True
    results = report["results"]
    assert sorted(results) == sorted(DEMO_METHODS)
    for name, result in results.items():
        assert (
            0.0 <= result["metrics"]["accuracy"] <= 1.0
            and 0.0 <= result["metrics"]["macro_f1"] <= 1.0
        )
        assert result["steps"] == report["budget"]["steps"]
        assert result["budget"] == report["budget"]
        assert len(result["curve"]) == result["steps"]
        feature_losses = [r["feature"] for r in result["curve"]]
        assert (max(feature_losses) > 0) == (get_method(name).feature != "none")
    table = (out / "results.md").read_text()
    for name in DEMO_METHODS:
        assert get_method(name).label in table
    assert (
        report["selection"]["k"] == QUICK_TASK_CONFIG["debian-sections"]["student_hidden"]
    )  # k = the student's width
    assert set(report["timing"]["wall_seconds"]) >= {
        "teacher (fine-tune or cache)",
        "score + select",
        "total",
    }


def test_demo_quick_reuses_the_cached_teacher(demo_run):
    _, out, cache = demo_run
    (teacher,) = [p for p in (cache / "teachers").iterdir() if not p.name.startswith(".")]
    stamp = (teacher / "flexkd_teacher.json").stat().st_mtime_ns
    kit = build_kit(
        "debian-sections", demo_budget(quick=True), cache_dir=cache, quick=True, progress=False
    )
    assert kit.teacher_dir == str(teacher)
    assert [p.name for p in (cache / "teachers").iterdir() if not p.name.startswith(".")] == [
        teacher.name
    ]
    assert (teacher / "flexkd_teacher.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["teacher"] == kit.teacher_description


def test_demo_rejects_a_negative_seed(tmp_path, capsys):
    assert main(["demo", "--quick", "--seed", "-1", "--out", str(tmp_path)]) == 2
    assert "--seed" in capsys.readouterr().err
