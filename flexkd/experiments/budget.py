"""How much compute one distillation run gets. Every method in a comparison runs under the same budget."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class RunBudget:
    """Sizes of one (task, method, seed) run.

    ``train_examples`` rows of the train split feed the student (``steps`` optimizer steps of
    ``batch_size``); ``score_examples`` rows are used to score the teacher's dims; ``eval_examples`` rows
    of ``eval_split`` give the reported metrics. ``weights``/``temperature`` are the Distiller's loss
    weights and logit-KD temperature, identical for every method.
    """

    train_examples: int
    score_examples: int
    eval_examples: int
    batch_size: int
    steps: int
    lr: float
    warmup_steps: int = 0
    eval_split: str = "validation"
    weights: dict[str, float] = field(
        default_factory=lambda: {"task": 1.0, "logit": 1.0, "feature": 1.0}
    )
    temperature: float = 2.0
    layer_pairs: Any = "last"

    def __post_init__(self) -> None:
        for name in ("train_examples", "score_examples", "eval_examples", "batch_size", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr!r}")
        if self.batch_size > self.train_examples:
            raise ValueError(
                f"batch_size: {self.batch_size} is more than train_examples={self.train_examples}"
            )
        if self.eval_split not in ("validation", "test"):
            raise ValueError(
                f"eval_split: expected 'validation' or 'test', got {self.eval_split!r}"
            )

    def with_(self, **changes: Any) -> RunBudget:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def demo_budget(*, quick: bool = False) -> RunBudget:
    """``flexkd demo``: three students on the classification task within the demo's 10 minutes (2 CPU cores)."""
    if quick:
        return RunBudget(
            train_examples=32, score_examples=16, eval_examples=16, batch_size=8, steps=2, lr=1e-3
        )
    return RunBudget(
        train_examples=6400,
        score_examples=512,
        eval_examples=1000,
        batch_size=32,
        steps=200,
        lr=1e-3,
        warmup_steps=10,
    )


def study_budget(task: str, *, quick: bool = False) -> RunBudget:
    """``flexkd study``: one (task, method, seed) run; every method of a task gets exactly this."""
    if quick:
        return demo_budget(quick=True)
    if task == "debian-sections":
        return demo_budget().with_(train_examples=3200, steps=100)
    if task == "debian-synopsis":
        return RunBudget(
            train_examples=3200,
            score_examples=256,
            eval_examples=200,
            batch_size=32,
            steps=100,
            lr=1e-3,
            warmup_steps=10,
        )
    raise ValueError(f"task: no study budget for {task!r}")
