"""Top-K teacher logits in the store: what is written (the teacher's K largest logits, int32 indices, the
tail mass), that the store refuses another K and names a damaged file, and that logit KD against it is
KD against the renormalised top-K of the live teacher."""

import json
import random

import pytest
import torch
from _train_helpers import STUDENT_HIDDEN, TEACHER_HIDDEN, VOCAB, build, gpt2_config

from flexkd.adapters.masks import aligned_logits, logit_positions
from flexkd.config import DistillSection
from flexkd.distill import Distiller
from flexkd.errors import StoreMismatchError, UnreadableFileError
from flexkd.losses import logit_kd
from flexkd.teacher_outputs import TeacherOutputStore, write_teacher_outputs
from flexkd.training import Collator

K = 5
T = 2.0


def _rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 12))]
        prompt = rng.randint(0, len(ids) - 1)
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                     "labels": [-100] * prompt + ids[prompt:]})  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    teacher = build(gpt2_config(TEACHER_HIDDEN, 2), seed=0).eval()
    student = build(gpt2_config(STUDENT_HIDDEN, 1), seed=1).eval()
    rows, collate = _rows(9), Collator("causal_lm", pad_token_id=0)
    store = write_teacher_outputs(
        teacher, rows, tmp_path_factory.mktemp("topk") / "store", layers=[-1], collate=collate,
        topk=K, temperature=T, batch_size=4, progress=False,
    )  # fmt: skip
    return teacher, student, rows, collate, store


def _live_logits(teacher, batch):
    """The live teacher's logits at the batch's logit positions, ``[positions, vocab]``."""
    with torch.no_grad():
        logits = aligned_logits(teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits, "causal_lm")
    return logits[logit_positions(batch, task="causal_lm")[1]]


