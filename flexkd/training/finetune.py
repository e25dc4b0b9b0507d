"""Fine-tuning one model on its own task loss (training a teacher), through the distillation loop.

    stats = fit(model, rows, collate, epochs=3, batch_size=32, lr=1e-3, warmup_ratio=0.05)

The steps are :func:`~flexkd.training.loop.run_steps`, the loop ``flexkd distill`` runs, with
:class:`TaskObjective` in the Distiller's place, so both share every convention:

- the loss of a step is the summed token (or sequence) cross-entropy over the labelled positions of
  the window divided by their number, as the Distiller's task term;
- AdamW with weight decay on matrices only; gradient clipping at ``max_grad_norm``;
- warm-up and decay as Hugging Face's linear schedule (:mod:`flexkd.training.optim`): with
  ``W = int(warmup_ratio * total_steps)``, step s (from 0) runs at ``lr * s / W`` while ``s < W``, then
  decays linearly to 0 at the last step;
- the data order of :class:`~flexkd.training.data.ShardedOrder`: epoch e is a permutation seeded with
  ``seed + e``, and the last short batch of an epoch is dropped (an epoch is ``len(rows) // batch_size``
  steps);
- the device is read only every ``log_every`` steps (and at the end).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from flexkd.adapters.masks import aligned_logits, detect_task, logit_positions
from flexkd.distill import per_unit
from flexkd.losses import task_loss
from flexkd.training.data import IGNORE_INDEX, ShardedOrder, row_lengths
from flexkd.training.optim import adamw, lr_schedule

FIT_TASKS = ("sequence", "causal_lm", "token")


class TaskObjective(nn.Module):
    """A model's task loss in the interface of :class:`~flexkd.distill.Distiller` that the loop drives:
    ``count_units``, ``layer_pairs`` (none) and ``(loss, terms)`` from a batch and the window's units."""

    layer_pairs: tuple = ()

    def __init__(self, model: nn.Module, *, task: str | None = None, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.model = model
        self.task = task or detect_task(model)
        if self.task not in FIT_TASKS:
            raise ValueError(
                f"task: fine-tuning supports {FIT_TASKS} models, {type(model).__name__} is {self.task!r}"
            )
        self.ignore_index = ignore_index

    @property
    def student(self) -> nn.Module:
        """The model being trained, under the name the loop reads from a Distiller."""
        return self.model

    def _positions(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        if batch.get("labels") is None:
            raise ValueError("batch: fine-tuning needs labels in every batch")
        return logit_positions(batch, task=self.task, ignore_index=self.ignore_index)

    def count_units(self, batch: Mapping[str, Any]) -> dict[str, float]:
        """The labelled positions of ``batch`` (call it on the host copy)."""
        return {"task": float(self._positions(batch)[1].sum()), "logit": 0.0, "feature": 0.0}

    def forward(self, batch, normalizers=None, teacher_outputs=None) -> tuple[Tensor, dict[str, Tensor]]:
        labels, positions = self._positions(batch)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = aligned_logits(self.model(**inputs).logits, self.task)[positions]
        total = task_loss(logits, labels[positions], ignore_index=self.ignore_index, reduction="sum")
        units = normalizers["task"] if normalizers is not None else positions.sum()
        loss = per_unit(total, units)
        return loss, {"task": loss.detach(), "total": loss.detach()}


def fit(
    model: nn.Module,
    rows: Sequence[Any],
    collate: Callable[[list], dict[str, Tensor]],
    *,
    epochs: float = 1.0,
    max_steps: int | None = None,
    batch_size: int = 32,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.1,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    freeze_word_embeddings: bool = False,
    group_by_length: bool = False,
    task: str | None = None,
    log_every: int = 50,
    progress: bool = True,
    desc: str = "train",
) -> dict[str, float]:
    """Train ``model`` on ``rows`` (batched by ``collate``, labels included) for ``epochs`` (at most
    ``max_steps`` steps). ``freeze_word_embeddings`` keeps the input embedding table fixed (no gradient,
    no update, no decay; trainable again afterwards). ``group_by_length`` batches rows of similar
    length (:class:`~flexkd.training.data.ShardedOrder`), so less compute goes to padding. Leaves the
    model in eval mode on the device it was trained on. Returns ``{"steps", "seconds", "first_loss", "last_loss_mean20"}``."""
    from flexkd.training.loop import make_accelerator, run_steps

    if not epochs > 0:
        raise ValueError(f"epochs: expected > 0, got {epochs}")
    if max_steps is not None and max_steps <= 0:
        raise ValueError(f"max_steps: expected > 0 or None, got {max_steps}")
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"warmup_ratio: expected in [0, 1), got {warmup_ratio}")
    order = ShardedOrder(
        len(rows), batch_size, seed=seed, lengths=row_lengths(rows) if group_by_length else None
    )
    total = math.ceil(epochs * order.per_epoch)
    total = min(total, max_steps) if max_steps is not None else total

    objective = TaskObjective(model, task=task)
    words = model.get_input_embeddings().weight
    words_trainable = words.requires_grad
    if freeze_word_embeddings:
        words.requires_grad_(False)
    try:
        device = words.device
        accelerator = make_accelerator(cpu=device.type == "cpu")  # trains where the model is
        optimizer = adamw(
            [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
        )
        scheduler = lr_schedule(
            optimizer, "linear", warmup_steps=int(warmup_ratio * total), total_steps=total
        )
        batches = order.batches(0, 0)

        def windows():
            for _, _, indices in batches:
                yield [collate([rows[i] for i in indices])], None

        losses: list[Tensor | float] = []
        started = time.perf_counter()
        objective.train()
        with tqdm(total=total, desc=desc, unit="step", disable=not progress) as bar:
            for _, result in run_steps(
                objective, objective, windows(), optimizer=optimizer, scheduler=scheduler,
                accelerator=accelerator, start=0, total=total, max_grad_norm=max_grad_norm,
                log_every=log_every,
            ):  # fmt: skip
                losses.append(result.terms["task"])
                if result.reported:
                    bar.set_postfix(loss=f"{result.terms['task']:.3f}")
                bar.update(1)
        seconds = time.perf_counter() - started
    finally:
        words.requires_grad_(words_trainable)
    model.eval()
    values = torch.tensor([float(v) for v in losses])  # the one read-back of the unreported steps
    return {
        "steps": len(values),
        "seconds": seconds,
        "first_loss": float(values[0]),
        "last_loss_mean20": float(values[-20:].mean()),
    }
