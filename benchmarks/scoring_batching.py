"""Does ``flexkd.score`` depend on how the data is batched? The issue-11 case, reproducible on a CPU.

The same 4 sequences (lengths 7..16, right-padded, labels -100 on the padding) scored by a randomly
initialised GPT-2-shaped model (GPT-2 small's width and heads, 4 layers) as one batch of 4 and as four
batches of 1, at the last layer with k = 8, twice: with the model's per-batch mean loss
(``loss_fn=lambda out, batch: out.loss``, flexkd's default before issue 11) and with the default
summed loss::

    python benchmarks/scoring_batching.py

prints, for each, both score sums, how many of the top-8 dims agree, the largest relative score
difference; then whether the data fingerprints of the two batchings agree.
"""

from __future__ import annotations

import torch
import transformers

import flexkd

LENGTHS = (16, 7, 12, 9)
K = 8


def sequences(vocab: int, generator: torch.Generator) -> list[torch.Tensor]:
    return [torch.randint(3, vocab, (n,), generator=generator) for n in LENGTHS]


def batch_of(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def main() -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=4, n_embd=768, n_head=12, vocab_size=50257)
    teacher = transformers.GPT2LMHeadModel(config).eval()
    rows = sequences(config.vocab_size, torch.Generator().manual_seed(1))
    for name, loss_fn in (
        ("mean loss (old default)", lambda out, batch: out.loss),
        ("summed loss", None),
    ):
        one = flexkd.score(
            teacher, [batch_of(rows)], layers=[-1], k=K, loss_fn=loss_fn, progress=False
        )
        four = flexkd.score(
            teacher,
            [batch_of([r]) for r in rows],
            layers=[-1],
            k=K,
            loss_fn=loss_fn,
            progress=False,
        )
        a, b = one.scores(-1), four.scores(-1)
        overlap = len(set(one.index(-1).tolist()) & set(four.index(-1).tolist()))
        difference = float(((a - b).abs() / a.abs().clamp_min(1e-30)).max())
        print(f"{name}:")
        print(f"  score sum, one batch of 4:    {float(a.sum()):.6g}")
        print(f"  score sum, four batches of 1: {float(b.sum()):.6g}")
        print(f"  top-{K} dims in common:        {overlap} of {K}")
        print(f"  max relative difference:      {difference:.3g}")
    print(f"same data fingerprint (rows): {one.data_fingerprint == four.data_fingerprint}")


if __name__ == "__main__":
    main()
