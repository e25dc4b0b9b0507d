"""``debian-sections``: long description -> Debian section.

Teacher: the pretrained MiniLM (BERT, 6 layers, hidden 384) with a fresh classification
head, fine-tuned here. Student: a BERT with the same tokenizer, hidden 96-128, 2-4 layers,
embeddings initialised from the teacher's (``student_init``) and the rest random."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from flexkd.training.data import move_to_device, pad_sequences
from flexkd_lab.data import SNAPSHOT_DIR, label_names

from .base import DebianTask
from .metrics import accuracy, macro_f1
from .minilm import minilm_identity, minilm_path
from .student_init import EMBEDDING_INITS, init_embeddings_from_teacher
from .training import FitConfig


@dataclass(frozen=True)
class SectionsConfig:
    max_length: int = 64
    student_hidden: int = 128
    student_layers: int = 4
    student_init: str = "teacher_pca"
    # 188 steps x 32 rows. Measured here (shared 2-core machine, 1 thread): about 1.5 CPU-s per
    # step, validation accuracy 0.603 / macro-F1 0.580 (lr 1e-4 gave 0.566 / 0.522).
    teacher_fit: FitConfig = field(
        default_factory=lambda: FitConfig(
            epochs=1.0, batch_size=32, lr=3e-4, train_limit=6000, freeze_word_embeddings=True
        )
    )

    def __post_init__(self):
        if not 8 <= self.max_length <= 512:
            raise ValueError(f"max_length: expected 8..512, got {self.max_length}")
        if self.student_hidden <= 0 or self.student_hidden % 32:
            raise ValueError(
                f"student_hidden: expected a positive multiple of 32, got {self.student_hidden}"
            )
        if self.student_layers <= 0:
            raise ValueError(f"student_layers: expected > 0, got {self.student_layers}")
        if self.student_init not in EMBEDDING_INITS:
            raise ValueError(
                f"student_init: expected one of {EMBEDDING_INITS}, got {self.student_init!r}"
            )


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the load report about the new classification head (expected, not news)."""
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(previous)


class SectionsTask(DebianTask):
    name = "debian-sections"
    kind = "classification"

    def __init__(self, config: SectionsConfig | None = None, data_dir: str = SNAPSHOT_DIR):
        super().__init__(config or SectionsConfig(), data_dir)
        self.labels = label_names(self.name, data_dir)
        self._tokenizer = None

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def teacher_fit(self) -> FitConfig:
        return self.config.teacher_fit

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        return self._tokenizer

    def encode_row(self, row: dict) -> dict:
        ids = self.tokenizer(row["text"], truncation=True, max_length=self.config.max_length)[
            "input_ids"
        ]
        return {"input_ids": ids, "label": row["label"]}

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = pad_sequences([f["input_ids"] for f in features], self.tokenizer.pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": (input_ids != self.tokenizer.pad_token_id).long(),
            "labels": torch.tensor([f["label"] for f in features], dtype=torch.long),
        }

    def _label_maps(self) -> dict:
        return {
            "num_labels": self.num_labels,
            "id2label": dict(enumerate(self.labels)),
            "label2id": {n: i for i, n in enumerate(self.labels)},
        }

    def build_teacher(self, seed: int = 0):
        """The pretrained MiniLM with a new, randomly initialised head (before fine-tuning)."""
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(seed)
        with _quiet_transformers():
            return AutoModelForSequenceClassification.from_pretrained(
                minilm_path(), **self._label_maps()
            )

    def build_student(
        self,
        teacher=None,
        *,
        hidden_size: int | None = None,
        num_layers: int | None = None,
        init: str | None = None,
        seed: int = 0,
    ):
        """A BERT student sharing the teacher's tokenizer; ``init="teacher_pca"`` (default)
        needs ``teacher`` for its embeddings."""
        from transformers import BertConfig, BertForSequenceClassification

        hidden = hidden_size or self.config.student_hidden
        layers = num_layers or self.config.student_layers
        init = init or self.config.student_init
        if init not in EMBEDDING_INITS:
            raise ValueError(f"init: expected one of {EMBEDDING_INITS}, got {init!r}")
        if hidden <= 0 or hidden % 32:
            raise ValueError(f"hidden_size: expected a positive multiple of 32, got {hidden}")
        if init == "teacher_pca" and teacher is None:
            raise ValueError(
                "teacher: init='teacher_pca' projects the teacher's embeddings; pass the teacher"
            )
        torch.manual_seed(seed)
        config = BertConfig(
            vocab_size=self.tokenizer.vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 32,
            intermediate_size=4 * hidden,
            max_position_embeddings=512,
            pad_token_id=self.tokenizer.pad_token_id,
            **self._label_maps(),
        )
        student = BertForSequenceClassification(config)
        if init == "teacher_pca":
            init_embeddings_from_teacher(student, teacher)
        return student

    @torch.no_grad()
    def evaluate(
        self,
        model,
        split: str = "validation",
        *,
        limit: int | None = None,
        batch_size: int = 64,
        progress: bool = False,
        return_predictions: bool = False,
    ) -> dict:
        """``{"accuracy", "macro_f1", "n"}`` of ``model`` on a split (plus the per-row ``"predictions"`` and
        ``"references"`` labels on request)."""
        from tqdm.auto import tqdm

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        predictions, references = [], []
        for batch in tqdm(
            self.dataloader(split, batch_size, limit=limit),
            desc=f"eval {split}",
            disable=not progress,
            leave=False,
        ):
            logits = model(
                **move_to_device({k: v for k, v in batch.items() if k != "labels"}, device)
            ).logits
            predictions += logits.argmax(-1).tolist()
            references += batch["labels"].tolist()
        model.train(was_training)
        result = {
            "accuracy": accuracy(predictions, references),
            "macro_f1": macro_f1(predictions, references),
            "n": len(references),
        }
        if return_predictions:
            result.update(predictions=predictions, references=references)
        return result

    teacher_eval_limit = None  # the whole validation split

    def load_teacher(self, path: str):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(path)

    def teacher_settings(self) -> dict:
        return {"max_length": self.config.max_length, "base_model": minilm_identity()}
