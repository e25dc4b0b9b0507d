"""The study's statistics: paired differences over seeds with t intervals, McNemar tests on pooled
per-example predictions, Holm's correction across a family of comparisons, and the sentence each supports.

diff = paired_difference(flex_accuracies, none_accuracies)      # seeds in the same order on both sides
test = mcnemar(flex_correct, none_correct)                       # per-example correctness, pooled over seeds
adjusted = holm([c.p_value for c in tests])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# McNemar's chi-square approximation is used from this many discordant pairs up; below, the exact test
EXACT_BELOW = 25


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided Student-t interval (for a paired difference: the mean of ``a - b``)."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of ``values`` (one per seed) and its Student-t interval; needs >= 2 values."""
    from scipy import stats

    if len(values) < 2:
        raise ValueError(f"values: a confidence interval needs at least 2 seeds, got {len(values)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected in (0, 1), got {confidence!r}")
    n = len(values)
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, confidence)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of ``a[i] - b[i]`` and its t interval; needs >= 2 pairs (one seed has no spread)."""
    if len(a) != len(b):
        raise ValueError(f"paired values: expected as many a as b, got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError(
            f"paired values: a confidence interval needs at least 2 seeds on both sides, got {len(a)}"
        )
    return mean_interval([float(x) - float(y) for x, y in zip(a, b, strict=True)], confidence)


@dataclass(frozen=True)
class McNemar:
    """``only_a``: examples ``a`` got right and ``b`` wrong; ``only_b`` the reverse."""

    only_a: int
    only_b: int
    p_value: float
    exact: bool


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> McNemar:
    """McNemar's test of equal error rates on paired per-example correctness (two-sided).

    Exact (binomial, p = 1/2 on the discordant pairs) below :data:`EXACT_BELOW` discordant pairs, else the
    chi-square statistic with continuity correction. No discordant pair gives p = 1.
    """
    from scipy import stats

    if len(correct_a) != len(correct_b):
        raise ValueError(
            f"correctness: expected as many examples on both sides, got {len(correct_a)} and {len(correct_b)}"
        )
    if not correct_a:
        raise ValueError("correctness: need at least one example")
    only_a = sum(bool(x) and not bool(y) for x, y in zip(correct_a, correct_b, strict=True))
    only_b = sum(bool(y) and not bool(x) for x, y in zip(correct_a, correct_b, strict=True))
    discordant = only_a + only_b
    if discordant == 0:
        return McNemar(0, 0, 1.0, True)
    if discordant < EXACT_BELOW:
        p = float(stats.binomtest(only_a, discordant, 0.5).pvalue)
        return McNemar(only_a, only_b, min(1.0, p), True)
    chi2 = (abs(only_a - only_b) - 1) ** 2 / discordant
    return McNemar(only_a, only_b, float(stats.chi2.sf(chi2, 1)), False)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (step-down, monotone, capped at 1)."""
    for p in p_values:
        if not 0 <= p <= 1:
            raise ValueError(f"p_values: expected values in [0, 1], got {p!r}")
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def verdict(diff: Interval, adjusted_p: float, alpha: float = 0.05) -> str:
    """What the interval and the corrected McNemar test support, in words (differences in points = x100)."""
    points = f"{100 * diff.mean:+.1f} points ({100 * diff.low:+.1f} to {100 * diff.high:+.1f})"
    if diff.excludes_zero and adjusted_p < alpha:
        side = "better" if diff.mean > 0 else "worse"
        return f"{side}: {points}; the interval excludes 0 and McNemar agrees (Holm p = {adjusted_p:.3g})"
    if diff.excludes_zero:
        return (
            f"{points}: the seed interval excludes 0 but the per-example test does not confirm it after "
            f"correction (Holm p = {adjusted_p:.3g}); not established"
        )
    if adjusted_p < alpha:
        return (
            f"{points}: the interval includes 0 although McNemar on the pooled predictions rejects equal "
            f"error rates (Holm p = {adjusted_p:.3g}); the seeds disagree, no difference established"
        )
    return f"{points}: the interval includes 0: no difference detected at this power"


@dataclass(frozen=True)
class Comparison:
    """``a`` - ``b`` on the seeds both have: the paired difference of the metric and McNemar on the pooled
    test predictions; ``holm_p`` is filled in across the family by :func:`compare_family`."""

    a: str
    b: str
    seeds: tuple[int, ...]
    difference: Interval
    test: McNemar
    holm_p: float = float("nan")

    @property
    def sentence(self) -> str:
        return verdict(self.difference, self.holm_p)


def compare(
    a: str,
    b: str,
    metric: dict[str, dict[int, float]],
    predictions: dict[str, dict[int, Sequence[int]]],
    references: Sequence[int],
) -> Comparison:
    """Method ``a`` against ``b``: ``metric[method][seed]`` the per-seed metric, ``predictions[method][seed]``
    the predicted label of every reference row."""
    seeds = tuple(sorted(set(metric.get(a, {})) & set(metric.get(b, {}))))
    if len(seeds) < 2:
        raise ValueError(
            f"compare {a} with {b}: need at least 2 seeds that both finished, got {list(seeds)}"
        )
    correct: dict[str, list[bool]] = {a: [], b: []}
    for method in (a, b):
        for seed in seeds:
            labels = predictions[method][seed]
            if len(labels) != len(references):
                raise ValueError(
                    f"{method} seed {seed}: {len(labels)} predictions for {len(references)} references"
                )
            correct[method] += [int(p) == int(r) for p, r in zip(labels, references, strict=True)]
    return Comparison(
        a,
        b,
        seeds,
        paired_difference([metric[a][s] for s in seeds], [metric[b][s] for s in seeds]),
        mcnemar(correct[a], correct[b]),
    )


def compare_family(
    pairs: Sequence[tuple[str, str]],
    metric: dict[str, dict[int, float]],
    predictions: dict[str, dict[int, Sequence[int]]],
    references: Sequence[int],
) -> list[Comparison]:
    """:func:`compare` of every ``(a, b)`` that has >= 2 common seeds, Holm-corrected together (pairs
    without enough seeds are left out, not guessed)."""
    import dataclasses

    done = []
    for a, b in pairs:
        common = set(metric.get(a, {})) & set(metric.get(b, {}))
        if len(common) >= 2:
            done.append(compare(a, b, metric, predictions, references))
    adjusted = holm([c.test.p_value for c in done])
    return [dataclasses.replace(c, holm_p=p) for c, p in zip(done, adjusted, strict=True)]
