"""The teachers' fine-tuning settings. The training itself is the library's loop
(:func:`flexkd.training.finetune.fit`, the steps ``flexkd distill`` runs): see its conventions for
the warm-up, the last short batch (dropped) and the data order."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn


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
    group_by_length: bool = False  # batches of similar-length rows: less compute on padding
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


def fit(model: nn.Module, task, config: FitConfig, *, desc: str = "train", progress: bool = True) -> dict:
    """Train ``model`` on ``task``'s train split (its first ``config.train_limit`` rows) with the
    library's loop. Returns steps, seconds and the first and last losses."""
    from flexkd.training.finetune import fit as library_fit

    settings = config.to_dict()
    rows = task.encode("train", settings.pop("train_limit"))
    return library_fit(model, rows, task.collate, **settings, desc=desc, progress=progress)
