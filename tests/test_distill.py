"""Distiller: every term, the weighted total, the window normalisation, the baselines' parameters, fail-fast errors."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from _train_helpers import (
    STUDENT_HIDDEN,
    TEACHER_HIDDEN,
    bart_config,
    bert_config,
    build,
    causal_batch,
    gpt2_config,
)

from flexkd.adapters import token_weights
from flexkd.distill import Distiller
from flexkd.losses import linear_cka, logit_kd
from flexkd.ops import reference
from flexkd.selection import DimensionSelection


def _teacher_and_student(config):
    """A 2-layer teacher and a 1-layer student built from ``config`` (a ``_train_helpers``
    config function), both in eval mode."""
    return build(config(TEACHER_HIDDEN, 2)).eval(), build(config(STUDENT_HIDDEN, 1)).eval()


@pytest.fixture
def pair():
    return _teacher_and_student(gpt2_config)


def _selection(teacher, layers=(-1,), k=STUDENT_HIDDEN):
    return DimensionSelection.from_scores(
        {layer: torch.rand(TEACHER_HIDDEN) for layer in layers}, k, teacher=teacher
    )


def _eval_distiller(teacher, student, weights, **options):
    """A Distiller in eval mode, with a random selection of the teacher's last layer."""
    distiller = Distiller(
        teacher, student, selection=_selection(teacher), weights=weights, **options
    )
    distiller.eval()
    return distiller


@pytest.mark.parametrize("feature", ["flex", "projector", "cka", "none"])
def test_terms_are_complete_and_total_is_the_weighted_sum(pair, feature):
    teacher, student = pair
    weights = {"task": 0.7, "logit": 0.4, "feature": 1.3}
    distiller = _eval_distiller(
        teacher, student, weights, feature=feature, logit_kind="jsd", temperature=2.0
    )
    loss, terms = distiller(causal_batch())
    assert set(terms) == {"task", "logit", "feature", "total"}
    # detached 0-d fp32 tensors: reading them is the caller's choice (no device sync per term)
    assert all(
        isinstance(v, torch.Tensor) and v.shape == () and v.dtype == torch.float32
        and not v.requires_grad
        for v in terms.values()
    )
    assert terms["task"] > 0 and terms["logit"] > 0
    assert (terms["feature"] > 0) == (feature != "none")
    want = sum(weights[name] * terms[name] for name in ("task", "logit", "feature"))
    assert float(terms["total"]) == pytest.approx(float(want), rel=1e-5)
    assert loss.item() == pytest.approx(float(terms["total"]), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in distiller.trainable_parameters())


