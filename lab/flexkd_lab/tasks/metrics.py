"""Task metrics: accuracy and macro-F1 for classification, ROUGE-L for summarisation."""

from __future__ import annotations

from collections.abc import Sequence


def _check_pair(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions: expected as many as references ({len(references)}), got {len(predictions)}"
        )
    if len(references) == 0:
        raise ValueError("references: expected at least one example")


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    _check_pair(predictions, references)
    return sum(int(p) == int(r) for p, r in zip(predictions, references, strict=True)) / len(
        references
    )


def macro_f1(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in either sequence."""
    from sklearn.metrics import f1_score

    _check_pair(predictions, references)
    return float(f1_score(list(references), list(predictions), average="macro", zero_division=0))


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure in [0, 1] (``rouge-score``, Porter stemming)."""
    from rouge_score import rouge_scorer

    _check_pair(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return sum(
        scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)
    ) / len(references)
