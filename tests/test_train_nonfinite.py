"""A non-finite step between reports is not applied: with ``log_every > 1`` a NaN loss at step 3 leaves the
weights and AdamW's state (moments, step count) as step 2 left them, through every step up to the next
report, which stops the run naming step 3; all without reading anything back in the steps between."""

from __future__ import annotations

import random

import pytest
import torch
from _train_helpers import VOCAB, build, gpt2_config

from flexkd.errors import NonFiniteLossError
from flexkd.training import Collator
from flexkd.training.finetune import TaskObjective
from flexkd.training.loop import make_accelerator, run_steps
from flexkd.training.optim import adamw, lr_schedule

NAN_STEP, LOG_EVERY = 3, 5


def _windows(collate, seed=0):
    rng = random.Random(seed)
    while True:
        rows = []
        for _ in range(4):
            ids = [rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 9))]
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids})
        yield [collate(rows)], None


def _snapshot(model, optimizer):
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = {
        (name, key): value.clone() if isinstance(value, torch.Tensor) else value
        for name, p in model.named_parameters()
        for key, value in optimizer.state[p].items()
    }
    return params, state


def _run(optimizer_for):
    torch.manual_seed(0)
    model = build(gpt2_config(16, 1), seed=0)
    calls = {"n": 0}

    def nan_at_step(module, args, out):
        calls["n"] += 1
        return out * float("nan") if calls["n"] == NAN_STEP else out

    model.transformer.ln_f.register_forward_hook(nan_at_step)
    objective = TaskObjective(model)
    optimizer = optimizer_for(list(model.parameters()))
    scheduler = lr_schedule(optimizer, "constant", warmup_steps=0, total_steps=8)
    steps = run_steps(
        objective, objective, _windows(Collator("causal_lm", 0)), optimizer=optimizer,
        scheduler=scheduler, accelerator=make_accelerator(cpu=True), start=0, total=8,
        max_grad_norm=1.0, log_every=LOG_EVERY,
    )  # fmt: skip
    snapshots = {}
    with pytest.raises(NonFiniteLossError) as stopped:
        for step, _ in steps:
            snapshots[step] = _snapshot(model, optimizer)
    return stopped.value, snapshots, _snapshot(model, optimizer)


def test_a_nan_step_between_reports_leaves_the_weights_and_adamw_state_of_the_step_before():
    error, snapshots, final = _run(lambda params: adamw(params, lr=1e-2, weight_decay=0.1))
    assert sorted(snapshots) == [1, 2, 3, 4]  # step 5 reports: it checks steps 1-4 before its update
    assert str(error).startswith(f"step {NAN_STEP}: loss term 'task' is nan at the logits")
    assert "before step 5's update; steps 3 to 4 made no update (the weights are step 2's)" in str(error)
    params_2, state_2 = snapshots[2]
    assert not all(torch.equal(params_2[n], snapshots[1][0][n]) for n in params_2)  # step 2 did update
    for params, state in (snapshots[3], snapshots[4], final):
        assert params.keys() == params_2.keys() and all(torch.equal(params[n], params_2[n]) for n in params)
        assert state.keys() == state_2.keys()
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_2[key])), key
    assert {float(v) for (_, key), v in state_2.items() if key == "step"} == {2.0}


def test_an_optimizer_without_found_inf_applies_the_step_and_the_report_says_so():
    error, snapshots, _ = _run(lambda params: torch.optim.AdamW(params, lr=1e-2, foreach=True))
    assert str(error).startswith(f"step {NAN_STEP}: loss term 'task' is nan")
    assert "steps 3 to 4 updated the weights (the optimizer takes no found_inf)" in str(error)
    assert any(torch.isnan(p).any() for p in snapshots[3][0].values())
