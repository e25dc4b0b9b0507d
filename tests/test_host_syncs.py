"""A training step that does not log reads nothing back from the device.

Method: the CPU has no ``torch.cuda.set_sync_debug_mode``, so :class:`SyncCounter` patches every
``Tensor`` method that hands a tensor's value to Python (``item``, ``tolist``, ``numpy``, ``cpu`` and
the ``float``/``int``/``bool``/``index`` conversions) and records who called it while a step runs. On an
accelerator each such call is a device->host synchronisation; on the CPU it is the same call, so zero
calls here means zero there. Not counted: waits inside an op (a boolean-mask index, ``nonzero``, sizes
its output on the host on CUDA), and AdamW's step counters, which torch keeps on the host on purpose
(``capturable=False``) and reads with ``item()``; the counter checks that those are the only exempted
calls. The units are counted before the step, on the host copies of the batches, as the loop does.
"""

from __future__ import annotations

import json
import os
import random
import traceback

import pytest
import torch
from _train_helpers import (
    STUDENT_HIDDEN,
    TEACHER_HIDDEN,
    build,
    gpt2_config,
    write_causal_config,
)

from flexkd.config import TrainSection, load_config
from flexkd.distill import Distiller
from flexkd.errors import NonFiniteLossError
from flexkd.selection import DimensionSelection
from flexkd.teacher_outputs import write_teacher_outputs
from flexkd.training import Collator, make_accelerator, train, train_step
from flexkd.training.loop import window_units
from flexkd.training.optim import build_optimizer, build_scheduler

READ_BACK = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")


# Reads that happen on the CPU only: the ops' backward skips a multiply when the CPU grad_output is 1
CPU_ONLY = {"_is_eager_cpu_one"}


class SyncCounter:
    """Records every call that reads a tensor's value back to Python, as ``"name at file:line (function)"``:
    in ``model_calls`` when the Hugging Face model's own code makes it, else in ``calls``. Calls on
    ``host_tensors()`` and from the CPU-only functions ``CPU_ONLY`` are counted in ``exempt``."""

    def __init__(self, host_tensors=lambda: ()) -> None:
        self.calls: list[str] = []
        self.model_calls: list[str] = []
        self.exempt = 0
        self._host_tensors = host_tensors
        self._saved = {}

    def __enter__(self) -> SyncCounter:
        for name in READ_BACK:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                caller = traceback.extract_stack(limit=2)[0]
                if caller.name in CPU_ONLY or any(tensor is t for t in self._host_tensors()):
                    self.exempt += 1
                else:
                    site = f"{_name} at {caller.filename}:{caller.lineno} ({caller.name})"
                    in_model = f"{os.sep}transformers{os.sep}" in caller.filename
                    (self.model_calls if in_model else self.calls).append(site)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def _optimizer_steps(optimizer):
    return lambda: [state["step"] for state in optimizer.state.values() if "step" in state]


def _rows(n):
    rows = []
    for _ in range(n):
        ids = [random.randrange(3, 64) for _ in range(random.randint(3, 10))]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids})
    return rows


SETUPS = ["live-flex", "live-projector", "stored-dense", "stored-top-k"]


@pytest.fixture(params=SETUPS)
def step_parts(request, tmp_path):
    torch.manual_seed(0)
    random.seed(0)
    teacher = build(gpt2_config(TEACHER_HIDDEN, 2), seed=0)
    student = build(gpt2_config(STUDENT_HIDDEN, 1), seed=1)
    selection = DimensionSelection.from_scores(
        {2: torch.rand(TEACHER_HIDDEN)}, STUDENT_HIDDEN, teacher=teacher
    )
    feature = "projector" if request.param == "live-projector" else "flex"
    distiller = Distiller(
        teacher, student, selection=selection, feature=feature, feature_loss="corr",
        weights={"task": 1.0, "logit": 0.5, "feature": 1.0}, temperature=2.0,
    )  # fmt: skip
    rows, collate = _rows(8), Collator("causal_lm", pad_token_id=0)
    window_rows = [[0, 3, 5], [7, 1]]
    store = None
    if request.param.startswith("stored"):
        store = write_teacher_outputs(
            teacher, rows, tmp_path / "store", layers=[2], collate=collate, progress=False,
            topk=4 if request.param == "stored-top-k" else None, temperature=2.0,
        )  # fmt: skip
    window = [collate([rows[i] for i in r]) for r in window_rows]
    return distiller, window, store, window_rows


