"""Task definitions on the Debian snapshot: batching, metrics, model factories, teacher cache."""

from __future__ import annotations

import os
import random

import pytest
import torch

from flexkd_lab.tasks import (
    FitConfig,
    SectionsConfig,
    SynopsisConfig,
    accuracy,
    get_task,
    get_teacher,
    greedy_generate,
    macro_f1,
    rouge_l,
)
from flexkd_lab.tasks.student_init import principal_directions


@pytest.fixture(scope="module")
def sections():
    return get_task("debian-sections")


@pytest.fixture(scope="module")
def synopsis():
    # Small models keep these tests fast; the shapes and code paths are the real ones.
    return get_task("debian-synopsis", teacher_hidden=64, teacher_layers=1, student_hidden=32)


@pytest.fixture(scope="module")
def minilm(sections):
    return sections.build_teacher()


# --- metrics -------------------------------------------------------------------------------


def test_accuracy_and_macro_f1_on_hand_made_examples():
    refs = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    assert accuracy(preds, refs) == pytest.approx(4 / 6)
    # per class F1: c0 P=1/2 R=1/2 -> 1/2; c1 P=2/3 R=1 -> 4/5; c2 P=1 R=1/2 -> 2/3
    assert macro_f1(preds, refs) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert macro_f1(refs, refs) == accuracy(refs, refs) == 1.0
    with pytest.raises(ValueError, match="predictions"):
        accuracy([0], [0, 1])
    with pytest.raises(ValueError, match="references"):
        macro_f1([], [])


def test_rouge_l_on_hand_made_examples():
    # LCS("the cat on the mat", "the cat sat on the mat") = 5 -> P = 1, R = 5/6, F = 10/11
    assert rouge_l(["the cat on the mat"], ["the cat sat on the mat"]) == pytest.approx(10 / 11)
    assert rouge_l(["Libraries", "x"], ["library", "y"]) == pytest.approx(0.5)  # stemmed match
    with pytest.raises(ValueError, match="predictions"):
        rouge_l(["a"], [])


# --- classification ------------------------------------------------------------------------


def test_sections_batches_are_model_ready(sections, minilm):
    limit = random.randint(5, 12)
    loader = sections.dataloader(
        "train", batch_size=4, shuffle=True, limit=limit, seed=random.randrange(99)
    )
    batches = list(loader)
    assert sum(len(b["labels"]) for b in batches) == limit
    batch = batches[0]
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[1] <= sections.config.max_length
    pad = sections.tokenizer.pad_token_id
    assert torch.equal(batch["attention_mask"].bool(), batch["input_ids"] != pad)
    assert ((batch["labels"] >= 0) & (batch["labels"] < 20)).all()
    with torch.no_grad():
        out = minilm(**batch)
    assert out.logits.shape == (len(batch["labels"]), 20) and torch.isfinite(out.loss)


def test_sections_model_factories(sections, minilm):
    assert minilm.config.hidden_size == 384 and minilm.config.num_hidden_layers == 6
    assert minilm.config.num_labels == 20 and minilm.config.id2label[0] == sections.labels[0]
    for hidden, layers in ((96, 2), (128, 4)):
        student = sections.build_student(minilm, hidden_size=hidden, num_layers=layers)
        assert student.config.hidden_size == hidden and student.config.num_hidden_layers == layers
        assert student.config.vocab_size == minilm.config.vocab_size
    default = sections.build_student(minilm)
    assert (default.config.hidden_size, default.config.num_hidden_layers) == (128, 4)
    with pytest.raises(ValueError, match="teacher"):
        sections.build_student(None)
    with pytest.raises(ValueError, match="hidden_size"):
        sections.build_student(minilm, hidden_size=100)
    with pytest.raises(ValueError, match="init"):
        sections.build_student(minilm, init="copy")
    random_init = sections.build_student(init="random", seed=1)
    assert random_init.config.hidden_size == 128


