"""A run's data: the splits a config names, tokenized per task; the collator that pads rows into
batches; and the data order (a seeded permutation per epoch, sharded over processes, resumable at
any micro-batch)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flexkd.config import Config
from flexkd.errors import ConfigError
from flexkd.teacher_inputs import TEACHER_KEYS
from flexkd.training.factories import DATA_FACTORIES, resolve_factory

IGNORE_INDEX = -100
_DATA_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_COMPRESSIONS = ("", ".gz", ".bz2", ".xz", ".zst")


# --------------------------------------------------------------------------------------------------
# Splits and tokenisation.


@dataclass
class Splits:
    """Tokenized rows per split, and the number of classes for classification tasks."""

    rows: dict[str, Sequence[Mapping[str, Any]]]
    num_labels: int | None = None

    def get(self, split: str) -> Sequence[Mapping[str, Any]]:
        if split not in self.rows:
            raise ConfigError(
                f"data.{split}: this config has no {split!r} split (it has {sorted(self.rows)})"
            )
        return self.rows[split]


def build_splits(cfg: Config, tokenizer) -> Splits:
    """Every split the config names, tokenized (or as ``data.factory`` returns them)."""
    if cfg.data.factory is not None:
        rows = dict(
            resolve_factory(cfg.data.factory, DATA_FACTORIES, "data.factory")(cfg, tokenizer)
        )
        return Splits(rows, _count_labels(cfg, rows.get("train", ())))
    raw = {
        split: _load_table(cfg, split)
        for split in ("train", "validation", "test")
        if getattr(cfg.data, split) is not None
    }
    label_names = _label_names(cfg, raw["train"])
    rows = {
        split: _tokenize(cfg, table, tokenizer, label_names, split) for split, table in raw.items()
    }
    num_labels = len(label_names) if label_names is not None else _count_labels(cfg, rows["train"])
    return Splits(rows, num_labels)


def _load_table(cfg: Config, split: str):
    import datasets

    path = cfg.path(getattr(cfg.data, split))
    if path.is_dir():
        return datasets.load_from_disk(str(path))
    if not path.is_file():
        raise ConfigError(f"data.{split}: no file or folder at {path}")
    fmt = _data_format(path)
    if fmt is None:
        raise ConfigError(
            f"data.{split}: {path.name} is not one of {sorted(_DATA_FORMATS)} (optionally compressed: "
            f"{', '.join(c for c in _COMPRESSIONS if c)}) or a saved dataset folder"
        )
    return datasets.load_dataset(fmt, data_files=str(path), split="train")


def _data_format(path: Path) -> str | None:
    """The ``datasets`` builder for a data file, looking through a compression suffix."""
    suffixes = path.suffixes
    compression = suffixes[-1] if suffixes and suffixes[-1] in _COMPRESSIONS else ""
    data_suffix = (
        suffixes[-2] if compression and len(suffixes) >= 2 else (suffixes[-1] if suffixes else "")
    )
    return _DATA_FORMATS.get(data_suffix)


def _label_names(cfg: Config, table) -> list[str] | None:
    """Sorted class names when a sequence task has string labels (ids follow this order)."""
    if cfg.data.task != "sequence" or "input_ids" in table.column_names:
        return None
    if cfg.data.label_field not in table.column_names:
        raise ConfigError(
            f"data.label_field: column {cfg.data.label_field!r} is not in the train data"
        )
    values = table[cfg.data.label_field]
    return sorted({str(v) for v in values}) if values and isinstance(values[0], str) else None


def _count_labels(cfg: Config, rows: Sequence[Mapping[str, Any]]) -> int | None:
    if cfg.data.task not in ("sequence", "token") or len(rows) == 0:
        return None
    labels = (row["labels"] for row in rows if "labels" in row)
    flat = [
        v
        for value in labels
        for v in (value if isinstance(value, list) else [value])
        if v != IGNORE_INDEX
    ]
    return max(flat) + 1 if flat else None


def _tokenize(cfg: Config, table, tokenizer, label_names: list[str] | None, split: str):
    data = cfg.data
    if "input_ids" in table.column_names:
        keep = [
            c
            for c in ("input_ids", "attention_mask", "token_type_ids", "labels", *TEACHER_KEYS)
            if c in table.column_names
        ]
        return table.select_columns(keep)
    if tokenizer is None:
        raise ConfigError(
            f"model.tokenizer: data.{split} holds raw text, so a tokenizer is needed "
            "(set model.tokenizer, or give pre-tokenized input_ids)"
        )
    if data.task == "token":
        raise ConfigError(
            "data.task: token classification data must be pre-tokenized (input_ids and labels)"
        )
    for column in [data.text_field] + [c for c in (data.text_pair_field,) if c]:
        if column not in table.column_names:
            raise ConfigError(f"data.text_field: column {column!r} is not in data.{split}")
    label_ids = {name: i for i, name in enumerate(label_names)} if label_names else None

    def encode(batch):
        pairs = batch[data.text_pair_field] if data.text_pair_field else None
        encoded = tokenizer(
            batch[data.text_field], pairs, truncation=True, max_length=data.max_length
        )
        if data.task == "causal_lm":
            encoded["labels"] = [list(ids) for ids in encoded["input_ids"]]
        elif data.task == "sequence":
            labels = batch[data.label_field]
            encoded["labels"] = (
                [label_ids[str(v)] for v in labels] if label_ids else [int(v) for v in labels]
            )
        else:
            targets = tokenizer(
                text_target=batch[data.target_field],
                truncation=True,
                max_length=data.target_max_length,
            )
            encoded["labels"] = targets["input_ids"]
        return encoded

    return table.map(
        encode, batched=True, remove_columns=table.column_names, desc=f"tokenize {split}"
    )


# --------------------------------------------------------------------------------------------------
# Batches.


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_value: int, *, left: bool = False
) -> torch.Tensor:
    """A ``[B, T]`` int64 tensor of ``sequences`` padded with ``pad_value`` to the longest one
    (on the right, or on the left with ``left=True``)."""
    if not sequences:
        raise ValueError("sequences: expected at least one sequence")
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            values = torch.as_tensor(list(seq), dtype=torch.long)
            if left:
                out[row, width - len(seq) :] = values
            else:
                out[row, : len(seq)] = values
    return out


def move_to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """``batch`` with every tensor on ``device`` (other values unchanged)."""
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


class Collator:
    """Right-pads tokenized rows into a batch of tensors (labels padded with -100).

    Causal-LM rows without labels get ``labels = input_ids`` (padding ignored). Rows carrying the
    teacher's own ids (``teacher_input_ids``, see :mod:`flexkd.teacher_inputs`) get them padded with
    ``teacher_pad_token_id`` (and ``teacher_labels`` the same way as ``labels``); a row whose teacher
    sequence is not as long as its student sequence is refused.
    """

    def __init__(self, task: str, pad_token_id: int, teacher_pad_token_id: int | None = None) -> None:
        self.task = task
        self.pad_token_id = int(pad_token_id)
        self.teacher_pad_token_id = None if teacher_pad_token_id is None else int(teacher_pad_token_id)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("rows: cannot collate an empty batch")
        ids = [row["input_ids"] for row in rows]
        batch = {
            "input_ids": pad_sequences(ids, self.pad_token_id),
            "attention_mask": pad_sequences(
                [
                    row.get("attention_mask") or [1] * len(i)
                    for row, i in zip(rows, ids, strict=True)
                ],
                0,
            ),
        }
        if "token_type_ids" in rows[0]:
            batch["token_type_ids"] = pad_sequences([row["token_type_ids"] for row in rows], 0)
        if "labels" in rows[0]:
            labels = [row["labels"] for row in rows]
            if isinstance(labels[0], list):
                batch["labels"] = pad_sequences(labels, IGNORE_INDEX)
            else:
                batch["labels"] = torch.tensor(labels, dtype=torch.long)
        elif self.task == "causal_lm":
            batch["labels"] = batch["input_ids"].masked_fill(
                batch["attention_mask"] == 0, IGNORE_INDEX
            )
        if "teacher_input_ids" in rows[0]:
            batch.update(self._teacher_columns(rows, batch))
        return batch

    def _teacher_columns(self, rows: Sequence[Mapping[str, Any]], batch: Mapping[str, torch.Tensor]):
        if self.teacher_pad_token_id is None:
            raise ValueError(
                "teacher_pad_token_id: the rows carry teacher_input_ids, so the collator needs the "
                "teacher's pad id (Collator(task, pad_token_id, teacher_pad_token_id=...))"
            )
        ids = [row["teacher_input_ids"] for row in rows]
        for i, (row, teacher_ids) in enumerate(zip(rows, ids, strict=True)):
            if len(teacher_ids) != len(row["input_ids"]):
                raise ValueError(
                    f"teacher_input_ids: row {i} has {len(teacher_ids)} teacher ids for "
                    f"{len(row['input_ids'])} input_ids; the sequences must be position-aligned"
                )
        columns = {"teacher_input_ids": pad_sequences(ids, self.teacher_pad_token_id)}
        if "teacher_attention_mask" in rows[0]:  # checked against attention_mask where the teacher runs
            columns["teacher_attention_mask"] = pad_sequences(
                [row["teacher_attention_mask"] for row in rows], 0
            )
        if "teacher_labels" in rows[0]:
            columns["teacher_labels"] = pad_sequences(
                [row["teacher_labels"] for row in rows], IGNORE_INDEX
            )
        elif self.task == "causal_lm" and "labels" not in rows[0]:
            columns["teacher_labels"] = columns["teacher_input_ids"].masked_fill(
                batch["attention_mask"] == 0, IGNORE_INDEX
            )
        return columns


def pad_token_id(tokenizer, model: nn.Module) -> int:
    """The id padding uses: the tokenizer's or model's pad (else eos) token, if inside the vocabulary.

    Padded positions are masked out everywhere, so any in-vocabulary id is correct; 0 is the fallback.
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    for source in (tokenizer, getattr(model, "config", None)):
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, int) and value >= 0 and (vocab is None or value < vocab):
                return value
    return 0


