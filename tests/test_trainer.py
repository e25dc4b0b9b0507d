"""FlexKDTrainer inside a real transformers.Trainer run (one process; two in test_trainer_distributed)."""

import copy

import _tiny_hf as tiny
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file
from transformers import TrainingArguments

import flexkd
from flexkd import FlexKDTrainer

STUDENT_HIDDEN = 16
WEIGHTS = {"task": 1.0, "logit": 0.5, "feature": 1.0}


def _student(seed=1):
    options = tiny._decoder_kwargs()
    options["hidden_size"] = STUDENT_HIDDEN
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**options))


def _rows(count, seed):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        length = int(torch.randint(3, 11, (1,), generator=generator))
        rows.append({"input_ids": torch.randint(3, tiny.VOCAB, (length,), generator=generator)})
    return rows


def collate(rows):
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])], mask[i, : len(r["input_ids"])] = r["input_ids"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    teacher = tiny.build("llama")
    train_rows, eval_rows = _rows(16, seed=1), _rows(6, seed=2)
    selection = flexkd.score(
        teacher, [collate(train_rows)], layers=[-1], k=STUDENT_HIDDEN, progress=False
    )
    return teacher, selection, train_rows, eval_rows


def _trainer(setup, tmp_path, *, student=None, teacher_outputs=None, **overrides):
    teacher, selection, train_rows, eval_rows = setup
    distiller = flexkd.Distiller(
        teacher,
        student if student is not None else _student(),
        selection=selection,
        weights=WEIGHTS,
    )
    options = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=2,
        save_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    options.update(overrides)
    return FlexKDTrainer(
        distiller,
        args=TrainingArguments(**options),
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=collate,
        compute_metrics=lambda p: {"rows": float(p.label_ids.shape[0])},
        teacher_outputs=teacher_outputs,
    )


def test_eval_logs_every_term_over_the_whole_set_and_compute_metrics_runs(setup, tmp_path):
    trainer = _trainer(setup, tmp_path, per_device_eval_batch_size=4)  # 6 rows: batches of 4 and 2
    metrics = trainer.evaluate()
    teacher, _, _, eval_rows = setup
    _, terms = trainer.distiller(collate(eval_rows))  # one batch of every row: the exact values
    for name in ("task", "logit", "feature", "total"):
        assert metrics[f"eval_{name}"] == pytest.approx(float(terms[name]), rel=1e-5), name
    assert metrics["eval_loss"] == metrics["eval_total"]
    assert metrics["eval_rows"] == len(eval_rows)  # compute_metrics saw the student's logits


def test_prediction_step_returns_the_students_logits(setup, tmp_path):
    trainer = _trainer(setup, tmp_path)
    batch = collate(setup[3][:2])
    loss, logits, labels = trainer.prediction_step(trainer.model, batch, prediction_loss_only=False)
    with torch.no_grad():
        expected = trainer.distiller.student(**batch).logits
    torch.testing.assert_close(logits, expected)
    assert torch.equal(labels, batch["labels"]) and loss.dim() == 0
    _, no_logits, no_labels = trainer.prediction_step(
        trainer.model, batch, prediction_loss_only=True
    )
    assert no_logits is None and no_labels is None
    # feature term only: the distiller's student stops after its tap, so the logits need a forward
    teacher, selection = setup[:2]
    feature_only = flexkd.Distiller(
        teacher, trainer.distiller.student, selection=selection, weights={"task": 0, "logit": 0}
    )
    trainer = FlexKDTrainer(feature_only, args=trainer.args, data_collator=collate)
    _, logits, _ = trainer.prediction_step(trainer.model, batch, prediction_loss_only=False)
    torch.testing.assert_close(logits, expected)


def test_gradient_accumulation_normalises_by_the_windows_units(setup, tmp_path):
    """Rows of unequal length: 2 micro-batches of 2 must give the step of one batch of 4 (a mean of
    the micro-batch means would not)."""
    results = []
    for batch, accumulate in ((4, 1), (2, 2)):
        trainer = _trainer(
            setup,
            tmp_path / f"{batch}x{accumulate}",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulate,
            max_steps=1,
            logging_steps=1,
            save_strategy="no",
            optim="sgd",
        )
        trainer.train()
        logged = next(e for e in trainer.state.log_history if "loss" in e)
        results.append((logged, trainer.distiller.student.state_dict()))
    (one, one_weights), (two, two_weights) = results
    for key in ("loss", "distill/task", "distill/logit", "distill/feature", "distill/total"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    for name, value in one_weights.items():
        torch.testing.assert_close(two_weights[name], value, rtol=1e-5, atol=1e-6)


def test_load_best_model_at_end_with_save_total_limit(setup, tmp_path):
    options = dict(
        eval_strategy="steps",
        eval_steps=2,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="eval_feature",
        greater_is_better=True,  # the worst feature loss: the best checkpoint is not the last
    )
    trainer = _trainer(setup, tmp_path / "run", **options)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-2")
    # save_total_limit=1: at the end only the best checkpoint is left
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"]
    saved = tf.AutoModelForCausalLM.from_pretrained(best).state_dict()
    for name, value in trainer.distiller.student.state_dict().items():
        assert torch.equal(value, saved[name]), name  # the best model was loaded at the end


def test_resume_from_checkpoint_reaches_the_uninterrupted_weights(setup, tmp_path):
    uninterrupted = _trainer(setup, tmp_path)
    uninterrupted.train()
    resumed = _trainer(setup, tmp_path / "resumed", save_strategy="no")
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 4
    expected = uninterrupted.distiller.student.state_dict()
    for name, value in resumed.distiller.student.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)


def test_teacher_is_placed_on_the_device_and_dtype(setup, tmp_path):
    teacher = copy.deepcopy(setup[0])
    trainer = _trainer((teacher, *setup[1:]), tmp_path, max_steps=1, save_strategy="no")
    assert {p.device for p in teacher.parameters()} == {trainer.args.device}
    FlexKDTrainer(
        trainer.distiller, args=trainer.args, data_collator=collate, teacher_dtype=torch.bfloat16
    )
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.distiller.student.parameters()} == {torch.float32}
    with pytest.raises(TypeError, match="teacher_dtype"):
        FlexKDTrainer(trainer.distiller, args=trainer.args, teacher_dtype="bf16")
    with pytest.raises(TypeError, match="distiller must be a flexkd Distiller"):
        FlexKDTrainer(_student(), args=trainer.args)


