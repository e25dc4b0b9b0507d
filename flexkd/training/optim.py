"""The optimizer and learning-rate schedule of a run (distillation and fine-tuning alike).

Weight decay: matrices decay, parameters with fewer than two dimensions (biases, norm weights) do not.
The schedules are Hugging Face's (``transformers.get_scheduler``): with W warm-up steps, the learning
rate of optimizer step s (counted from 0) is ``lr * s / W`` while ``s < W`` (so with warm-up the first
step runs at 0), then ``linear`` decays to 0 at the last step, ``cosine`` follows half a cosine,
``constant`` stays at ``lr``.
"""

from __future__ import annotations

import torch
from torch import nn

from flexkd.config import TrainSection

SCHEDULES = ("linear", "cosine", "constant")


def parameter_groups(parameters: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW groups: ``weight_decay`` for parameters of 2+ dimensions, 0 for biases and norm weights."""
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adamw(parameters: list[nn.Parameter], *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """Torch's fused AdamW (CPU and CUDA): it takes GradScaler's ``found_inf``, with which the training
    loop skips a non-finite step's update without reading anything back (``flexkd.training.loop``)."""
    return torch.optim.AdamW(parameter_groups(parameters, weight_decay), lr=lr, fused=True)


def lr_schedule(optimizer: torch.optim.Optimizer, kind: str, *, warmup_steps: int, total_steps: int):
    """The ``kind`` schedule (one of ``SCHEDULES``) over ``total_steps`` optimizer steps."""
    from transformers import get_scheduler

    if kind not in SCHEDULES:
        raise ValueError(f"kind: expected one of {SCHEDULES}, got {kind!r}")
    return get_scheduler(
        kind if kind != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=total_steps,
    )


def build_optimizer(parameters: list[nn.Parameter], tc: TrainSection) -> torch.optim.Optimizer:
    return adamw(parameters, lr=tc.lr, weight_decay=tc.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, tc: TrainSection, total_steps: int):
    return lr_schedule(
        optimizer, tc.scheduler, warmup_steps=tc.warmup_steps, total_steps=total_steps
    )
