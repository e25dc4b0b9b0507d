"""The optimizer and learning-rate schedule of a run.

Weight decay follows the teachers' fine-tuning loop (``flexkd_lab.tasks.training``): matrices decay,
parameters with fewer than two dimensions (biases, norm weights) do not.
"""

from __future__ import annotations

import torch
from torch import nn

from flexkd.config import TrainSection


def parameter_groups(parameters: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW groups: ``weight_decay`` for parameters of 2+ dimensions, 0 for biases and norm weights."""
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(parameters: list[nn.Parameter], tc: TrainSection) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameter_groups(parameters, tc.weight_decay), lr=tc.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, tc: TrainSection, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(
        tc.scheduler if tc.scheduler != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=tc.warmup_steps,
        num_training_steps=total_steps,
    )