def test_lora_student_trains_saves_and_resumes_its_adapter(setup, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = _trainer(setup, tmp_path, student=peft.get_peft_model(_student(), config))
    trainer.train()
    adapter = load_file(tmp_path / "checkpoint-4" / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)
    resumed = _trainer(
        setup, tmp_path, student=peft.get_peft_model(_student(), config), save_strategy="no"
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for key, value in peft.get_peft_model_state_dict(resumed.distiller.student).items():
        torch.testing.assert_close(value, adapter[key], rtol=1e-5, atol=1e-6)


def test_stored_teacher_outputs_train_as_the_live_teacher(setup, tmp_path):
    from flexkd.teacher_outputs import write_teacher_outputs

    teacher, selection, train_rows, eval_rows = setup
    options = dict(save_strategy="no", logging_steps=1, max_steps=3)
    live = _trainer(setup, tmp_path / "live", **options)
    write_teacher_outputs(
        teacher,
        train_rows,
        tmp_path / "outputs",
        layers=live.distiller.teacher_layers,
        collate=collate,
        batch_size=3,  # batched unlike training: the stored rows are unpacked per row
        progress=False,
    )
    live.train()
    offline_teacher = copy.deepcopy(teacher)
    stored = _trainer(
        (offline_teacher, selection, train_rows, eval_rows),
        tmp_path / "stored",
        teacher_outputs=tmp_path / "outputs",
        **options,
    )

    def no_forward(*args, **kwargs):
        raise AssertionError("the teacher ran although its outputs are stored")

    offline_teacher.forward = no_forward
    stored.train()
    logged = [[e for e in t.state.log_history if "loss" in e] for t in (live, stored)]
    assert len(logged[0]) == len(logged[1]) == 3
    for one, two in zip(*logged, strict=True):
        for key in ("loss", "distill/task", "distill/logit", "distill/feature", "distill/total"):
            assert two[key] == pytest.approx(one[key], rel=1e-5), (one["step"], key)
    # the stored outputs come from batches of 3, training batches differ: the teacher's matmuls round
    # differently, and after 3 Adam steps a weight near zero can be ~1e-6 off (seen on AVX2, not AVX-512)
    expected = live.distiller.student.state_dict()
    for name, value in stored.distiller.student.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-5)


def test_stored_teacher_outputs_of_other_rows_are_refused(setup, tmp_path):
    from flexkd.errors import StoreMismatchError
    from flexkd.teacher_outputs import write_teacher_outputs

    teacher, _, train_rows, eval_rows = setup
    write_teacher_outputs(
        teacher, eval_rows, tmp_path / "outputs", layers=[-1], collate=collate, progress=False
    )
    with pytest.raises(StoreMismatchError, match=r"teacher_outputs: .*rows: stored for 6 rows"):
        _trainer(setup, tmp_path / "run", teacher_outputs=tmp_path / "outputs")


def test_sharded_student_is_refused_naming_what_to_use_instead(setup, tmp_path):
    import torch.distributed as dist

    from flexkd.distributed import shard_model

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert args.device.type == "cpu"  # the Trainer's process state, made before the group exists
    teacher, selection = setup[:2]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        student = shard_model(_student())
        distiller = flexkd.Distiller(teacher, student, selection=selection, weights=WEIGHTS)
        with pytest.raises(ValueError, match=r"student is sharded.*distributed\.fsdp\.student"):
            FlexKDTrainer(distiller, args=args, data_collator=collate)
    finally:
        dist.destroy_process_group()


def test_fsdp_asked_of_the_trainer_is_refused_naming_what_to_use_instead(setup, tmp_path, monkeypatch):
    """``accelerate launch --use_fsdp`` would have the Trainer wrap the whole Distiller by its own policy."""
    teacher, selection = setup[:2]
    distiller = flexkd.Distiller(teacher, _student(), selection=selection, weights=WEIGHTS)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match=r"FSDP was asked for.*shard_model.*distributed\.fsdp"):
        FlexKDTrainer(distiller, args=args, data_collator=collate)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    FlexKDTrainer(distiller, args, data_collator=collate)  # positional args too, without FSDP
