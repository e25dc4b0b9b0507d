"""One optimizer step of the training core (train_step), weight-decay groups, and the run stopping on a
non-finite loss term (no update, no checkpoint, strict-JSON metrics)."""

import copy
import json

import pytest
import torch
from _train_helpers import (
    STUDENT_HIDDEN,
    TEACHER_HIDDEN,
    build,
    causal_batch,
    gpt2_config,
    write_causal_config,
)

from flexkd.checkpoint import list_checkpoints
from flexkd.config import TrainSection, load_config
from flexkd.distill import Distiller
from flexkd.errors import NonFiniteLossError
from flexkd.training import make_accelerator, train, train_step
from flexkd.training.optim import build_optimizer, build_scheduler, parameter_groups
from flexkd.training.run_dir import LOCK_NAME, append_metrics


def _distiller():
    teacher = build(gpt2_config(TEACHER_HIDDEN, 2), seed=0)
    student = build(gpt2_config(STUDENT_HIDDEN, 1), seed=1)
    return Distiller(
        teacher,
        student,
        feature="projector",
        feature_loss="mse",
        weights={"task": 1.0, "logit": 0.5, "feature": 1.0},
    )


def test_train_step_is_one_adamw_step_on_the_window_loss():
    torch.manual_seed(0)
    distiller = _distiller()
    reference = copy.deepcopy(distiller)
    window = [causal_batch(3, 10), causal_batch(2, 8)]
    tc = TrainSection(output_dir="unused", max_steps=1, lr=1e-2, weight_decay=0.1)

    accelerator = make_accelerator()
    optimizer = build_optimizer(distiller.trainable_parameters(), tc)
    scheduler = build_scheduler(optimizer, tc, total_steps=1)
    model, optimizer = accelerator.prepare(distiller, optimizer)
    result = train_step(
        model,
        distiller,
        window,
        optimizer=optimizer,
        scheduler=scheduler,
        accelerator=accelerator,
        step=1,
        max_grad_norm=0.5,
    )

    # The same step written out by hand: units of the whole window, summed losses, clip, AdamW.
    units = {
        name: sum(reference.count_units(b)[name] for b in window)
        for name in ("task", "logit", "feature")
    }
    params = reference.trainable_parameters()
    ref_optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=1e-2,
    )
    outputs = [reference(b, normalizers=units) for b in window]
    sum(loss for loss, _ in outputs).backward()
    ref_norm = float(torch.nn.utils.clip_grad_norm_(params, 0.5))
    ref_optimizer.step()

    assert result.units == units
    assert result.grad_norm == pytest.approx(ref_norm, rel=1e-5)
    for name in ("task", "logit", "feature", "total"):
        want = sum(float(terms[name]) for _, terms in outputs)
        assert result.terms[name] == pytest.approx(want, rel=1e-5), name
    assert result.terms["task"] > 0 and result.terms["logit"] > 0 and result.terms["feature"] > 0
    for got, want in zip(distiller.trainable_parameters(), params, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in distiller.trainable_parameters())


def test_a_non_finite_term_stops_the_step_before_the_update():
    torch.manual_seed(0)
    distiller = _distiller()
    before = [p.detach().clone() for p in distiller.trainable_parameters()]
    accelerator = make_accelerator()
    tc = TrainSection(output_dir="unused", max_steps=1)
    optimizer = build_optimizer(distiller.trainable_parameters(), tc)
    model, optimizer = accelerator.prepare(distiller, optimizer)
    final_norm = distiller.student.transformer.ln_f
    final_norm.register_forward_hook(lambda module, args, out: out * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"step 7: loss term 'task' is nan"):
        train_step(
            model,
            distiller,
            [causal_batch()],
            optimizer=optimizer,
            scheduler=build_scheduler(optimizer, tc, 1),
            accelerator=accelerator,
            step=7,
        )
    for got, want in zip(distiller.trainable_parameters(), before, strict=True):
        assert torch.equal(got, want)
    assert not optimizer.state_dict()["state"]  # AdamW never stepped


def test_weight_decay_skips_biases_and_norm_weights():
    distiller = _distiller()
    groups = parameter_groups(distiller.trainable_parameters(), 0.1)
    names = {id(p): n for n, p in distiller.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    kept = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert "student.transformer.h.0.attn.c_attn.weight" in decayed
    assert "student.transformer.wte.weight" in decayed  # as the teachers' loop: matrices decay
    assert "feature_losses.0.projector.weight" in decayed
    assert {"student.transformer.ln_f.weight", "student.transformer.ln_f.bias"} <= kept
    assert "feature_losses.0.projector.bias" in kept
    assert all(n.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")) for n in kept)


def test_nan_at_step_three_stops_the_run_naming_term_step_and_layer_pair(tmp_path, monkeypatch):
    path = write_causal_config(
        tmp_path,
        dropout=0.0,
        distill={"weights": {"task": 0.0, "logit": 0.0, "feature": 1.0}},
        train={"max_steps": 5, "checkpoint_every": 1, "keep_checkpoints": 10},
    )
    cfg = load_config(path)
    real_from_config = Distiller.from_config.__func__

    def poisoned(cls, *args, **kwargs):
        distiller = real_from_config(cls, *args, **kwargs)
        calls = {"n": 0}

        def nan_at_step_three(module, args, out):
            calls["n"] += 1
            return out * float("nan") if calls["n"] == 3 else out

        distiller.student.transformer.ln_f.register_forward_hook(nan_at_step_three)
        return distiller

    monkeypatch.setattr(Distiller, "from_config", classmethod(poisoned))
    with pytest.raises(NonFiniteLossError) as caught:
        train(cfg)
    message = str(caught.value)
    assert "step 3" in message and "'feature'" in message and "s1-t2" in message
    checkpoints = cfg.output_dir / "checkpoints"
    assert [c.name for c in list_checkpoints(checkpoints)] == ["step-000001", "step-000002"]

    def strict(text):
        raise ValueError(f"bare {text} in metrics.jsonl")

    lines = (cfg.output_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line, parse_constant=strict)["step"] for line in lines] == [1, 2]
    assert not (cfg.output_dir / LOCK_NAME).exists()  # released on the way out


def test_metrics_lines_are_strict_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_metrics(path, {"step": 1, "grad_norm": float("inf"), "task": float("nan"), "lr": 0.1})
    record = json.loads(path.read_text(), parse_constant=lambda text: pytest.fail(text))
    assert record == {"step": 1, "grad_norm": None, "task": None, "lr": 0.1}
