"""What the two Debian tasks share: data access, encoding cache, batching, fingerprints."""

from __future__ import annotations

import abc
import hashlib
import os

import torch
from torch.utils.data import DataLoader

from flexkd_lab.data import SNAPSHOT_DIR, SPLITS, load_task, task_spec

from .training import FitConfig


class DebianTask(abc.ABC):
    """Base class: subclasses set ``name``/``kind`` and implement the model-specific parts
    (``tokenizer``, ``encode_row``, ``collate``, ``build_teacher``, ``build_student``,
    ``evaluate``, ``teacher_fit``)."""

    name: str
    kind: str
    teacher_fit: FitConfig

    def __init__(self, config, data_dir: str = SNAPSHOT_DIR):
        self.config = config
        self.data_dir = data_dir
        self._encoded: dict[tuple[str, int | None], list[dict]] = {}

    # data -----------------------------------------------------------------------------
    def dataset(self, split: str, limit: int | None = None):
        """The raw split as a ``datasets.Dataset`` (see ``flexkd_lab.data.load_task``)."""
        return load_task(self.name, split, limit, self.data_dir)

    @abc.abstractmethod
    def encode_row(self, row: dict) -> dict:
        ...

    def encode(self, split: str, limit: int | None = None) -> list[dict]:
        """Tokenised rows of a split (kept in memory after the first call)."""
        key = (split, limit)
        if key not in self._encoded:
            self._encoded[key] = [self.encode_row(row) for row in self.dataset(split, limit)]
        return self._encoded[key]

    @abc.abstractmethod
    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ...

    def dataloader(
        self,
        split: str,
        batch_size: int = 32,
        *,
        shuffle: bool = False,
        limit: int | None = None,
        seed: int = 0,
        drop_last: bool = False,
    ) -> DataLoader:
        """Model-ready batches: dicts of tensors that ``model(**batch)`` accepts, labels included."""
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(
            self.encode(split, limit),
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=self.collate,
            generator=generator,
            drop_last=drop_last,
        )

    # identity -------------------------------------------------------------------------
    def data_fingerprint(self) -> str:
        """sha256 over the task's snapshot files and ``meta.json``."""
        digest = hashlib.sha256()
        prefix = task_spec(self.name).file_prefix
        names = ["meta.json"] + [f"{prefix}-{split}.jsonl.gz" for split in SPLITS]
        for name in names + self.extra_data_files():
            digest.update(name.encode())
            with open(os.path.join(self.data_dir, name), "rb") as f:
                digest.update(f.read())
        return digest.hexdigest()

    def extra_data_files(self) -> list[str]:
        return []

    @abc.abstractmethod
    def teacher_settings(self) -> dict:
        """The config fields the teacher depends on (student-only fields stay out of the
        teacher's cache key, so changing the student never retrains the teacher)."""
        ...

    def identity(self) -> dict:
        """Everything a trained teacher depends on, besides its fit settings and seed."""
        return {
            "task": self.name,
            "data": self.data_fingerprint(),
            "teacher": self.teacher_settings(),
        }
