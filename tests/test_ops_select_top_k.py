"""select_top_k: the tie rule, k = D, both orders."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexkd.ops import reference, select_top_k


def test_ties_go_to_the_lower_index():
    scores = torch.tensor([1.0, 5.0, 3.0, 5.0, 3.0, 3.0])
    assert select_top_k(scores, 3).tolist() == [1, 2, 3]
    assert select_top_k(scores, 3, order="score").tolist() == [1, 3, 2]
    assert select_top_k(scores, 4, order="score").tolist() == [1, 3, 2, 4]


def test_k_equals_width_returns_every_dim():
    scores = torch.rand(37)
    assert select_top_k(scores, 37).tolist() == list(range(37))
    assert select_top_k(scores, 37, order="score").tolist() == torch.argsort(scores, descending=True).tolist()


def test_all_equal_scores_take_the_first_k():
    assert select_top_k(torch.zeros(10), 4).tolist() == [0, 1, 2, 3]


@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.integers(0, 6), min_size=1, max_size=60), data=st.data())
def test_matches_brute_force(values, data):
    scores = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(1, len(values)))
    brute = sorted(range(len(values)), key=lambda j: (-values[j], j))[:k]
    assert select_top_k(scores, k, order="score").tolist() == brute
    assert select_top_k(scores, k).tolist() == sorted(brute)
    out = select_top_k(scores, k)
    assert out.dtype == torch.int64 and out.shape == (k,)


@pytest.mark.parametrize(
    "scores, k, order, error, words",
    [
        (torch.rand(5), 0, "index", ValueError, "k must"),
        (torch.rand(5), 6, "index", ValueError, "k must"),
        (torch.rand(5), 2.0, "index", ValueError, "k must"),
        (torch.rand(5), 2, "random", ValueError, "order must"),
        (torch.rand(2, 5), 2, "index", ValueError, "scores must"),
        (torch.arange(5), 2, "index", ValueError, "scores must"),
        (torch.tensor([1.0, float("nan")]), 1, "index", ValueError, "NaN"),
        ([1.0, 2.0], 1, "index", TypeError, "scores must"),
    ],
)
def test_bad_input(scores, k, order, error, words):
    with pytest.raises(error, match=words):
        select_top_k(scores, k, order=order)


def test_reference_is_the_op():
    scores = torch.randn(100)
    assert torch.equal(select_top_k(scores, 17), reference.select_top_k(scores, 17))
