"""Long passes know their length, so their progress bars show a total and an ETA."""

from flexkd.training.teacher_prep import _SizedBatches


def test_scoring_batches_have_a_length_and_the_same_rows():
    rows = [{"x": i} for i in range(10)]
    batches = _SizedBatches(lambda chunk: [r["x"] for r in chunk], rows, [7, 1, 4, 9, 0, 2, 5], 3)
    assert len(batches) == 3
    assert list(batches) == [[7, 1, 4], [9, 0, 2], [5]]
    assert list(batches) == [[7, 1, 4], [9, 0, 2], [5]]  # iterable again (not a one-shot generator)
    assert len(_SizedBatches(list, rows, [], 3)) == 0