def _step(distiller, window, store, window_rows, *, report):
    accelerator = make_accelerator()
    tc = TrainSection(output_dir="unused", max_steps=3, lr=1e-3, weight_decay=0.1)
    optimizer = build_optimizer(distiller.trainable_parameters(), tc)
    scheduler = build_scheduler(optimizer, tc, total_steps=3)
    model, optimizer = accelerator.prepare(distiller, optimizer)
    results = []
    for step in (1, 2):  # the second step runs with AdamW's state and the ops' checks in place
        units = window_units(distiller, window, accelerator)  # on the host copies, before the step
        with SyncCounter(_optimizer_steps(optimizer)) as counting:
            results.append(train_step(
                model, distiller, window, optimizer=optimizer, scheduler=scheduler,
                accelerator=accelerator, step=step, max_grad_norm=1.0, store=store,
                window_rows=window_rows, units=units, report=report,
            ))  # fmt: skip
        yield counting, results[-1]


def test_a_step_that_does_not_report_reads_nothing_back(step_parts):
    for step, (counter, result) in enumerate(_step(*step_parts, report=False), start=1):
        if step == 1:  # the feature op checks each index tensor's values once, then caches the check;
            # the fused logit path checks the student's output projection once, on its first batch
            once = ("flexkd/ops/_validate.py", "flexkd/adapters/output_head.py")
            assert all(any(where in call for where in once) for call in counter.calls), counter.calls
        else:  # a top-K store's indices were checked on the host copy, when the store read them
            assert counter.calls == [], counter.calls
        # GPT-2's own sdpa mask code asks whether the padding mask is all ones (a wait of the model's)
        assert {call.split(" (")[1] for call in counter.model_calls} <= {
            "_ignore_causal_mask_sdpa)"
        }, counter.model_calls
        assert counter.exempt > 0  # AdamW's host step counters were read, and only those
        assert not result.reported
        assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in result.terms.values())
        assert isinstance(result.grad_norm, torch.Tensor)


def test_the_counter_sees_a_reporting_step_and_a_device_count(step_parts):
    distiller, window, *_ = step_parts
    for counter, result in _step(*step_parts, report=True):
        assert any(call.startswith("tolist") for call in counter.calls), counter.calls
        assert result.reported and all(isinstance(v, float) for v in result.terms.values())
    with SyncCounter() as counter:
        distiller.count_units(window[0])
    assert counter.calls and all(call.startswith("__float__") for call in counter.calls)


def test_reported_and_unreported_steps_agree(step_parts):
    distiller, window, store, window_rows = step_parts
    state = {k: v.clone() for k, v in distiller.state_dict().items()}
    quiet = [r for _, r in _step(distiller, window, store, window_rows, report=False)]
    distiller.load_state_dict(state)
    loud = [r for _, r in _step(distiller, window, store, window_rows, report=True)]
    for q, lo in zip(quiet, loud, strict=True):
        assert {k: float(v) for k, v in q.terms.items()} == pytest.approx(lo.terms, rel=1e-6)
        assert float(q.grad_norm) == pytest.approx(lo.grad_norm, rel=1e-6)
        assert q.units == lo.units


def test_the_loop_logs_every_log_every_steps_and_checks_the_steps_between(tmp_path, monkeypatch):
    path = write_causal_config(
        tmp_path, dropout=0.0, distill={"feature": "projector"},
        train={"max_steps": 5, "log_every": 2},
    )  # fmt: skip
    result = train(load_config(path))
    steps = [json.loads(line)["step"] for line in result.metrics_path.read_text().splitlines()]
    assert steps == [2, 4, 5]

    real_from_config = Distiller.from_config.__func__

    def poisoned(cls, *args, **kwargs):  # the task term (weight 0: it never reaches the weights) is NaN at step 3
        distiller = real_from_config(cls, *args, **kwargs)
        real_normalise, calls = distiller._normalise, {"n": 0}

        def normalise(sums, *rest):
            calls["n"] += 1
            if calls["n"] == 3:
                sums = {**sums, "task": sums["task"] * float("nan")}
            return real_normalise(sums, *rest)

        distiller._normalise = normalise
        return distiller

    monkeypatch.setattr(Distiller, "from_config", classmethod(poisoned))
    path = write_causal_config(
        tmp_path, dropout=0.0, name="nan.yaml",
        distill={"feature": "projector", "weights": {"task": 0.0, "logit": 0.5, "feature": 1.0}},
        train={"max_steps": 6, "log_every": 2, "output_dir": "nan"},
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss term 'task' is nan.*before step 4's update; step 3 made no update"):
        train(load_config(path))
    lines = (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2]