def test_teacher_pca_initialises_student_embeddings(sections, minilm):
    student = sections.build_student(minilm, hidden_size=96)
    teacher_words = minilm.get_input_embeddings().weight
    projection = principal_directions(teacher_words, 96)
    assert torch.allclose(projection.T @ projection, torch.eye(96), atol=1e-4)
    assert torch.allclose(
        student.get_input_embeddings().weight, teacher_words @ projection, atol=1e-5
    )
    teacher_pos = minilm.bert.embeddings.position_embeddings.weight
    assert torch.allclose(
        student.bert.embeddings.position_embeddings.weight, teacher_pos @ projection, atol=1e-5
    )


def test_sections_evaluate_reports_metrics(sections, minilm):
    result = sections.evaluate(minilm, "validation", limit=8, batch_size=4)
    assert result["n"] == 8 and 0 <= result["accuracy"] <= 1 and 0 <= result["macro_f1"] <= 1


def test_sections_evaluate_batches_by_length_and_returns_the_splits_order(sections, minilm):
    rows = sections.encode("validation", 12)
    assert len({len(r["input_ids"]) for r in rows}) > 4  # lengths vary, so sorting reorders
    result = sections.evaluate(
        minilm, "validation", limit=12, batch_size=5, return_predictions=True, return_logits=True
    )
    with torch.no_grad():  # one row at a time, in the split's order, no padding at all
        alone = torch.cat([minilm(**sections.collate([row])).logits for row in rows])
    assert len(set(alone.argmax(-1).tolist())) > 2  # several classes: the order shows
    assert result["predictions"] == alone.argmax(-1).tolist()
    assert result["references"] == [r["label"] for r in rows]
    torch.testing.assert_close(result["logits"], alone, rtol=1e-4, atol=1e-4)  # padding rounds apart


# --- summarisation -------------------------------------------------------------------------


def test_synopsis_batches_label_only_the_synopsis(synopsis):
    features = synopsis.encode("train", limit=6)
    batch = synopsis.collate(features)
    tok = synopsis.tokenizer
    for row, feature in enumerate(features):
        prompt, target = feature["prompt"], feature["target"]
        assert prompt[0] == tok.bos_token_id and prompt[-1] == tok.sep_token_id
        assert target[-1] == tok.eos_token_id
        n = len(prompt) + len(target)
        assert batch["input_ids"][row, :n].tolist() == prompt + target
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (
            batch["input_ids"].shape[1] - n
        )
        labels = batch["labels"][row].tolist()
        assert labels[: len(prompt)] == [-100] * len(prompt)
        assert labels[len(prompt) : n] == target
        assert all(v == -100 for v in labels[n:])
        if len(target) <= synopsis.config.max_target_length:  # not truncated
            assert tok.decode(target, skip_special_tokens=True).strip() == feature["summary"]
    model = synopsis.build_teacher()
    assert torch.isfinite(model(**batch).loss)


def test_synopsis_model_factories():
    full = get_task("debian-synopsis")
    teacher = full.build_teacher()
    assert teacher.config.n_embd == 384 and teacher.config.n_layer == 4
    assert teacher.config.vocab_size == len(full.tokenizer)
    for hidden in (96, 128):
        student = full.build_student(teacher, hidden_size=hidden)
        assert (
            student.config.n_embd == hidden
            and student.config.vocab_size == teacher.config.vocab_size
        )
        projection = principal_directions(teacher.transformer.wte.weight, hidden)
        assert torch.allclose(
            student.transformer.wpe.weight, teacher.transformer.wpe.weight @ projection, atol=1e-5
        )
    default = full.build_student(init="random")
    assert default.config.n_embd == 128 and default.config.n_layer == 2
    with pytest.raises(ValueError, match="teacher"):
        full.build_student()


def test_teacher_key_ignores_student_settings(synopsis):
    from flexkd_lab.tasks.teacher_cache import teacher_key

    fit_config = FitConfig()
    wider_student = get_task(
        "debian-synopsis", teacher_hidden=64, teacher_layers=1, student_hidden=96
    )
    assert teacher_key(synopsis, fit_config, 0) == teacher_key(wider_student, fit_config, 0)
    wider_teacher = get_task(
        "debian-synopsis", teacher_hidden=96, teacher_layers=1, student_hidden=32
    )
    assert teacher_key(synopsis, fit_config, 0) != teacher_key(wider_teacher, fit_config, 0)
    assert teacher_key(synopsis, fit_config, 0) != teacher_key(synopsis, fit_config, 1)


