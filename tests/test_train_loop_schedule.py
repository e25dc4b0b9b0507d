"""Fine-tuning through the library's loop (flexkd.training.finetune.fit, which trains the lab's teachers):
its loss, HF's linear warm-up, the data order (dropped short batch, reseeded epochs), frozen word
embeddings, and a non-finite loss stopping it."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from _train_helpers import VOCAB, bart_config, bert_config, build, gpt2_config

from flexkd.errors import NonFiniteLossError
from flexkd.training import Collator, ShardedOrder, finetune
from flexkd.training.finetune import TaskObjective, fit
from flexkd.training.optim import lr_schedule


def _rows(n, *, task="causal_lm", seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 9))]
        label = ids if task == "causal_lm" else rng.randrange(3)
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": label})
    return rows


@pytest.mark.parametrize("task,config", [("causal_lm", gpt2_config(16, 1)), ("sequence", bert_config(16, 1))])
def test_the_objective_is_the_models_own_loss_on_one_batch(task, config):
    model = build(config, seed=0).eval()
    batch = Collator(task, pad_token_id=0)(_rows(4, task=task))
    loss, terms = TaskObjective(model)(batch)
    torch.testing.assert_close(loss, model(**batch).loss, rtol=1e-5, atol=1e-6)
    assert terms["task"] == terms["total"] and not terms["task"].requires_grad


def test_one_fit_step_is_one_adamw_step_on_the_labelled_tokens():
    rows, collate = _rows(6), Collator("causal_lm", pad_token_id=0)
    model = build(gpt2_config(16, 1), seed=0)
    reference = copy.deepcopy(model)
    stats = fit(model, rows, collate, max_steps=1, batch_size=4, lr=1e-2, weight_decay=0.1,
                warmup_ratio=0.0, max_grad_norm=0.5, seed=3, progress=False)  # fmt: skip

    batch = collate([rows[i] for i in ShardedOrder(6, 4, seed=3).epoch_batches(0)[0]])
    params = list(reference.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=1e-2,
    )  # fmt: skip
    loss = reference(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    optimizer.step()
    assert stats["steps"] == 1 and stats["first_loss"] == pytest.approx(loss.item(), rel=1e-5)
    for got, want in zip(model.parameters(), params, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not model.training


def test_warmup_is_hf_linear_schedule(monkeypatch):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = lr_schedule(optimizer, "linear", warmup_steps=4, total_steps=10)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    want = [2.0 * s / 4 for s in range(4)] + [2.0 * (10 - s) / 6 for s in range(4, 10)]
    assert seen == pytest.approx(want)  # step 0 runs at lr 0; the last at lr / 6

    calls = []

    def spy(optimizer, kind, *, warmup_steps, total_steps):
        calls.append((kind, warmup_steps, total_steps))
        return lr_schedule(optimizer, kind, warmup_steps=warmup_steps, total_steps=total_steps)

    monkeypatch.setattr(finetune, "lr_schedule", spy)
    fit(build(gpt2_config(16, 1)), _rows(10), Collator("causal_lm", 0), epochs=2.5, batch_size=3,
        warmup_ratio=0.3, progress=False)  # fmt: skip
    assert calls == [("linear", 2, 8)]  # ceil(2.5 * (10 // 3)) steps, int(0.3 * 8) warm-up


def test_epochs_drop_the_short_batch_and_reshuffle():
    rows = _rows(10)
    seen = []
    collate = Collator("causal_lm", pad_token_id=0)

    def recording(batch_rows):
        seen.append([rows.index(r) for r in batch_rows])
        return collate(batch_rows)

    stats = fit(build(gpt2_config(16, 1)), rows, recording, epochs=2, batch_size=4, seed=5,
                progress=False)  # fmt: skip
    assert stats["steps"] == 4 and len(seen) == 4  # 10 // 4 = 2 steps an epoch, the last 2 rows dropped
    first, second = seen[:2], seen[2:]
    assert first == ShardedOrder(10, 4, seed=5).epoch_batches(0)
    assert second == ShardedOrder(10, 4, seed=5).epoch_batches(1) != first


def test_frozen_word_embeddings_do_not_move():
    model = build(gpt2_config(16, 1), seed=0)
    words = model.get_input_embeddings().weight
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # GPT-2 ties the output head to the word embeddings: both stay put
    fit(model, _rows(8), Collator("causal_lm", 0), max_steps=3, batch_size=4, lr=1e-2,
        warmup_ratio=0.0, freeze_word_embeddings=True, progress=False)  # fmt: skip
    assert torch.equal(words, before["transformer.wte.weight"]) and words.requires_grad
    assert not torch.equal(model.transformer.wpe.weight, before["transformer.wpe.weight"])


def test_a_non_finite_loss_stops_fit_naming_the_step():
    model = build(gpt2_config(16, 1), seed=0)
    calls = {"n": 0}

    def nan_at_step_two(module, args, out):
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 2 else out

    model.transformer.ln_f.register_forward_hook(nan_at_step_two)
    with pytest.raises(NonFiniteLossError, match=r"step 2: loss term 'task' is nan.*before step 3's update; step 2 made no update \(the weights are step 1's\)"):
        fit(model, _rows(12), Collator("causal_lm", 0), max_steps=3, batch_size=4, log_every=3, progress=False)
    with pytest.raises(FloatingPointError, match=r"step 1: loss term 'task' is nan"):
        calls["n"] = 1
        fit(model, _rows(12), Collator("causal_lm", 0), max_steps=3, batch_size=4, log_every=1, progress=False)


def test_bad_fit_arguments():
    model, rows, collate = build(gpt2_config(16, 1)), _rows(4), Collator("causal_lm", 0)
    with pytest.raises(ValueError, match="epochs"):
        fit(model, rows, collate, epochs=0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        fit(model, rows, collate, warmup_ratio=1.0)
    with pytest.raises(ValueError, match="max_steps"):
        fit(model, rows, collate, max_steps=0)
    with pytest.raises(ValueError, match="task: fine-tuning supports"):
        TaskObjective(build(bart_config(16, 1)))
