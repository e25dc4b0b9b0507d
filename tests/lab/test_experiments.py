"""The experiments package: the teacher-check hook, the study's resumable result store and plan, tables."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from _tiny_hf import HIDDEN, LAYERS, build, padded_batch

from flexkd._io import write_json
from flexkd.taps import LayerTap
from flexkd_lab.experiments import study as study_module
from flexkd_lab.experiments.budget import RunBudget
from flexkd_lab.experiments.store import ResultStore
from flexkd_lab.experiments.tables import markdown_table, mean_std, method_columns, summarize
from flexkd_lab.experiments.teacher_check import (
    ZeroDims,
    run_teacher_check,
    teacher_check_conditions,
)


# ---------------------------------------------------------------------------------------------- teacher check
def _hidden_at(model, layer, batch):
    with torch.no_grad(), LayerTap(model, [layer]) as tap:
        tap.run(**batch)
        return tap.hidden[layer].clone()


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("layer", [0, 1, -1])
def test_zero_dims_zeroes_exactly_the_chosen_dims(family, layer):
    model = build(family)
    batch = {k: v for k, v in padded_batch().items() if k != "labels"}
    dims = torch.randperm(HIDDEN)[: int(torch.randint(1, HIDDEN, ()))]
    before = _hidden_at(model, layer, batch)
    with ZeroDims(model, layer, dims):
        during = _hidden_at(model, layer, batch)
    after = _hidden_at(model, layer, batch)

    zeroed = torch.zeros(HIDDEN, dtype=torch.bool)
    zeroed[dims] = True
    assert torch.all(during[..., zeroed] == 0)
    torch.testing.assert_close(during[..., ~zeroed], before[..., ~zeroed])
    assert before[..., zeroed].abs().sum() > 0  # the dims really held something
    torch.testing.assert_close(after, before)  # the hook is gone afterwards


def test_zero_dims_changes_what_the_layers_above_see():
    model = build("bert")
    batch = {k: v for k, v in padded_batch().items() if k != "labels"}
    with torch.no_grad():
        clean = model(**batch).logits
        with ZeroDims(model, 1, torch.arange(HIDDEN // 2)):
            hit = model(**batch).logits
    assert not torch.allclose(clean, hit)


@pytest.mark.parametrize(
    "dims, error",
    [
        ([0, 0], ValueError),
        ([HIDDEN], ValueError),
        ([-1], ValueError),
        ([[0, 1]], TypeError),
        ([0.5], TypeError),
    ],
)
def test_zero_dims_rejects_bad_dims(dims, error):
    with pytest.raises(error, match="dims"):
        ZeroDims(build("bert"), -1, dims)


def test_zero_dims_rejects_bad_layer():
    with pytest.raises(ValueError, match="layer"):
        ZeroDims(build("bert"), LAYERS + 1, [0])


def test_teacher_check_conditions_pick_top_k_and_lowest_half():
    scores = torch.rand(10)
    conditions = teacher_check_conditions(scores, 3, seed=1)
    order = torch.argsort(scores, descending=True)
    assert conditions["intact"].numel() == 0
    assert set(conditions["zero top-3"].tolist()) == set(order[:3].tolist())
    assert set(conditions["zero lowest 5 (half)"].tolist()) == set(order[5:].tolist())
    assert set(conditions["zero bottom-3"].tolist()) == set(order[7:].tolist())
    half = teacher_check_conditions(scores, 5)  # k = width / 2: the bottom-k is the lowest half
    assert set(half) == {"intact", "zero top-5", "zero random 5", "zero bottom-5"}
    random_dims = conditions["zero random 3"]
    assert random_dims.numel() == 3 and random_dims.unique().numel() == 3
    with pytest.raises(ValueError, match="k"):
        teacher_check_conditions(scores, 11)


def test_run_teacher_check_evaluates_under_each_condition():
    model = build("bert")
    batch = {k: v for k, v in padded_batch().items() if k != "labels"}
    zero_counts = []

    def evaluate(teacher):
        hidden = _hidden_at(teacher, -1, batch)
        zero_counts.append(int((hidden == 0).all(dim=(0, 1)).sum()))
        return {"zeros": float(zero_counts[-1])}

    rows = run_teacher_check(model, {-1: torch.rand(HIDDEN)}, 4, evaluate)
    assert [r["dims_zeroed"] for r in rows] == [0, 4, 4, 4, HIDDEN // 2]
    assert [r["layer"] for r in rows] == [None, -1, -1, -1, -1]
    assert zero_counts == [0, 4, 4, 4, HIDDEN // 2]


def test_run_teacher_check_evaluates_intact_once_and_each_layer():
    model = build("bert")
    calls = []
    rows = run_teacher_check(
        model, {1: torch.rand(HIDDEN), 2: torch.rand(HIDDEN)}, 4, lambda m: calls.append(1) or {}
    )
    assert len(calls) == 1 + 2 * 4
    assert [(r["layer"], r["condition"]) for r in rows][:2] == [(None, "intact"), (1, "zero top-4")]
    with pytest.raises(ValueError, match="scores"):
        run_teacher_check(model, {}, 4, lambda m: {})


# ---------------------------------------------------------------------------------------------- store
def test_result_store_round_trip_and_atomic_files(tmp_path):
    store = ResultStore(tmp_path)
    assert not store.has("t", "m", 0)
    path = store.write("t", "m", 0, {"metrics": {"accuracy": 0.5}})
    assert store.has("t", "m", 0) and path.name == "seed-0.json"
    assert store.read("t", "m", 0)["metrics"] == {"accuracy": 0.5}
    assert [p.name for p in path.parent.iterdir()] == ["seed-0.json"]  # no temp file left behind
    store.write("t", "a", 2, {"metrics": {}})
    assert [(r["method"], r["seed"]) for r in store.all()] == [("a", 2), ("m", 0)]


@pytest.mark.parametrize(
    "task, method, seed", [("../x", "m", 0), ("t", "a/b", 0), ("t", "m", -1), ("t", "m", True)]
)
def test_result_store_rejects_unsafe_keys(tmp_path, task, method, seed):
    with pytest.raises(ValueError):
        ResultStore(tmp_path).path(task, method, seed)


def test_result_store_reports_a_corrupt_file(tmp_path):
    store = ResultStore(tmp_path)
    store.path("t", "m", 0).parent.mkdir(parents=True)
    store.path("t", "m", 0).write_text("{not json")
    with pytest.raises(ValueError, match="seed-0.json"):
        store.all()


def test_write_json_atomic_keeps_the_old_file_when_serialisation_fails(tmp_path):
    target = tmp_path / "r.json"
    write_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# ---------------------------------------------------------------------------------------------- tables
def test_mean_std_and_summary():
    assert mean_std([1.0]) == (1.0, 0.0)
    mean, std = mean_std([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0) and std == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mean_std([])
    records = [
        {"task": "t", "method": "m", "metrics": {"acc": a}, "train_seconds": s}
        for a, s in ((0.5, 10), (0.7, 20))
    ]
    (row,) = summarize(records, ["acc", "train_seconds"])
    assert (
        row["seeds"] == 2
        and row["acc_mean"] == pytest.approx(0.6)
        and row["train_seconds_mean"] == 15
    )
    assert row["acc"] == f"0.600 ± {mean_std([0.5, 0.7])[1]:.3f}"


def test_markdown_table_layout():
    text = markdown_table([{"a": 1, "b": 0.12345}, {"a": "x"}], [("a", "A"), ("b", "B")])
    assert text.splitlines() == ["| A | B |", "|---|---|", "| 1 | 0.123 |", "| x |  |"]


def test_method_columns_are_the_demo_and_study_headers():
    """One definition of the per-method table: the demo's (no seeds) and the study's (with seeds)."""
    demo = method_columns(("accuracy", "macro_f1"))
    assert [h for _, h in demo] == [
        "method", "layers; feature weight", "accuracy", "macro-F1", "train time (s)"
    ]  # fmt: skip
    ablation = method_columns(("rouge_l", "other"), seeds=True, timing=False)
    assert ablation == [
        ("label", "method"), ("knobs", "layers; feature weight"), ("seeds", "seeds"),
        ("rouge_l", "ROUGE-L"), ("other", "other"),
    ]  # fmt: skip


def test_selection_profile_measures_the_selected_dims():
    from flexkd.selection import DimensionSelection
    from flexkd_lab.experiments.profile import selection_profile

    model = build("bert")
    batch = {k: v for k, v in padded_batch().items() if k != "labels"}
    hidden = _hidden_at(model, -1, batch)
    mean_abs = (hidden.abs() * batch["attention_mask"][..., None]).sum((0, 1))
    k = 5
    loudest = DimensionSelection.from_scores({-1: mean_abs}, k, teacher=model)
    profile = selection_profile(model, loudest, [batch])
    assert profile["overlap_with_top_abs"] == pytest.approx(1.0)
    assert profile["mean_abs_ratio"] > 1.0
    assert profile["energy_share_uniform"] == pytest.approx(k / HIDDEN)
    energy = (hidden.square() * batch["attention_mask"][..., None]).sum((0, 1))
    expected = float(energy[loudest.index(-1)].sum() / energy.sum())
    assert profile["energy_share_selected"] == pytest.approx(expected, rel=1e-5)
    quietest = DimensionSelection.from_scores({-1: -mean_abs}, k, teacher=model)
    assert selection_profile(model, quietest, [batch])["overlap_with_top_abs"] == 0.0


# ---------------------------------------------------------------------------------------------- tuned knobs
def _tuned_budget(**tuned):
    return RunBudget(
        train_examples=8, score_examples=8, eval_examples=8, batch_size=4, steps=1, lr=1e-3,
        layer_pairs="last", tuned=tuned,
    )  # fmt: skip


def test_budget_applies_a_methods_tuned_knobs_and_defaults_the_rest():
    budget = _tuned_budget(**{"flex-corr": {"layer_pairs": [[2, 3]], "feature_weight": 0.1}})
    assert budget.layer_pairs_for("flex-corr") == [[2, 3]]
    assert budget.weights_for("flex-corr") == {"task": 1.0, "logit": 1.0, "feature": 0.1}
    assert budget.layer_pairs_for("projector") == "last"
    assert budget.weights_for("projector") == budget.weights
    with pytest.raises(ValueError, match="tuned"):
        _tuned_budget(cka={"lr": 1.0})


def test_experiment_config_uses_the_tuned_knobs_of_the_methods_top_k_counterpart(tmp_path):
    from flexkd_lab.experiments.pipeline import Experiment

    budget = _tuned_budget(
        **{
            "flex-corr": {"layer_pairs": [[2, 3]], "feature_weight": 0.5},
            "cka": {"layer_pairs": [[1, 2]]},
        }
    )
    experiment = Experiment(SimpleNamespace(), budget, tmp_path, progress=False)
    assert experiment.teacher_layers == [-1, 2, 3]  # one selection file covers every method
    assert experiment.teacher_layers_of("flex-corr") == [3]
    ablation = study_module.get_method("flex-corr-random")
    assert ablation.tuned_as == "flex-corr" and ablation.which == "random"
    assert budget.weights_for(ablation.tuned_as)["feature"] == 0.5
    assert study_module.get_method("flex-mse").tuned_as == "flex-mse"


def test_experiment_training_data_follows_the_budgets_row_count(tmp_path):
    """A budget with more rows must not train on the folder an earlier, smaller budget wrote."""
    import datasets

    from flexkd_lab.experiments.pipeline import Experiment

    rows = datasets.Dataset.from_list([{"input_ids": [i], "labels": i} for i in range(8)])
    for n in (4, 8, 4):
        kit = SimpleNamespace(train_rows=rows.select(range(n)))
        path = Experiment(kit, _tuned_budget().with_(train_examples=n), tmp_path)._train_data()
        assert datasets.load_from_disk(str(path))["labels"] == list(range(n))


def test_sections_tuning_is_what_the_committed_diagnosis_chose():
    """``SECTIONS_TUNED`` is not hand-picked: it is the grid's best per method in benchmarks/results."""
    import importlib.util
    from pathlib import Path

    from flexkd_lab.experiments.budget import SECTIONS_TUNED

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location(
        "diagnose", root / "benchmarks/quality/diagnose.py"
    )
    diagnose = importlib.util.module_from_spec(spec)
    sys.modules["diagnose"] = diagnose  # dataclasses look their module up
    spec.loader.exec_module(diagnose)
    chosen = diagnose.tuning_choice(ResultStore(root / "benchmarks/results/diagnosis-runs"))
    assert {m: {k: c[k] for k in ("layer_pairs", "feature_weight")} for m, c in chosen.items()} == (
        SECTIONS_TUNED
    )
