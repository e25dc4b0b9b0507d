"""The study's statistics against hand-computed values and scipy, and their edge cases."""

from __future__ import annotations

import math

import pytest
from scipy import stats as scipy_stats

from flexkd_lab.experiments.stats import (
    EXACT_BELOW,
    compare,
    compare_family,
    holm,
    mcnemar,
    paired_difference,
    verdict,
)


def test_paired_difference_matches_the_hand_computed_t_interval():
    # diffs 0.1, 0.0, 0.2: mean 0.1, sd 0.1, t(0.975, 2) = 4.302652729911275
    diff = paired_difference([0.5, 0.6, 0.7], [0.4, 0.6, 0.5])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert diff.n == 3 and diff.mean == pytest.approx(0.1)
    assert (diff.low, diff.high) == pytest.approx((0.1 - half, 0.1 + half))
    assert not diff.excludes_zero


def test_paired_difference_matches_scipy_ttest_rel():
    a = [0.61, 0.63, 0.60, 0.65, 0.62, 0.64]
    b = [0.59, 0.60, 0.60, 0.61, 0.60, 0.62]
    diff = paired_difference(a, b)
    ci = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (diff.low, diff.high) == pytest.approx((ci.low, ci.high))
    assert diff.excludes_zero


@pytest.mark.parametrize("a, b", [([0.5], [0.4]), ([], [])])
def test_paired_difference_refuses_fewer_than_two_seeds(a, b):
    with pytest.raises(ValueError, match="at least 2 seeds"):
        paired_difference(a, b)


def test_paired_difference_refuses_unpaired_values():
    with pytest.raises(ValueError, match="as many"):
        paired_difference([0.1, 0.2], [0.1])


def test_mcnemar_exact_for_few_discordant_pairs():
    # 1 vs 5 discordant: p = 2 * P(X <= 1 | n = 6, 1/2) = 2 * 7/64
    a = [True] * 10 + [True] + [False] * 5
    b = [True] * 10 + [False] + [True] * 5
    test = mcnemar(a, b)
    assert (test.only_a, test.only_b, test.exact) == (1, 5, True)
    assert test.p_value == pytest.approx(14 / 64)


def test_mcnemar_chi_square_with_continuity_correction_for_many():
    a = [True] * 30 + [False] * 10 + [True] * 7
    b = [False] * 30 + [True] * 10 + [True] * 7
    test = mcnemar(a, b)
    assert 30 + 10 >= EXACT_BELOW and not test.exact
    chi2 = (30 - 10 - 1) ** 2 / 40  # 9.025
    assert test.p_value == pytest.approx(math.erfc(math.sqrt(chi2 / 2)))


def test_mcnemar_without_discordant_pairs_is_p_one():
    test = mcnemar([True, False, True], [True, False, True])
    assert (test.only_a, test.only_b, test.p_value) == (0, 0, 1.0)


def test_mcnemar_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="as many examples"):
        mcnemar([True], [True, False])


def test_holm_matches_the_hand_computed_step_down():
    # sorted 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 -> kept monotone at 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0]
    assert holm([]) == []


def test_verdict_says_only_what_the_interval_supports():
    includes = paired_difference([0.5, 0.6, 0.7], [0.4, 0.6, 0.5])
    assert "includes 0: no difference detected at this power" in verdict(includes, 0.5)
    excludes = paired_difference([0.61, 0.63, 0.60, 0.65], [0.59, 0.60, 0.58, 0.61])
    assert verdict(excludes, 0.001).startswith("better")
    assert "not established" in verdict(excludes, 0.2)
    worse = paired_difference([0.59, 0.60, 0.58, 0.61], [0.61, 0.63, 0.60, 0.65])
    assert verdict(worse, 0.001).startswith("worse")


def test_compare_pools_predictions_over_the_common_seeds():
    references = [0, 1, 2, 0]
    metric = {"flex": {0: 1.0, 1: 0.75, 2: 0.5}, "none": {0: 0.5, 1: 0.5}}
    predictions = {
        "flex": {0: [0, 1, 2, 0], 1: [0, 1, 2, 1], 2: [9, 9, 9, 9]},
        "none": {0: [0, 1, 0, 1], 1: [0, 0, 2, 1]},
    }
    result = compare("flex", "none", metric, predictions, references)
    assert result.seeds == (0, 1)
    assert result.difference.mean == pytest.approx(0.375)
    # seed 0: flex right on rows 2, 3 where none is wrong; seed 1: row 1
    assert (result.test.only_a, result.test.only_b) == (3, 0)


def test_compare_refuses_one_seed_with_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 seeds that both finished"):
        compare("a", "b", {"a": {0: 0.5}, "b": {0: 0.4}}, {}, [0])


def test_compare_family_holm_corrects_and_skips_unpaired_comparisons():
    references = [0] * 40
    metric = {m: {0: 0.5, 1: 0.5} for m in ("a", "b", "c")}
    predictions = {
        "a": {0: [0] * 40, 1: [0] * 40},
        "b": {0: [1] * 40, 1: [1] * 40},
        "c": {0: [0] * 40, 1: [0] * 40},
    }
    family = compare_family(
        [("a", "b"), ("a", "c"), ("a", "missing")], metric, predictions, references
    )
    assert [(c.a, c.b) for c in family] == [("a", "b"), ("a", "c")]
    assert family[0].holm_p == pytest.approx(min(1.0, 2 * family[0].test.p_value))
    assert family[1].holm_p == 1.0
