"""Stored teacher outputs: a Distiller fed from the store gives the live teacher's terms and gradients; the
store refuses data, teachers and layers it was not made for; training with it gives the same run."""

import json
import random

import pytest
import torch
from _train_helpers import (
    STUDENT_HIDDEN,
    TEACHER_HIDDEN,
    VOCAB,
    bert_config,
    build,
    gpt2_config,
    write_causal_config,
)

from flexkd.config import load_config
from flexkd.distill import Distiller
from flexkd.selection import DimensionSelection
from flexkd.teacher_outputs import TeacherOutputStore, rows_fingerprint, write_teacher_outputs
from flexkd.training import Collator, train

TASKS = {"causal_lm": gpt2_config, "sequence": bert_config}


def _rows(task, n):
    """Unpadded rows of random length; causal rows have a prompt labelled -100 before the target."""
    rows = []
    for _ in range(n):
        ids = [random.randrange(3, VOCAB) for _ in range(random.randint(3, 12))]
        if task == "causal_lm":
            prompt = random.randint(0, len(ids) - 1)
            labels = [-100] * prompt + ids[prompt:]
        else:
            labels = random.randrange(3)
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows


def _pair(task):
    config = TASKS[task]
    return build(config(TEACHER_HIDDEN, 2)).eval(), build(config(STUDENT_HIDDEN, 2)).eval()


@pytest.fixture(params=sorted(TASKS))
def setup(request, tmp_path):
    task = request.param
    teacher, student = _pair(task)
    rows = _rows(task, 11)
    collate = Collator(task, pad_token_id=0)
    store = write_teacher_outputs(
        teacher, rows, tmp_path / "outputs", layers=[1, -1], collate=collate, batch_size=4,
        progress=False,
    )  # fmt: skip
    return task, teacher, student, rows, collate, store


FEATURES = [("flex", "mse"), ("flex", "corr"), ("projector", "mse"), ("projector", "corr"),
            ("cka", "mse"), ("none", "mse")]  # fmt: skip


@pytest.mark.parametrize("feature,loss", FEATURES)
def test_stored_outputs_give_the_live_terms_and_gradients(setup, feature, loss):
    task, teacher, student, rows, collate, store = setup
    selection = DimensionSelection.from_scores(
        {layer: torch.rand(TEACHER_HIDDEN) for layer in (1, 2)}, STUDENT_HIDDEN, teacher=teacher
    )
    distiller = Distiller(
        teacher, student, selection=selection, feature=feature, feature_loss=loss,
        layer_pairs=[(1, 1), (2, 2)], weights={"task": 1.0, "logit": 0.7, "feature": 1.3},
        temperature=2.0,
    )  # fmt: skip
    indices = random.sample(range(len(rows)), 5)  # any rows, any order
    batch = collate([rows[i] for i in indices])

    def run(**kwargs):
        distiller.zero_grad(set_to_none=True)
        loss_value, terms = distiller(batch, **kwargs)
        loss_value.backward()
        return terms, [p.grad.clone() for p in distiller.trainable_parameters()]

    live_terms, live_grads = run()
    stored_terms, stored_grads = run(teacher_outputs=store.batch(indices))
    assert stored_terms.keys() == live_terms.keys()
    for name, value in live_terms.items():
        assert float(stored_terms[name]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), name
    for stored, live in zip(stored_grads, live_grads, strict=True):
        torch.testing.assert_close(stored, live, rtol=1e-4, atol=1e-6)


def test_store_keeps_only_the_positions_the_losses_read(setup):
    task, teacher, _, rows, _, store = setup
    logit_positions = sum(
        1 if task == "sequence" else sum(label != -100 for label in row["labels"][1:])
        for row in rows
    )
    assert store.batch(range(len(rows))).logits.shape == (logit_positions, 3 if task == "sequence" else VOCAB)
    hidden = store.batch([0, 1]).hidden
    assert sorted(hidden) == [1, 2] and all(h.shape[-1] == TEACHER_HIDDEN for h in hidden.values())
    meta = json.loads((store.path / "meta.json").read_text())
    assert meta["rows"] == len(rows) and meta["rows_fingerprint"] == rows_fingerprint(rows)
    store.check(teacher, rows, layers=[1, -1], logits=True)


