"""Teacher-side tokenisation: a teacher whose vocabulary numbers the pieces differently reads its own ids
(``teacher_input_ids``) in the Distiller, in scoring and in stored outputs, and gives what it gives when fed
those ids directly; sequences that are not position-aligned are refused, naming the key."""

import random

import pytest
import torch
from _train_helpers import STUDENT_HIDDEN, TEACHER_HIDDEN, VOCAB, bert_config, build, gpt2_config

import flexkd
from flexkd.distill import Distiller
from flexkd.selection import DimensionSelection
from flexkd.teacher_inputs import check_teacher_inputs, student_view, teacher_view
from flexkd.teacher_outputs import write_teacher_outputs
from flexkd.training import Collator

TEACHER_VOCAB = VOCAB + 8  # ids past the student's vocabulary: feeding them to the student would fail
TEACHER_PAD = 5


def _permuted_pair():
    """(teacher, the same teacher re-numbered by ``perm``, student, perm): ``renumbered(perm[ids])`` equals
    ``teacher(ids)``."""
    torch.manual_seed(0)
    teacher = build(dict(bert_config(TEACHER_HIDDEN, 2), vocab_size=TEACHER_VOCAB)).eval()
    renumbered = build(dict(bert_config(TEACHER_HIDDEN, 2), vocab_size=TEACHER_VOCAB)).eval()
    renumbered.load_state_dict(teacher.state_dict())
    generator = torch.Generator().manual_seed(1)
    perm = torch.randperm(TEACHER_VOCAB, generator=generator)
    perm[[0, int((perm == TEACHER_PAD).nonzero())]] = perm[[int((perm == TEACHER_PAD).nonzero()), 0]]
    with torch.no_grad():
        table = renumbered.get_input_embeddings().weight
        table[perm] = teacher.get_input_embeddings().weight.clone()
    student = build(bert_config(STUDENT_HIDDEN, 2)).eval()
    return teacher, renumbered, student, perm


def _rows(perm, n=9, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(1, VOCAB) for _ in range(rng.randint(3, 10))]
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * len(ids),
                "labels": rng.randrange(3),
                "teacher_input_ids": perm[ids].tolist(),
            }
        )
    return rows


@pytest.fixture(scope="module")
def setup():
    teacher, renumbered, student, perm = _permuted_pair()
    assert int(perm[0]) == TEACHER_PAD  # the student's pad (0) is the teacher's pad
    rows = _rows(perm)
    collate = Collator("sequence", 0, teacher_pad_token_id=TEACHER_PAD)
    return teacher, renumbered, student, perm, rows, collate


def _plain(rows):
    return [{k: v for k, v in row.items() if not k.startswith("teacher_")} for row in rows]


@pytest.mark.parametrize("feature,loss", [("flex", "corr"), ("flex", "mse"), ("cka", "mse")])
def test_distiller_feeds_each_model_its_own_ids(setup, feature, loss):
    teacher, renumbered, student, perm, rows, collate = setup
    scores = {-1: torch.rand(TEACHER_HIDDEN, generator=torch.Generator().manual_seed(2))}

    def run(model, batch):
        selection = DimensionSelection.from_scores(scores, STUDENT_HIDDEN, teacher=model)
        distiller = Distiller(
            model, student, selection=selection, feature=feature, feature_loss=loss,
            weights={"task": 1.0, "logit": 0.5, "feature": 1.0},
        )  # fmt: skip
        student.zero_grad(set_to_none=True)
        total, terms = distiller(batch)
        total.backward()
        return terms, [p.grad.clone() for p in student.parameters() if p.grad is not None]

    batch = collate(rows)
    assert batch["teacher_input_ids"].max() >= VOCAB or batch["teacher_input_ids"].ne(batch["input_ids"]).any()
    expected_terms, expected_grads = run(teacher, collate(_plain(rows)))
    terms, grads = run(renumbered, batch)
    for name, value in expected_terms.items():
        assert float(terms[name]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), name
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # the renumbered teacher fed the student's ids is another teacher: the check above can fail
    wrong_terms, _ = run(renumbered, collate(_plain(rows)))
    assert float(wrong_terms["logit"]) != pytest.approx(float(expected_terms["logit"]), rel=1e-3)


