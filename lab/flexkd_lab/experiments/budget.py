"""How much compute one distillation run gets. Every method in a comparison runs under the same budget."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from flexkd.errors import ConfigError

if TYPE_CHECKING:
    from flexkd_lab.experiments.methods import Method


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
    group_by_length: bool = False  # the student's batches: rows of similar length (data.group_by_length)
    # method name -> {"layer_pairs": ..., "feature_weight": ...}: knobs tuned per method on validation
    tuned: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("train_examples", "score_examples", "eval_examples", "batch_size", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: expected a positive int, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr: expected > 0, got {self.lr!r}")
        if self.batch_size > self.train_examples:
            raise ConfigError(
                f"batch_size: {self.batch_size} is more than train_examples={self.train_examples}"
            )
        for method, knobs in self.tuned.items():
            unknown = set(knobs) - {"layer_pairs", "feature_weight"}
            if unknown:
                raise ConfigError(f"tuned[{method!r}]: unknown knobs {sorted(unknown)}")
        if self.eval_split not in ("validation", "test"):
            raise ConfigError(
                f"eval_split: expected 'validation' or 'test', got {self.eval_split!r}"
            )

    def layer_pairs_for(self, method: str) -> Any:
        return self.tuned.get(method, {}).get("layer_pairs", self.layer_pairs)

    def weights_for(self, method: str) -> dict[str, float]:
        weight = self.tuned.get(method, {}).get("feature_weight")
        return dict(self.weights) if weight is None else {**self.weights, "feature": weight}

    def knobs_text(self, method: Method) -> str:
        """``"<layer pairs>; <feature weight>"`` of ``method`` as the tables print it ("" without a feature
        term)."""
        if method.feature == "none":
            return ""
        pairs = self.layer_pairs_for(method.tuned_as)
        where = "last" if pairs == "last" else ", ".join(f"{s}<->{t}" for s, t in pairs)
        return f"{where}; {self.weights_for(method.tuned_as)['feature']:g}"

    def with_(self, **changes: Any) -> RunBudget:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Each feature method's layer pair and feature-loss weight on debian-sections: the best validation accuracy
# (seed 0) of {last layer, student layer 2 <-> teacher layer 3} x {weight 1, 0.1}, every method the same grid
# (python benchmarks/quality/diagnose.py -> benchmarks/results/diagnosis.md). The study reports the test split.
SECTIONS_TUNED: dict[str, dict[str, Any]] = {
    "flex-mse": {"layer_pairs": "last", "feature_weight": 0.1},
    "flex-corr": {"layer_pairs": [[2, 3]], "feature_weight": 0.1},
    "projector": {"layer_pairs": [[2, 3]], "feature_weight": 0.1},
    "projector-corr": {"layer_pairs": "last", "feature_weight": 1.0},
    "cka": {"layer_pairs": [[2, 3]], "feature_weight": 0.1},
}


# The selection ablation at feature weight 1: at the tuned 0.1 the feature term ends near 2% of the loss, too
# little for the choice of dims to show (validation, seed 0: top-k 0.449, random-k 0.419, bottom-k 0.380 at
# weight 1; benchmarks/results/diagnosis.md).
ABLATION_WEIGHT_1: dict[str, Any] = {"layer_pairs": [[2, 3]], "feature_weight": 1.0}


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
        eval_split="test",
        tuned=SECTIONS_TUNED,
    )


def study_budget(task: str, *, quick: bool = False) -> RunBudget:
    """``flexkd study``: one (task, method, seed) run; every method of a task gets exactly this."""
    if quick:
        return demo_budget(quick=True)
    if task == "debian-sections":
        # the whole test split; the weight-1 ablation runs at Flex-KD corr's tuned layer pair
        tuned = {**SECTIONS_TUNED, "flex-corr-w1": ABLATION_WEIGHT_1}
        return demo_budget().with_(eval_examples=2000, tuned=tuned)
    if task == "debian-synopsis":
        # Not tuned on this task: the sections weights, every method at the last layer. 300 steps: after
        # 100 every student sat at ROUGE-L ~0.06 whatever the method; after 300, ~0.11 (teacher 0.139).
        weights = {m: {"feature_weight": t["feature_weight"]} for m, t in SECTIONS_TUNED.items()}
        return RunBudget(
            train_examples=9600,
            score_examples=256,
            eval_examples=500,
            batch_size=32,
            steps=300,
            lr=1e-3,
            warmup_steps=10,
            eval_split="test",
            tuned=weights,
        )
    raise ConfigError(f"task: no study budget for {task!r}")


@dataclass(frozen=True)
class TuningGrid:
    """The validation grid every feature method of the study is tuned on: each feature weight x each layer
    pairing, ``seeds`` per point; the best mean validation accuracy wins (ties: the first in grid order)."""

    feature_weights: tuple[float, ...]
    layer_pairs: tuple[Any, ...]
    seeds: tuple[int, ...] = (0, 1)

    def __post_init__(self) -> None:
        if not self.feature_weights or any(not w > 0 for w in self.feature_weights):
            raise ConfigError(
                f"feature_weights: expected weights > 0, got {self.feature_weights!r}"
            )
        if not self.layer_pairs:
            raise ConfigError("layer_pairs: need at least one layer pairing")
        if len(self.seeds) < 2:
            raise ConfigError(
                f"seeds: the choice needs >= 2 seeds per grid point, got {self.seeds!r}"
            )

    def points(self) -> list[dict[str, Any]]:
        return [
            {
                "layer_pairs": pairs if pairs == "last" else [list(p) for p in pairs],
                "feature_weight": weight,
            }
            for pairs in self.layer_pairs
            for weight in self.feature_weights
        ]


def knobs_tag(knobs: dict[str, Any]) -> str:
    """A file-name-safe name of one grid point: ``last-w1`` / ``2.3-w0.3``."""
    pairs = knobs["layer_pairs"]
    where = "last" if pairs == "last" else "_".join(f"{s}.{t}" for s, t in pairs)
    return f"{where}-w{knobs['feature_weight']:g}"


def pair_budget(pair: str, *, quick: bool = False) -> RunBudget:
    """The study's budget of one (pair, method, knobs, seed) run of debian-sections: every method the same.

    600 steps x 32 rows (~1.9 passes over the 10,000 train rows): the most that fits the 3-hour CPU study.
    The minilm-tiny pilot's task loss fell 2.96 -> 1.65 by step 300 and 1.65 -> 1.16 by 600: slowing, not
    flat (benchmarks/quality/README.md). mpnet-minilm (a pretrained student, lr 1e-4) is sized for the GPU
    script and untested.
    """
    if quick:
        return demo_budget(quick=True).with_(tuned={})
    if pair not in STUDY_GRIDS:
        raise ConfigError(f"pair: expected one of {sorted(STUDY_GRIDS)}, got {pair!r}")
    return RunBudget(
        train_examples=10000,
        score_examples=512,
        eval_examples=2000,  # the whole test split (validation has 1,000 rows)
        batch_size=32,
        steps=600,
        lr=1e-3 if pair == "minilm-tiny" else 1e-4,
        warmup_steps=30,
        eval_split="test",
        group_by_length=True,  # 1.6x fewer token positions than random batches (42 % were padding)
    )


# Feature weights of the grid: the old study's tuned 0.1 left the feature term near 2 % of the loss (issue 14),
# so the CPU grid starts at 1; the GPU one (mpnet-minilm) adds 0.3.
# Student layer <-> teacher layer pairings of the grid: the last layers, and a middle pair at the same depth
# ratio (minilm-tiny: 4-layer student, 6-layer teacher; mpnet-minilm: 6-layer student, 12-layer teacher)
STUDY_GRIDS: dict[str, TuningGrid] = {
    "minilm-tiny": TuningGrid((1.0, 3.0), ("last", ((2, 3),))),
    "mpnet-minilm": TuningGrid((0.3, 1.0, 3.0), ("last", ((3, 6),))),
}
QUICK_GRID = TuningGrid((0.5, 1.0), ("last",))


def study_grid(pair: str, *, quick: bool = False) -> TuningGrid:
    if quick:
        return QUICK_GRID
    if pair not in STUDY_GRIDS:
        raise ConfigError(f"pair: expected one of {sorted(STUDY_GRIDS)}, got {pair!r}")
    return STUDY_GRIDS[pair]