# --------------------------------------------------------------------------------------------------
# Data order.


LENGTH_GROUP_BATCHES = 16  # group_by_length sorts the rows of this many consecutive batches at a time


def row_lengths(rows) -> list[int]:
    """Each row's token count (its ``input_ids``): what ``data.group_by_length`` sorts by."""
    column = rows["input_ids"] if hasattr(rows, "column_names") else [row["input_ids"] for row in rows]
    return [len(ids) for ids in column]


class ShardedOrder:
    """Micro-batches of row indices for one process: epoch ``e`` shuffles with ``seed + e``.

    Each process takes every ``world_size``-th row of the permutation (the tail that does not
    fill a micro-batch on every process is dropped), so all processes run the same number of
    micro-batches per epoch. ``batches(epoch, position)`` resumes at micro-batch ``position``.

    With ``lengths`` (one per row: ``data.group_by_length``), the shuffled rows are taken
    :data:`LENGTH_GROUP_BATCHES` global batches at a time and sorted by length, longest first, so a
    batch holds rows of similar length and padding costs little compute; the global batches are then
    shuffled again, and each process takes every ``world_size``-th row of each, so the processes of
    one step see similar lengths too. Still a function of ``(seed, epoch)`` only, so resume is exact.
    """

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        lengths: Sequence[int] | None = None,
    ) -> None:
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_epoch = num_rows // (world_size * batch_size)
        if self.per_epoch == 0:
            raise ConfigError(
                f"data: {num_rows} rows cannot fill one micro-batch of {batch_size} on each of "
                f"{world_size} processes; lower train.batch_size or add data"
            )
        if lengths is not None and len(lengths) != num_rows:
            raise ValueError(f"lengths: expected one per row ({num_rows}), got {len(lengths)}")
        self.lengths = None if lengths is None else [int(n) for n in lengths]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        permutation = torch.randperm(self.num_rows, generator=generator).tolist()
        if self.lengths is not None:
            return self._length_grouped(permutation, generator)
        mine = permutation[self.rank :: self.world_size][: self.per_epoch * self.batch_size]
        return [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    def _length_grouped(self, permutation: list[int], generator: torch.Generator) -> list[list[int]]:
        step_rows = self.world_size * self.batch_size
        rows = permutation[: self.per_epoch * step_rows]
        group = LENGTH_GROUP_BATCHES * step_rows
        steps = []
        for start in range(0, len(rows), group):
            chunk = sorted(rows[start : start + group], key=lambda i: -self.lengths[i])  # stable
            steps += [chunk[i : i + step_rows] for i in range(0, len(chunk), step_rows)]
        order = torch.randperm(len(steps), generator=generator).tolist()
        return [steps[i][self.rank :: self.world_size] for i in order]

    def batches(self, epoch: int, position: int) -> Iterator[tuple[int, int, list[int]]]:
        """Yields ``(epoch, position after this batch, row indices)`` forever."""
        while True:
            for i, rows in enumerate(self.epoch_batches(epoch)[position:], start=position):
                yield epoch, i + 1, rows
            epoch, position = epoch + 1, 0
