import pytest

from flexkd_lab.tasks.pairs import PAIRS, get_pair


def test_pairs_describe_the_two_width_ratios():
    assert PAIRS["minilm-tiny"].ratio == "3:1"
    assert PAIRS["mpnet-minilm"].ratio == "2:1"
    assert not PAIRS["minilm-tiny"].own_teacher_ids
    assert PAIRS["mpnet-minilm"].own_teacher_ids


def test_unknown_pair_is_refused_by_name():
    with pytest.raises(ValueError, match="pair: expected one of"):
        get_pair("gpt2-tiny")