def test_task_term_equals_the_models_own_loss(pair):
    teacher, student = pair
    batch = causal_batch()
    distiller = Distiller(teacher, student, feature="none")
    distiller.eval()
    _, terms = distiller(batch)
    assert terms["task"] == pytest.approx(student(**batch).loss.item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_logit_term_equals_masked_kd_over_the_whole_sequence(pair, kind):
    """The Distiller gathers the labelled positions before the softmax; the result must be the masked loss
    over every position (a prompt labelled -100 and right padding both excluded)."""
    teacher, student = pair
    batch = causal_batch(4, 9)
    batch["labels"][:, :3] = -100
    distiller = Distiller(
        teacher, student, feature="none", weights={"logit": 1.0}, logit_kind=kind, temperature=2.0,
        logit_kd_backend="materialised",  # the fused path: tests/test_distill_linear_kd.py
    )
    distiller.eval()
    _, terms = distiller(batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        s_logits, t_logits = student(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    want = logit_kd(s_logits, t_logits, kind=kind, temperature=2.0, mask=mask, reduction="mean")
    assert terms["logit"] == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("loss", ["mse", "corr", "cka"])
def test_flex_term_equals_reference_on_selected_columns_of_hidden_states(pair, loss):
    teacher, student = pair
    layer_pairs = [(1, 1), (-1, -1)]
    selection = _selection(teacher, layers=(1, 2))
    distiller = Distiller(
        teacher,
        student,
        selection=selection,
        feature_loss=loss,
        layer_pairs=layer_pairs,
        weights={"task": 0.0, "logit": 0.0, "feature": 1.0},
    )
    distiller.eval()
    batch = causal_batch(4, 9)
    _, terms = distiller(batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        t_hidden = teacher(**inputs, output_hidden_states=True).hidden_states
        s_hidden = student(**inputs, output_hidden_states=True).hidden_states
    mask = token_weights(
        batch, task="causal_lm", side="decoder", shape=tuple(batch["input_ids"].shape)
    )
    def reference_term(s_layer, t_layer):
        index = selection.index(t_layer)
        if loss == "cka":  # flexkd's variant: CKA between the student and the selected teacher dims
            return 1.0 - linear_cka(s_hidden[s_layer], t_hidden[t_layer][..., index], mask)
        return reference.flex_feature_loss(s_hidden[s_layer], t_hidden[t_layer], index, mask, loss=loss)

    per_pair = [reference_term(s, t) for s, t in [(1, 1), (1, 2)]]
    assert terms["feature"] == pytest.approx(sum(per_pair).item() / 2, rel=1e-5)
    assert terms["feature/s1-t1"] == pytest.approx(per_pair[0].item(), rel=1e-5)
    assert terms["feature/s1-t2"] == pytest.approx(per_pair[1].item(), rel=1e-5)


def test_projector_params_live_outside_the_student_and_are_trained(pair):
    teacher, student = pair
    for direction in ("student_to_teacher", "teacher_to_student"):
        distiller = Distiller(teacher, student, feature="projector", projector_direction=direction)
        projector = distiller.feature_losses[0].projector
        assert not any("projector" in name for name in student.state_dict())
        assert any("projector" in name for name in distiller.state_dict())
        assert not any(name.startswith("teacher") for name in distiller.state_dict())
        params = distiller.trainable_parameters()
        assert any(p is projector.weight for p in params)
        optimizer = torch.optim.SGD(params, lr=0.1)
        before = projector.weight.detach().clone()
        loss, _ = distiller(causal_batch())
        loss.backward()
        optimizer.step()
        assert not torch.equal(before, projector.weight)


def test_window_normaliser_gives_the_loss_of_the_concatenated_batch(pair):
    teacher, student = pair
    distiller = _eval_distiller(teacher, student, {"task": 1.0, "logit": 0.5, "feature": 2.0})
    first, second = causal_batch(2, 10, min_length=10), causal_batch(3, 10, min_length=4)
    second["attention_mask"][:, 4:] = 0
    second["labels"] = second["input_ids"].masked_fill(second["attention_mask"] == 0, -100)
    units = {
        k: distiller.count_units(first)[k] + distiller.count_units(second)[k]
        for k in ("task", "logit", "feature")
    }
    window = sum(distiller(batch, normalizers=units)[0] for batch in (first, second))
    whole = distiller({k: torch.cat([first[k], second[k]]) for k in first})[0]
    assert window.item() == pytest.approx(whole.item(), rel=1e-5)
    # 18 targets against 9: a mean of means would weight a token of the second batch twice as much
    assert distiller.count_units(first)["task"] == 18 and distiller.count_units(second)["task"] == 9


def test_sequence_classification_terms():
    teacher, student = _teacher_and_student(bert_config)
    batch = causal_batch(4, 8)
    batch["labels"] = torch.randint(0, 3, (4,))
    distiller = _eval_distiller(teacher, student, {"task": 1, "logit": 1, "feature": 1})
    _, terms = distiller(batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    want_task = F.cross_entropy(student(**inputs).logits, batch["labels"]).item()
    assert terms["task"] == pytest.approx(want_task, rel=1e-5)
    assert distiller.count_units(batch)["task"] == 4
    assert distiller.count_units(batch)["feature"] == batch["attention_mask"].sum()


def test_seq2seq_task_term_equals_the_models_own_loss():
    teacher, student = _teacher_and_student(bart_config)
    batch = causal_batch(3, 8)
    batch["labels"] = torch.randint(3, 64, (3, 6))
    batch["labels"][1, 4:] = -100
    distiller = _eval_distiller(teacher, student, {"task": 1, "logit": 1, "feature": 1})
    loss, terms = distiller(batch)
    assert terms["task"] == pytest.approx(student(**batch).loss.item(), rel=1e-5)
    assert terms["feature"] > 0 and terms["logit"] > 0


def test_fail_fast(pair):
    teacher, student = pair
    selection = _selection(teacher)
    with pytest.raises(ValueError, match="vocabulary"):
        Distiller(
            teacher,
            build(gpt2_config(STUDENT_HIDDEN, 1, vocab=80)),
            feature="none",
            weights={"logit": 1.0},
        )
    with pytest.raises(ValueError, match=r"layer_pairs\[0\].*out of range"):
        Distiller(teacher, student, selection=selection, layer_pairs=[(5, -1)])
    with pytest.raises(ValueError, match=r"layer_pairs\[1\].*out of range"):
        Distiller(teacher, student, feature="cka", layer_pairs=[(1, 1), (1, -4)])
    other_teacher = build(gpt2_config(TEACHER_HIDDEN, 2)).eval()
    with pytest.raises(ValueError, match="selection.*does not match"):
        Distiller(other_teacher, student, selection=selection)
    too_wide = SimpleNamespace(
        layers=[2],
        k=40,
        hidden_size=TEACHER_HIDDEN,
        teacher=None,
        index=lambda layer: torch.arange(40),
    )
    with pytest.raises(ValueError, match="k=40 is larger than the teacher's hidden size 32"):
        Distiller(teacher, student, selection=too_wide)
    with pytest.raises(ValueError, match="must equal the student's hidden size 16"):
        Distiller(teacher, student, selection=_selection(teacher, k=8))
    with pytest.raises(ValueError, match="selection: feature='flex' needs"):
        Distiller(teacher, student)
    with pytest.raises(ValueError, match="no dimensions for teacher layer 1"):
        Distiller(teacher, student, selection=selection, layer_pairs=[(1, 1)])
    with pytest.raises(ValueError, match="weights: unknown term"):
        Distiller(teacher, student, feature="none", weights={"feature_kd": 1.0})
    with pytest.raises(ValueError, match="feature must be one of"):
        Distiller(teacher, student, feature="pca")
    with pytest.raises(ValueError, match="feature_loss='cka' applies to feature='flex'"):
        Distiller(teacher, student, feature="projector", feature_loss="cka")
    with pytest.raises(ValueError, match="feature_loss must be one of"):
        Distiller(teacher, student, selection=selection, feature_loss="cosine")


def test_flexkd_trainer_logs_every_term_and_saves_the_student_only(pair, tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    from flexkd import FlexKDTrainer

    teacher, student = pair
    distiller = Distiller(
        teacher, student, feature="projector", weights={"task": 1.0, "logit": 0.5, "feature": 1.0}
    )
    rows = [{k: v[0] for k, v in causal_batch(1, 8).items()} for _ in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        logging_steps=1,
        save_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = FlexKDTrainer(
        distiller,
        args=args,
        train_dataset=rows,
        data_collator=lambda b: {k: torch.stack([r[k] for r in b]) for k in b[0]},
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    assert all(
        {"distill/task", "distill/logit", "distill/feature", "distill/total"} <= set(e)
        for e in logged
    )
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-2")
    for name, value in student.state_dict().items():
        assert torch.equal(saved.state_dict()[name], value), name
    assert (tmp_path / "checkpoint-2" / FlexKDTrainer.FEATURE_LOSSES_FILE).exists()