def test_store_holds_the_teachers_top_k_logits_and_their_tail_mass(setup):
    teacher, _, rows, collate, store = setup
    indices = [7, 2, 0, 5]
    live = _live_logits(teacher, collate([rows[i] for i in indices]))
    stored = store.batch(indices)
    values, top = stored.logit_topk
    assert stored.logits is None and store.topk == K
    assert values.dtype == torch.float32 and top.dtype == torch.int32
    assert values.shape == top.shape == (live.shape[0], K)
    want_values, want_indices = live.topk(K, dim=-1)
    torch.testing.assert_close(values, want_values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(live.gather(-1, top.long()), values, rtol=1e-5, atol=1e-5)
    assert set(map(tuple, top.sort(-1).values.tolist())) == set(
        map(tuple, want_indices.sort(-1).values.tolist())
    )

    everything = _live_logits(teacher, collate(rows))
    mass = torch.softmax(everything.double() / T, -1)
    tail = 1 - mass.topk(K, -1).values.sum(-1)
    meta = json.loads((store.path / "meta.json").read_text())
    assert meta["logit_topk"] == K and store.tail_mass == meta["tail_mass"]
    assert store.tail_mass["temperature"] == T
    assert store.tail_mass["mean"] == pytest.approx(float(tail.mean()), rel=1e-4)
    assert store.tail_mass["max"] == pytest.approx(float(tail.max()), rel=1e-4)
    assert 0 < store.tail_mass["mean"] < store.tail_mass["max"] < 1
    store.check(teacher, rows, layers=[-1], logits=True, topk=K)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_kd_against_the_store_is_kd_against_the_live_renormalised_top_k(setup, kind):
    teacher, student, rows, collate, store = setup
    distiller = Distiller(
        teacher, student, feature="none", weights={"task": 0.0, "logit": 1.0}, logit_kind=kind,
        temperature=T,
    )  # fmt: skip
    indices = [3, 8, 1]
    batch = collate([rows[i] for i in indices])
    distiller.zero_grad(set_to_none=True)
    loss, terms = distiller(batch, teacher_outputs=store.batch(indices))
    loss.backward()
    grads = [p.grad.clone() for p in distiller.student.parameters()]

    distiller.zero_grad(set_to_none=True)
    live = _live_logits(teacher, batch).topk(K, dim=-1)
    student_logits = aligned_logits(student(**{k: v for k, v in batch.items() if k != "labels"}).logits, "causal_lm")
    student_logits = student_logits[logit_positions(batch, task="causal_lm")[1]]
    reference = logit_kd(student_logits, teacher_topk=(live.values, live.indices), kind=kind, temperature=T)
    reference.backward()
    reference = reference.detach()
    dense = logit_kd(student_logits.detach(), _live_logits(teacher, batch), kind=kind, temperature=T)

    assert float(terms["logit"]) == pytest.approx(float(reference), rel=1e-5)
    assert float(terms["logit"]) != pytest.approx(float(dense), rel=1e-3)  # top-K is not the dense KD
    for got, param in zip(grads, distiller.student.parameters(), strict=True):
        torch.testing.assert_close(got, param.grad, rtol=1e-4, atol=1e-7)


def test_the_store_refuses_another_k_or_dense_logits(setup, tmp_path):
    teacher, _, rows, collate, store = setup
    with pytest.raises(StoreMismatchError, match="teacher_topk: the store holds the top-5 logits, the run asks for the top-8"):
        store.check(teacher, rows, logits=True, topk=8)
    with pytest.raises(StoreMismatchError, match="teacher_topk: the store holds the top-5 logits, the run asks for dense"):
        store.check(teacher, rows, logits=True)
    dense = write_teacher_outputs(teacher, rows, tmp_path / "dense", layers=[], collate=collate, progress=False)
    with pytest.raises(StoreMismatchError, match="teacher_topk: the store holds dense logits, the run asks for the top-5"):
        dense.check(teacher, rows, logits=True, topk=K)
    assert dense.topk is None and dense.tail_mass is None


def test_the_distiller_refuses_top_k_outputs_of_other_rows(setup):
    teacher, student, rows, collate, store = setup
    distiller = Distiller(teacher, student, feature="none", weights={"logit": 1.0}, temperature=T)
    lengths = [sum(label != -100 for label in row["labels"][1:]) for row in rows]
    other = next(i for i in range(1, len(rows)) if lengths[i] != lengths[0])
    with pytest.raises(StoreMismatchError, match="stored logit positions.*stored for other rows"):
        distiller(collate([rows[0]]), teacher_outputs=store.batch([other]))


@pytest.mark.parametrize("name", ["logit_values.npy", "logit_indices.npy"])
def test_a_truncated_top_k_file_is_named(setup, tmp_path, name):
    teacher, _, rows, collate, _ = setup
    store = write_teacher_outputs(teacher, rows, tmp_path / "s", layers=[], collate=collate, topk=K, progress=False)
    file = store.path / name
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(UnreadableFileError, match=name) as caught:
        TeacherOutputStore(store.path)
    assert caught.value.path == file


@pytest.mark.parametrize("damage", ["out of range", "negative", "repeated"])
def test_damaged_top_k_indices_are_named_when_a_batch_reads_them(setup, tmp_path, damage):
    """The store checks the indices of each batch it reads on the host, so the Distiller can pass them to
    logit KD unchecked (a device read per step otherwise)."""
    import numpy as np

    teacher, _, rows, collate, _ = setup
    store = write_teacher_outputs(teacher, rows, tmp_path / "s", layers=[], collate=collate, topk=K, progress=False)
    assert store.batch([0, 1]).logit_topk_checked
    file = store.path / "logit_indices.npy"
    indices = np.load(file)
    indices[1, 2] = {"out of range": VOCAB, "negative": -1, "repeated": indices[1, 0]}[damage]
    np.save(file, indices)
    damaged = TeacherOutputStore(store.path)
    damaged.batch([len(rows) - 1])  # rows without the damaged position still read
    with pytest.raises(UnreadableFileError, match="repeats a vocabulary index" if damage == "repeated" else rf"outside \[0, {VOCAB}\)") as caught:
        damaged.batch([0])
    assert caught.value.path == file


def test_bad_top_k_arguments(setup, tmp_path):
    teacher, _, rows, collate, _ = setup
    write = lambda **kw: write_teacher_outputs(teacher, rows, tmp_path / "x", layers=[-1], collate=collate, progress=False, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=f"topk: K=65 is larger than the teacher's vocabulary of {VOCAB}"):
        write(topk=VOCAB + 1)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="topk: expected None or an int >= 1"):
            write(topk=bad)
    with pytest.raises(ValueError, match="topk: .*logits=False"):
        write(topk=K, logits=False)
    with pytest.raises(ValueError, match="temperature"):
        write(topk=K, temperature=0.0)
    assert not (tmp_path / "x").exists()


def test_config_teacher_topk_needs_a_store_and_a_finite_kd():
    assert DistillSection(teacher_outputs="out", teacher_topk=32).teacher_topk == 32
    with pytest.raises(ValueError, match="teacher_topk: .*set distill.teacher_outputs"):
        DistillSection(teacher_topk=32)
    with pytest.raises(ValueError, match="teacher_topk: reverse_kl is infinite"):
        DistillSection(teacher_outputs="out", teacher_topk=32, logit_kind="reverse_kl")
    with pytest.raises(ValueError, match="teacher_topk"):
        DistillSection(teacher_outputs="out", teacher_topk=0)


def test_a_run_writes_top_k_outputs_reports_the_tail_and_refuses_another_k(tmp_path, capfd):
    from _train_helpers import write_causal_config

    from flexkd.config import load_config
    from flexkd.training import train

    def config(k, name):
        distill = {"feature": "projector", "teacher_outputs": "store", "teacher_topk": k, "temperature": T}
        return load_config(write_causal_config(
            tmp_path, distill=distill, train={"output_dir": f"out-{name}", "max_steps": 2}, name=f"{name}.yaml",
        ))  # fmt: skip

    result = train(config(K, "first"))
    assert "top-5 logits; the softmax mass they drop at T=2" in capfd.readouterr().err
    assert TeacherOutputStore(tmp_path / "store").topk == K
    assert all(json.loads(line)["logit"] > 0 for line in result.metrics_path.read_text().splitlines())
    with pytest.raises(StoreMismatchError, match="distill.teacher_outputs: .*teacher_topk: the store holds the top-5"):
        train(config(8, "second"))
