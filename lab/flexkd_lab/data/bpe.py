"""The byte-level BPE tokenizer of the summarisation task, trained on its train split."""

from __future__ import annotations

from collections.abc import Iterable

PAD, BOS, EOS, SEP = "<pad>", "<s>", "</s>", "<sep>"
SPECIAL_TOKENS = (PAD, BOS, EOS, SEP)


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> str:
    """Train a byte-level BPE on ``texts``; returns the tokenizer as JSON (``tokenizer.json``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise ValueError(
            f"vocab_size: expected more than {len(SPECIAL_TOKENS) + 256}, got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return tokenizer.to_str(pretty=False)
