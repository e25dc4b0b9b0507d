"""A plain supervised fine-tuning loop (AdamW, linear warm-up/decay, progress bar), used to
train the teachers. Distillation has its own loop in ``flexkd.training``."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from flexkd.training.data import move_to_device


@dataclass(frozen=True)
class FitConfig:
    epochs: float = 1.0
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    train_limit: int | None = None  # first n training rows only
    max_steps: int | None = None  # stop early (tests, smoke runs)
    freeze_word_embeddings: bool = False  # keep the (pretrained) token embedding table fixed
    seed: int = 0

    def __post_init__(self):
        if self.epochs <= 0:
            raise ValueError(f"epochs: expected > 0, got {self.epochs}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size: expected > 0, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio: expected in [0, 1), got {self.warmup_ratio}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps: expected > 0 or None, got {self.max_steps}")

    def to_dict(self) -> dict:
        return asdict(self)


def linear_schedule(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def fit(
    model: nn.Module, loader, config: FitConfig, *, desc: str = "train", progress: bool = True
) -> dict:
    """Train ``model`` on batches from ``loader`` (dicts that ``model(**batch)`` accepts, with
    labels, so the output has ``.loss``). Returns steps, seconds and the last losses."""
    steps_per_epoch = len(loader)
    total = math.ceil(config.epochs * steps_per_epoch)
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    words = model.get_input_embeddings().weight
    words_trainable = words.requires_grad
    if config.freeze_word_embeddings:
        words.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(total, max(1, int(config.warmup_ratio * total)))
    )
    device = next(model.parameters()).device
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress)
    step = 0
    while step < total:
        for batch in loader:
            if step >= total:
                break
            loss = model(**move_to_device(batch, device)).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    words.requires_grad_(words_trainable)
    model.eval()
    return {
        "steps": step,
        "seconds": time.perf_counter() - start,
        "first_loss": losses[0],
        "last_loss_mean20": sum(losses[-20:]) / len(losses[-20:]),
    }