def test_check_names_every_mismatch(setup, tmp_path):
    task, teacher, _, rows, collate, store = setup
    with pytest.raises(ValueError, match="rows: stored for 11 rows, the data has 10"):
        store.check(teacher, rows[:10])
    changed = [dict(row) for row in rows]
    changed[3]["input_ids"] = [*changed[3]["input_ids"][:-1], changed[3]["input_ids"][-1] + 1]
    with pytest.raises(ValueError, match="rows: the data differs"):
        store.check(teacher, changed)
    other = build(TASKS[task](TEACHER_HIDDEN, 2))
    with pytest.raises(ValueError, match="weights: the teacher's weights differ"):
        store.check(other, rows)
    with pytest.raises(ValueError, match=r"layers: \[0\] not stored"):
        store.check(teacher, rows, layers=[0])
    no_logits = write_teacher_outputs(
        teacher, rows, tmp_path / "hidden-only", layers=[-1], collate=collate, logits=False,
        progress=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="logits: not stored"):
        no_logits.check(teacher, rows, logits=True)
    with pytest.raises(IndexError, match="row 11 is outside"):
        store.batch([0, 11])


def test_distiller_refuses_outputs_of_other_rows(setup, tmp_path):
    task, teacher, student, _, collate, _ = setup
    label = (lambda ids: ids) if task == "causal_lm" else (lambda ids: 1)
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": label(ids)}
            for ids in ([5, 6, 7], [5, 6, 7, 8, 9, 10, 11])]  # fmt: skip
    store = write_teacher_outputs(
        teacher, rows, tmp_path / "two", layers=[-1], collate=collate, progress=False
    )
    distiller = Distiller(teacher, student, feature="cka", weights={"logit": 1.0})
    distiller(collate([rows[1]]), teacher_outputs=store.batch([1]))
    with pytest.raises(ValueError, match="stored for other rows"):
        distiller(collate([rows[1]]), teacher_outputs=store.batch([0]))


def test_bad_arguments(tmp_path):
    teacher, _ = _pair("causal_lm")
    rows, collate = _rows("causal_lm", 3), Collator("causal_lm", pad_token_id=0)
    with pytest.raises(ValueError, match="rows: nothing"):
        write_teacher_outputs(teacher, [], tmp_path / "a", layers=[-1], collate=collate)
    with pytest.raises(ValueError, match="batch_size"):
        write_teacher_outputs(teacher, rows, tmp_path / "a", layers=[-1], collate=collate, batch_size=0)
    with pytest.raises(ValueError, match="layers:"):
        write_teacher_outputs(teacher, rows, tmp_path / "a", layers=[7], collate=collate)
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        TeacherOutputStore(tmp_path)


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    teacher, _ = _pair("causal_lm")
    calls = 0

    def fail_on_the_second_batch(*_):
        nonlocal calls
        calls += 1
        if calls > 1:  # the teacher fails mid-run, after the first batch was written
            raise RuntimeError("killed")

    teacher.register_forward_pre_hook(fail_on_the_second_batch)
    with pytest.raises(RuntimeError, match="killed"):
        write_teacher_outputs(
            teacher, _rows("causal_lm", 9), tmp_path / "out", layers=[-1],
            collate=Collator("causal_lm", pad_token_id=0), batch_size=4, progress=False,
        )  # fmt: skip
    assert calls == 2 and list(tmp_path.iterdir()) == []


def test_training_from_stored_outputs_is_the_same_run(tmp_path):
    """``distill.teacher_outputs`` writes the store on first use and then trains exactly as the live
    teacher does (same seed, same batches: the same losses at every step)."""
    curves = {}
    for name, extra in (("live", {}), ("stored", {"teacher_outputs": "teacher-outputs"})):
        path = write_causal_config(
            tmp_path,
            distill={"feature": "projector", **extra},
            train={"output_dir": f"out-{name}", "max_steps": 5},
            dropout=0.0,
            name=f"{name}.yaml",
        )
        result = train(load_config(path))
        curves[name] = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert (tmp_path / "teacher-outputs" / "meta.json").is_file()
    assert len(curves["live"]) == len(curves["stored"]) == 5
    for live, stored in zip(curves["live"], curves["stored"], strict=True):
        for term in ("task", "logit", "feature", "total"):
            assert stored[term] == pytest.approx(live[term], rel=1e-4), (live["step"], term)
