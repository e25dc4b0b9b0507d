"""The unigram-LR bar: fitted on the train rows' token counts, C chosen on validation, reported on both."""

import random

import pytest

from flexkd_lab.tasks.baselines import token_counts, unigram_lr_baseline


def _rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(3)
        ids = [1] + [rng.randrange(10, 40) for _ in range(rng.randint(2, 8))] + [10 + label] * 2 + [2]
        rows.append({"input_ids": ids, "label": label})
    return rows


def test_the_baseline_learns_tokens_that_name_the_class():
    splits = {"train": _rows(120, 0), "validation": _rows(40, 1), "test": _rows(40, 2)}
    report = unigram_lr_baseline(splits, vocab_size=40, c_grid=(1.0, 10.0))
    assert report["validation"]["accuracy"] >= 0.9 and report["test"]["accuracy"] >= 0.9
    assert report["C"] in (1.0, 10.0) and set(report["C_grid"]) == {"1.0", "10.0"}
    assert report["test"]["n"] == 40


def test_token_counts_count_repeats():
    counts = token_counts([{"input_ids": [1, 5, 5, 2]}, {"input_ids": [3]}], vocab_size=6).toarray()
    assert counts[0].tolist() == [0, 1, 1, 0, 0, 2] and counts[1].tolist() == [0, 0, 0, 1, 0, 0]
    with pytest.raises(ValueError):
        token_counts([{"input_ids": [7]}], vocab_size=6)
