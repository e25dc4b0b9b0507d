"""The config path's scoring budget: ``selection.max_rows`` names the same rows for any world size."""

from __future__ import annotations

import warnings

import _train_helpers as helpers
import pytest

from flexkd.config import ConfigError, load_config
from flexkd.training import Collator, build_model
from flexkd.training.teacher_prep import score_selection


def test_max_rows_and_the_deprecated_max_batches(tmp_path):
    rows = load_config(helpers.write_causal_config(tmp_path, selection={"max_rows": 5}))
    assert rows.selection.row_budget == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(helpers.write_causal_config(tmp_path)).selection.row_budget is None
    path = helpers.write_causal_config(tmp_path, selection={"max_batches": 2, "batch_size": 3})
    with pytest.warns(FutureWarning, match="max_rows = max_batches \\* batch_size = 6"):
        assert load_config(path).selection.row_budget == 6
    both = helpers.write_causal_config(tmp_path, selection={"max_batches": 2, "max_rows": 4})
    with pytest.raises(ConfigError, match="selection: .*give max_rows only"):
        load_config(both)


def test_score_selection_deals_the_same_rows_to_one_or_two_processes(tmp_path):
    cfg = load_config(
        helpers.write_causal_config(tmp_path, selection={"max_rows": 11, "batch_size": 4})
    )
    teacher = build_model(cfg, "teacher")
    rows = [{"input_ids": [3 + i, 4 + i, 5 + (i % 7), 6]} for i in range(20)]

    def scored(rank, world_size):
        seen = []
        collator = Collator("causal_lm", 0)

        def collate(chosen):
            seen.extend(tuple(row["input_ids"]) for row in chosen)
            return collator(chosen)

        selection = score_selection(
            cfg, teacher, 16, rows, collate, rank=rank, world_size=world_size
        )
        return seen, selection.tokens_seen

    alone, tokens = scored(0, 1)
    first, tokens_0 = scored(0, 2)
    second, tokens_1 = scored(1, 2)
    assert len(alone) == 11 and len(first) == 6 and len(second) == 5
    assert sorted(first + second) == sorted(alone)
    assert tokens_0 + tokens_1 == tokens
