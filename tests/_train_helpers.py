"""Tiny teacher/student pairs built from configs (no downloads) and data/config writers for the training tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import transformers as tf
import yaml

VOCAB = 64
TEACHER_HIDDEN = 32
STUDENT_HIDDEN = 16


def gpt2_config(hidden: int, layers: int, *, dropout: float = 0.0, vocab: int = VOCAB) -> dict:
    return dict(
        model_type="gpt2",
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=2,
        n_positions=32,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )


def bert_config(hidden: int, layers: int, *, num_labels: int = 3) -> dict:
    return dict(
        model_type="bert",
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
        pad_token_id=0,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def bart_config(hidden: int, layers: int) -> dict:
    return dict(
        model_type="bart",
        vocab_size=VOCAB,
        d_model=hidden,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=2 * hidden,
        decoder_ffn_dim=2 * hidden,
        max_position_embeddings=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        dropout=0.0,
    )


_AUTO = {
    "gpt2": tf.AutoModelForCausalLM,
    "bert": tf.AutoModelForSequenceClassification,
    "bart": tf.AutoModelForSeq2SeqLM,
}


def build(config: dict, seed: int | None = None) -> torch.nn.Module:
    options = dict(config)
    model_type = options.pop("model_type")
    if seed is not None:
        torch.manual_seed(seed)
    return _AUTO[model_type].from_config(tf.AutoConfig.for_model(model_type, **options))


def causal_batch(batch_size: int = 3, length: int = 10, *, min_length: int = 3) -> dict:
    """Random ids with right padding of random length in every row but the first; labels = ids, -100 on pads."""
    ids = torch.randint(3, VOCAB, (batch_size, length))
    mask = torch.ones(batch_size, length, dtype=torch.long)
    for row in range(1, batch_size):
        mask[row, random.randint(min_length, length) :] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def write_token_rows(path: Path, rows: int, *, min_len: int = 4, max_len: int = 12) -> None:
    with path.open("w") as f:
        for _ in range(rows):
            n = random.randint(min_len, max_len)
            f.write(
                json.dumps({"input_ids": [random.randrange(3, VOCAB) for _ in range(n)]}) + "\n"
            )


def write_causal_config(
    folder: Path,
    *,
    train: dict | None = None,
    distill: dict | None = None,
    selection: dict | None = None,
    data: dict | None = None,
    dropout: float = 0.1,
    rows: int = 32,
    name: str = "cfg.yaml",
) -> Path:
    """A tiny causal-LM run (GPT-2 teacher 32 wide, student 16 wide) with pre-tokenized data in ``folder``."""
    if not (folder / "train.jsonl").exists():
        write_token_rows(folder / "train.jsonl", rows)
        write_token_rows(folder / "val.jsonl", 8)
    config = {
        "model": {
            "teacher": {"config": gpt2_config(TEACHER_HIDDEN, 2)},
            "student": {"config": gpt2_config(STUDENT_HIDDEN, 1, dropout=dropout)},
        },
        "data": {
            "task": "causal_lm",
            "train": "train.jsonl",
            "validation": "val.jsonl",
            **(data or {}),
        },
        "selection": {"batch_size": 8, **(selection or {})},
        "distill": {"weights": {"task": 1.0, "logit": 0.5, "feature": 1.0}, **(distill or {})},
        "train": {
            "output_dir": "out",
            "batch_size": 4,
            "max_steps": 4,
            "lr": 1.0e-3,
            "progress": False,
            **(train or {}),
        },
    }
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
