"""The study's plan, validation-grid choice, resumable keyed store and report (a fake experiment: fast),
and the real --quick study killed with SIGKILL and resumed (tests/lab/test_study_resume.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from flexkd.errors import ResumeMismatchError
from flexkd_lab.experiments import study as study_module
from flexkd_lab.experiments.budget import RunBudget, TuningGrid
from flexkd_lab.experiments.store import ResultStore
from flexkd_lab.experiments.study import (
    RESULTS_FOLDER,
    Run,
    StudyPlan,
    compact_curve,
    decode_labels,
    encode_labels,
    grid_choice,
)

REFERENCES = [i % 4 for i in range(40)]
# validation accuracy of flex-corr by feature weight: weight 1 wins the grid
FLEX_RIGHT = {0.5: 10, 1.0: 30}


def _right(method, knobs, seed):
    """How many of the 40 rows the fake student gets right."""
    if method == "none":
        return 12 + seed
    if method == "flex-corr-random":
        return 14 + seed
    if method in ("cka", "flex-cka"):
        return {"cka": 20, "flex-cka": 26}[method] + seed
    return FLEX_RIGHT[knobs["feature_weight"]] + seed


class FakeExperiment:
    calls: list = []
    run_names: list = []

    def __init__(self, kit, budget, work_dir, progress=True, layer_pairs=()):
        self.kit = kit

    def run(self, method, seed, *, knobs=None, splits=(), run_name=None):
        FakeExperiment.run_names.append((run_name, seed))
        FakeExperiment.calls.append(
            (method.name, None if knobs is None else knobs["feature_weight"], seed)
        )
        right = _right(method.name, knobs, seed)
        predictions = [r if i < right else (r + 1) % 4 for i, r in enumerate(REFERENCES)]
        metrics = {"accuracy": right / len(REFERENCES), "macro_f1": 0.1}
        return {
            "method_label": method.label,
            "metrics": metrics,
            "splits": {s: {"metrics": metrics, "predictions": predictions} for s in splits},
            "references": {s: REFERENCES for s in splits},
            "train_seconds": 1.0,
            "curve": [{"step": i + 1, "task": 3.0 - i / 10, "total": 4.0} for i in range(5)],
            "teacher": self.kit.teacher_dir,
        }


@pytest.fixture
def fake_study(monkeypatch, tmp_path):
    """The study with fake experiments; ``teacher["key"]``/``["weights"]`` set the cached teacher's
    recipe key and weight bytes (a folder under tmp_path written when the kit is built)."""
    FakeExperiment.calls, FakeExperiment.run_names = [], []
    teacher = {"key": "teacher-key-1", "weights": b"weights-1"}

    def build_kit(task, budget, **kw):
        folder = tmp_path / "teachers" / teacher["key"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").write_bytes(teacher["weights"])
        return SimpleNamespace(name=task, teacher_dir=str(folder))

    monkeypatch.setattr(study_module, "build_kit", build_kit)
    monkeypatch.setattr(study_module, "Experiment", FakeExperiment)
    FakeExperiment.teacher = teacher
    return FakeExperiment


@pytest.fixture
def no_plots(monkeypatch):
    """The report without its PNGs (matplotlib costs seconds per rewrite; one test draws them)."""
    from flexkd_lab.experiments import study_report

    for name in ("plot_learning_curves", "plot_mean_std_bars", "plot_teacher_check"):
        monkeypatch.setattr(study_report, name, lambda *a, **k: None)


def _budget(**changes):
    options = dict(
        train_examples=8, score_examples=8, eval_examples=8, batch_size=4, steps=1, lr=1e-3
    )
    return RunBudget(**{**options, **changes})


def _plan(**changes):
    options = dict(
        pairs=("minilm-tiny",),
        methods=("none", "flex-corr", "flex-corr-random"),
        seeds=(0, 1, 2),
        teacher_check=False,
        budgets={"minilm-tiny": _budget()},
        grids={"minilm-tiny": TuningGrid((0.5, 1.0), ("last",), seeds=(0, 1))},
    )
    return StudyPlan(**{**options, **changes})


def _run(tmp_path, plan, out="out"):
    return study_module.run_study(
        tmp_path / out,
        plan,
        cache_dir=tmp_path / "cache",
        work_dir=tmp_path / "work",
        command="flexkd study --test",
        log=lambda _: None,
    )


def test_plan_tunes_top_k_methods_on_the_grid_and_runs_every_method_seed_major():
    plan = _plan()
    assert plan.tuned_methods() == ["flex-corr"]  # random-k runs at flex-corr's choice
    assert [
        (r.method, r.knobs["feature_weight"], r.seed) for r in plan.grid_runs("minilm-tiny")
    ] == [
        ("flex-corr", 0.5, 0),
        ("flex-corr", 1.0, 0),
        ("flex-corr", 0.5, 1),
        ("flex-corr", 1.0, 1),
    ]
    knobs = {"layer_pairs": "last", "feature_weight": 1.0}
    finals = plan.final_runs("minilm-tiny", {"flex-corr": knobs})
    assert [(r.method, r.seed) for r in finals[:3]] == [
        ("none", 0),
        ("flex-corr", 0),
        ("flex-corr-random", 0),
    ]
    assert finals[0].folder == "none" and finals[1].folder == "flex-corr.last-w1"


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"methods": ("bogus",)}, "method"),
        ({"pairs": ("nope",)}, "pair"),
        ({"seeds": (0,)}, "seeds"),
        ({"seeds": (0, 0)}, "distinct"),
        ({"seeds": (-1, 0)}, "seeds"),
    ],
)
def test_plan_rejects_bad_input(changes, match):
    with pytest.raises(ValueError, match=match):
        _plan(**changes)


def test_tuning_grid_needs_two_seeds_per_point():
    with pytest.raises(ValueError, match=">= 2 seeds"):
        TuningGrid((1.0,), ("last",), seeds=(0,))


def test_a_changed_budget_is_keyed_apart_and_seeds_are_not():
    plan = _plan()
    assert plan.group("minilm-tiny") == _plan(seeds=(0, 1, 2, 3)).group("minilm-tiny")
    assert plan.group("minilm-tiny") != _plan(budgets={"minilm-tiny": _budget(steps=2)}).group(
        "minilm-tiny"
    )


def test_study_chooses_on_validation_reuses_grid_runs_and_resumes(tmp_path, fake_study, no_plots):
    plan = _plan()
    summary = _run(tmp_path, plan)
    store = ResultStore(tmp_path / "out" / RESULTS_FOLDER)
    assert grid_choice(plan, store, "minilm-tiny") == {
        "flex-corr": {"layer_pairs": "last", "feature_weight": 1.0}
    }
    # the grid's seeds 0 and 1 at weight 1 are the final runs' seeds 0 and 1: not run twice
    assert sorted(c for c in fake_study.calls if c[0] == "flex-corr") == [
        ("flex-corr", 0.5, 0), ("flex-corr", 0.5, 1),
        ("flex-corr", 1.0, 0), ("flex-corr", 1.0, 1), ("flex-corr", 1.0, 2),
    ]  # fmt: skip
    assert ("flex-corr-random", 1.0, 2) in fake_study.calls
    # each (method, knobs, seed) trains in its own scratch folder: parallel grid points never share one
    assert len(set(fake_study.run_names)) == len(fake_study.run_names)
    assert ("flex-corr.last-w0.5", 0) in fake_study.run_names
    assert summary["finished_runs"] == summary["planned_runs"] == 4 + 9 - 2
    record = store.read(plan.group("minilm-tiny"), "flex-corr.last-w1", 2)
    assert decode_labels(record["splits"]["test"]["predictions"])[:3] == REFERENCES[:3]
    assert record["knobs"] == {"layer_pairs": "last", "feature_weight": 1.0}

    fake_study.calls.clear()
    _run(tmp_path, plan)
    assert fake_study.calls == []  # everything finished: nothing is recomputed
    _run(tmp_path, _plan(seeds=(0, 1, 2, 3)))
    assert sorted(fake_study.calls) == [
        ("flex-corr", 1.0, 3),
        ("flex-corr-random", 1.0, 3),
        ("none", None, 3),
    ]


def test_study_refuses_to_mix_teachers(tmp_path, fake_study, no_plots):
    _run(tmp_path, _plan())
    fake_study.teacher["key"] = "teacher-key-2"  # the teacher recipe changed, the budget did not
    with pytest.raises(ResumeMismatchError, match="teacher_key differs.*never mixed"):
        _run(tmp_path, _plan())


def test_a_teacher_retrained_to_the_same_bytes_is_one_teacher_in_the_report(tmp_path, fake_study, no_plots):
    """A resumed group's teacher retrained elsewhere to the same bytes records another training time in
    its description: the report still names one teacher (by its key), and only another key is "mixed"."""
    _run(tmp_path, _plan())
    group = tmp_path / "out" / RESULTS_FOLDER / _plan().group("minilm-tiny")
    first, *others = sorted(group.glob("*/seed-*.json"))
    record = json.loads(first.read_text())
    record["teacher"] = "bert hidden 384, 6 layers (973 s when made)"
    first.write_text(json.dumps(record))
    store = ResultStore(group.parent)
    study_module.write_report(tmp_path / "out", _plan(), store, "flexkd study")
    report = (tmp_path / "out" / "study.md").read_text()
    assert "Mixed teachers" not in report and "Teacher: " in report
    record["teacher_key"] = "teacher-key-2"
    first.write_text(json.dumps(record))
    study_module.write_report(tmp_path / "out", _plan(), store, "flexkd study")
    assert "Mixed teachers" in (tmp_path / "out" / "study.md").read_text()


def test_study_refuses_a_retrained_teacher_with_other_weights(tmp_path, fake_study, no_plots):
    _run(tmp_path, _plan())
    group = tmp_path / "out" / RESULTS_FOLDER / _plan().group("minilm-tiny")
    record = json.loads((group / "teacher.json").read_text())
    assert record["teacher_key"] == "teacher-key-1"
    assert record["weights_sha256"] == study_module.teacher_weights_sha256(
        tmp_path / "teachers" / "teacher-key-1"
    )
    assert {"torch", "cpu_capability", "threads", "MKL_CBWR"} <= set(record["machine"])
    finished = sorted(group.glob("*/seed-*.json"))
    # the cache was lost and the same recipe retrained elsewhere: same key, other bytes
    fake_study.teacher["weights"] = b"weights-1, trained on another CPU"
    with pytest.raises(ResumeMismatchError, match="weights_sha256 differs"):
        _run(tmp_path, _plan(seeds=(0, 1, 2, 3)))
    assert sorted(group.glob("*/seed-*.json")) == finished  # nothing was added
    fake_study.teacher["weights"] = b"weights-1"  # the same bytes resume
    _run(tmp_path, _plan(seeds=(0, 1, 2, 3)))
    assert len(sorted(group.glob("*/seed-*.json"))) > len(finished)


def test_report_shows_intervals_and_the_holm_corrected_comparisons(tmp_path, fake_study):
    _run(tmp_path, _plan())
    report = (tmp_path / "out" / "study.md").read_text()
    assert "flexkd study --test" in report and "11 of 11 planned runs finished" in report
    assert "95 % CI" in report and "Holm p" in report
    summary = json.loads((tmp_path / "out" / "study.json").read_text())["pairs"]["minilm-tiny"]
    flex_none = next(c for c in summary["comparisons"] if (c["a"], c["b"]) == ("flex-corr", "none"))
    # 30/31/32 vs 12/13/14 of 40 rows right: +45 points on every seed, no spread
    assert flex_none["difference"] == pytest.approx(45.0)
    assert flex_none["only_a"] == 3 * 18 and flex_none["only_b"] == 0
    assert flex_none["sentence"].startswith("better")
    assert len(summary["comparisons"]) == 2  # the decisive pairs among the plan's methods
    headline = (tmp_path / "out" / "study-headline.md").read_text()
    assert "Flex-KD (corr) − no feature KD" in headline and "±" in headline
    for plot in ("study.png", "study-curves-minilm-tiny.png"):
        assert (tmp_path / "out" / plot).stat().st_size > 0


def test_the_variant_is_its_own_family_and_leaves_the_decisive_one_unchanged(tmp_path, fake_study, no_plots):
    _run(tmp_path, _plan(), out="base")
    _run(tmp_path, _plan(methods=("none", "flex-corr", "flex-corr-random", "cka", "flex-cka")), out="variant")
    base, variant = (
        json.loads((tmp_path / out / "study.json").read_text())["pairs"]["minilm-tiny"] for out in ("base", "variant")
    )
    assert base["variant_comparisons"] == []
    assert {(c["a"], c["b"]) for c in variant["variant_comparisons"]} == {("flex-cka", "cka"), ("flex-cka", "flex-corr")}
    decisive = {(c["a"], c["b"]): c for c in variant["comparisons"]}
    assert ("flex-corr", "cka") in decisive  # cka is in the plan now: a decisive pair
    # flex-corr vs none/random are corrected within the decisive family only: the variant adds no tests to it
    base_p = {(c["a"], c["b"]): c["holm_p"] for c in base["comparisons"]}
    assert len(decisive) == len(base_p) + 1
    report = (tmp_path / "variant" / "study.md").read_text()
    assert "flexkd's variant against its parents (ours, not the paper's" in report
    assert "Flex-KD dims + CKA (flexkd's variant) − CKA" in (tmp_path / "variant" / "study-headline.md").read_text()


def test_report_waits_for_the_grid(tmp_path, fake_study, no_plots):
    plan = _plan()
    store = ResultStore(tmp_path / "out" / RESULTS_FOLDER)
    summary = study_module.write_report(tmp_path / "out", plan, store, "flexkd study")
    assert summary["finished_runs"] == 0 and summary["pairs"]["minilm-tiny"]["choice"] is None
    assert "the grid has not finished" in (tmp_path / "out" / "study.md").read_text()


def test_changed_reference_labels_are_refused(tmp_path):
    store = ResultStore(tmp_path)
    plan = _plan()
    run = Run("minilm-tiny", "none", None, 0)
    study_module._store_result(store, plan, run, {"references": {"test": [0, 1]}, "metrics": {}})
    with pytest.raises(ResumeMismatchError, match="data changed"):
        study_module._store_result(
            store, plan, run._replace(seed=1), {"references": {"test": [1, 1]}}
        )


def test_labels_round_trip_compactly():
    assert encode_labels([3, 0, 17]) == "3,0,17" and decode_labels("3,0,17") == [3, 0, 17]
    assert decode_labels(encode_labels([])) == []


def test_compact_curve_averages_windows_to_at_most_the_points_asked():
    curve = [{"step": i + 1, "task": float(i), "elapsed_s": 0.1} for i in range(250)]
    compact = compact_curve(curve, points=100)
    assert len(compact) == 84 and compact[0] == {"step": 3, "task": 1.0}
    assert compact[-1]["step"] == 250 and compact_curve([]) == []


def test_the_study_pins_the_cpu_kernels_once():
    from flexkd_lab.commands.study import PINNED_KERNELS, pinned_kernel_env

    env = pinned_kernel_env({"PATH": "/bin", "MKL_CBWR": "AUTO"})
    assert env == {"PATH": "/bin", **PINNED_KERNELS}
    assert pinned_kernel_env(env) is None  # the restarted process does not restart again
