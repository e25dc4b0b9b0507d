"""Seeded rows of token ids and their padded batches, for the scoring invariance tests and the gloo worker.

A row is a dict of 1-D tensors before padding: ``input_ids`` and, for causal LMs, ``labels`` with a
prompt prefix of -100; for classifiers a 0-D ``labels``. :func:`collate` pads a list of rows on either
side and gives every row its own ``position_ids`` (0 at its first real token), so a row's hidden states
do not depend on how much padding its batch needs.
"""

from __future__ import annotations

import torch

IGNORE = -100


def causal_rows(seed: int, count: int, *, vocab: int, max_length: int = 10) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        length = int(torch.randint(3, max_length + 1, (1,), generator=generator))
        ids = torch.randint(3, vocab, (length,), generator=generator)
        labels = ids.clone()
        labels[: int(torch.randint(0, length - 1, (1,), generator=generator))] = IGNORE
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def classifier_rows(
    seed: int, count: int, *, vocab: int, classes: int, max_length: int = 10
) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        length = int(torch.randint(2, max_length + 1, (1,), generator=generator))
        rows.append(
            {
                "input_ids": torch.randint(3, vocab, (length,), generator=generator),
                "labels": torch.randint(0, classes, (), generator=generator),
            }
        )
    return rows


def collate(rows: list[dict], side: str = "right", pad_id: int = 0) -> dict:
    width = max(len(row["input_ids"]) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    token_labels = rows[0]["labels"].dim() == 1
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long) if token_labels else None
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        span = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, span], mask[i, span], positions[i, span] = row["input_ids"], 1, torch.arange(n)
        if token_labels:
            labels[i, span] = row["labels"]
    if not token_labels:
        labels = torch.stack([row["labels"] for row in rows])
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}


def batches_of(rows: list[dict], sizes: list[int], side: str = "right") -> list[dict]:
    """``rows`` cut into consecutive batches of ``sizes`` (cycled until every row is in one)."""
    batches, start, i = [], 0, 0
    while start < len(rows):
        size = sizes[i % len(sizes)]
        batches.append(collate(rows[start : start + size], side))
        start, i = start + size, i + 1
    return batches


def assert_same_selection(got, expected):
    """Same scores to fp32 rounding (relative 1e-5 of the largest), top-k, token count and fingerprint."""
    assert got.layers == expected.layers
    assert got.tokens_seen == expected.tokens_seen
    assert got.data_fingerprint == expected.data_fingerprint
    for layer in expected.layers:
        scale = float(expected.scores(layer).abs().max())
        torch.testing.assert_close(
            got.scores(layer), expected.scores(layer), rtol=1e-5, atol=1e-5 * scale
        )
        assert torch.equal(got.index(layer), expected.index(layer))