def test_greedy_generate_batched_matches_single_and_uncached(synopsis):
    torch.manual_seed(random.randrange(1000))
    model = synopsis.build_teacher(seed=random.randrange(1000)).eval()
    tok = synopsis.tokenizer
    prompts = [synopsis.prompt_ids(t) for t in synopsis.dataset("test", limit=3)["text"]]
    prompts[1] = prompts[1][:5] + [tok.sep_token_id]  # different lengths -> left padding
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    batched = greedy_generate(model, ids, mask, **kwargs)
    for prompt, got in zip(prompts, batched, strict=True):
        single = greedy_generate(
            model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), **kwargs
        )
        assert single == [got]
        sequence = list(prompt)  # recompute without a cache, one argmax at a time
        expected = []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                expected.append(nxt)
                sequence.append(nxt)
        assert got == expected
    with pytest.raises(ValueError, match="attention_mask"):
        greedy_generate(model, ids, mask[:, 1:], **kwargs)


def test_synopsis_evaluate_returns_rouge(synopsis):
    model = synopsis.build_teacher()
    result = synopsis.evaluate(model, "validation", limit=4, batch_size=2, return_predictions=True)
    assert result["n"] == 4 and len(result["predictions"]) == 4 and 0 <= result["rouge_l"] <= 1


# --- teacher cache -------------------------------------------------------------------------


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("task_name", ["debian-sections", "debian-synopsis"])
def test_get_teacher_trains_once_then_reuses_the_cache(tmp_path, task_name, synopsis):
    task = (
        get_task("debian-sections", max_length=16) if task_name == "debian-sections" else synopsis
    )
    fit_config = FitConfig(max_steps=2, batch_size=4, train_limit=8, seed=random.randrange(100))
    kwargs = dict(eval_limit=4, progress=False, device="cpu")
    first = get_teacher(task, tmp_path, fit_config=fit_config, **kwargs)
    assert not first.reused and first.report["train"]["steps"] == 2
    assert first.report["validation"]["n"] == 4
    assert os.listdir(tmp_path) == [os.path.basename(first.path)], (
        "no temporary folders left behind"
    )
    second = get_teacher(task, tmp_path, fit_config=fit_config, **kwargs)
    assert second.reused and second.path == first.path and second.report == first.report
    a, b = _state(first.model), _state(second.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_cache_key_follows_fit_settings_and_force_retrains(tmp_path, synopsis):
    kwargs = dict(eval_limit=2, progress=False, device="cpu")
    one = FitConfig(max_steps=1, batch_size=4, train_limit=8)
    first = get_teacher(synopsis, tmp_path, fit_config=one, **kwargs)
    other = get_teacher(
        synopsis, tmp_path, fit_config=FitConfig(max_steps=1, batch_size=2), **kwargs
    )
    assert not other.reused and other.path != first.path
    forced = get_teacher(synopsis, tmp_path, fit_config=one, force=True, **kwargs)
    assert not forced.reused and forced.path == first.path
    assert sorted(os.listdir(tmp_path)) == sorted(
        os.path.basename(p) for p in (first.path, other.path)
    )
    with pytest.raises(TypeError, match="fit_config"):
        get_teacher(synopsis, tmp_path, fit_config={"epochs": 1})


def test_get_task_overrides_and_errors():
    assert get_task("debian-sections", max_length=32).config.max_length == 32
    assert isinstance(get_task("debian-synopsis").config, SynopsisConfig)
    with pytest.raises(ValueError, match="name"):
        get_task("imdb")
    with pytest.raises(ValueError, match="overrides"):
        get_task("debian-sections", hidden=3)
    with pytest.raises(TypeError, match="config"):
        get_task("debian-sections", SynopsisConfig())
    with pytest.raises(ValueError, match="max_length"):
        SectionsConfig(max_length=4)
    with pytest.raises(ValueError, match="epochs"):
        FitConfig(epochs=0)