def test_score_reads_the_teachers_ids(setup):
    teacher, renumbered, _, _, rows, collate = setup
    batches = [collate(rows[i : i + 4]) for i in range(0, len(rows), 4)]
    plain = [collate(_plain(rows[i : i + 4])) for i in range(0, len(rows), 4)]
    direct = flexkd.score(teacher, plain, layers=[1, -1], k=STUDENT_HIDDEN, progress=False)
    own = flexkd.score(renumbered, batches, layers=[1, -1], k=STUDENT_HIDDEN, progress=False)
    for layer in direct.layers:
        torch.testing.assert_close(own.scores(layer), direct.scores(layer), rtol=1e-5, atol=1e-7)
        assert torch.equal(own.index(layer), direct.index(layer))


def test_stored_outputs_are_the_teachers_on_its_own_ids(setup, tmp_path):
    teacher, renumbered, _, _, rows, collate = setup
    write = dict(layers=[1, -1], batch_size=4, progress=False)
    direct = write_teacher_outputs(teacher, _plain(rows), tmp_path / "direct", collate=collate, **write)
    own = write_teacher_outputs(renumbered, rows, tmp_path / "own", collate=collate, **write)
    every = range(len(rows))
    torch.testing.assert_close(own.batch(every).logits, direct.batch(every).logits, rtol=1e-5, atol=1e-6)
    for layer, hidden in direct.batch(every).hidden.items():
        torch.testing.assert_close(own.batch(every).hidden[layer], hidden, rtol=1e-5, atol=1e-6)


def test_misaligned_sequences_are_refused_naming_the_key(setup):
    *_, rows, collate = setup
    batch = collate(rows[:3])
    with pytest.raises(ValueError, match="teacher_input_ids: shape"):
        teacher_view({**batch, "teacher_input_ids": batch["teacher_input_ids"][:, :-1]})
    mask = batch["attention_mask"].clone()
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="teacher_attention_mask: differs"):
        teacher_view({**batch, "teacher_attention_mask": mask})
    with pytest.raises(ValueError, match="teacher_attention_mask: given without teacher_input_ids"):
        check_teacher_inputs({"input_ids": batch["input_ids"], "teacher_attention_mask": mask})
    with pytest.raises(ValueError, match="teacher_input_ids: the batch has no input_ids"):
        check_teacher_inputs({"teacher_input_ids": batch["teacher_input_ids"]})
    with pytest.raises(ValueError, match="teacher_input_ids: row 1 has"):
        collate([rows[0], {**rows[1], "teacher_input_ids": rows[1]["teacher_input_ids"][:-1]}])
    with pytest.raises(ValueError, match="teacher_pad_token_id"):
        Collator("sequence", 0)(rows[:2])


def test_each_view_holds_only_its_models_ids(setup):
    *_, rows, collate = setup
    batch = collate(rows[:4])
    assert batch["teacher_input_ids"][batch["attention_mask"] == 0].eq(TEACHER_PAD).all()
    teacher_side = teacher_view(batch)
    assert torch.equal(teacher_side["input_ids"], batch["teacher_input_ids"])
    assert not any(key.startswith("teacher_") for key in teacher_side)
    assert student_view(batch).keys() == {"input_ids", "attention_mask", "labels"}
    aligned = {**batch, "teacher_attention_mask": batch["attention_mask"].clone()}
    assert torch.equal(teacher_view(aligned)["attention_mask"], batch["attention_mask"])


def test_a_language_model_teacher_needs_its_own_labels():
    teacher = build(gpt2_config(TEACHER_HIDDEN, 2)).eval()
    ids = [[3, 4, 5, 6], [7, 8, 9]]
    rows = [{"input_ids": i, "teacher_input_ids": [v + 1 for v in i]} for i in ids]
    batch = Collator("causal_lm", 0, teacher_pad_token_id=0)(rows)
    assert torch.equal(batch["teacher_labels"][0], batch["teacher_input_ids"][0])
    assert batch["teacher_labels"][1, -1] == -100
    selection = flexkd.score(teacher, [batch], layers=[-1], k=4, progress=False)
    direct = flexkd.score(
        teacher,
        [{"input_ids": batch["teacher_input_ids"], "attention_mask": batch["attention_mask"],
          "labels": batch["teacher_labels"]}],
        layers=[-1], k=4, progress=False,
    )  # fmt: skip
    torch.testing.assert_close(selection.scores(-1), direct.scores(-1))
    no_teacher_labels = {k: v for k, v in batch.items() if k != "teacher_labels"}
    with pytest.raises(ValueError, match="teacher_labels: the labels are token ids"):
        flexkd.score(teacher, [no_teacher_labels], layers=[-1], k=4, progress=False)
