"""``debian-sections``: long description -> Debian section.

Teacher (``teacher_base``): a pretrained model with a fresh classification head, fine-tuned here: the
MiniLM (BERT, 6 layers, hidden 384; the default) or all-mpnet-base-v2 (MPNet, 12 layers, hidden 768).
Student (``student_base``): ``"tiny-bert"``, a BERT with the MiniLM's tokenizer, hidden 96-128, 2-4
layers, embeddings initialised from the teacher's (``student_init``) and the rest random; or
``"minilm"``, the pretrained MiniLM with a fresh head.

The task's ``tokenizer`` is the teacher's: ``encode``/``dataloader`` give the teacher's ids. The student
reads the MiniLM's (``student_tokenizer``, ``encode_student``); with the MPNet teacher the two differ, and
:meth:`SectionsTask.distillation_rows` pairs them (``input_ids`` for the student, ``teacher_input_ids``
for the teacher)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from flexkd.training.data import move_to_device, pad_sequences
from flexkd_lab.data import SNAPSHOT_DIR, label_names

from .base import DebianTask
from .metrics import accuracy, macro_f1
from .minilm import minilm_identity, minilm_path
from .mpnet import mpnet_identity, mpnet_path
from .student_init import EMBEDDING_INITS, init_embeddings_from_teacher
from .training import FitConfig

# base model name -> (its folder, what identifies its weights); tests point these at tiny models
BASE_MODELS = {
    "minilm": (minilm_path, minilm_identity),
    "mpnet": (mpnet_path, mpnet_identity),
}
STUDENT_BASES = ("tiny-bert", "minilm")


@dataclass(frozen=True)
class SectionsConfig:
    max_length: int = 64
    teacher_base: str = "minilm"
    student_base: str = "tiny-bert"
    student_hidden: int = 128
    student_layers: int = 4
    student_init: str = "teacher_pca"
    student_attention_dropout: float = 0.1  # the tiny student's attention-probability dropout
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
        if self.teacher_base not in BASE_MODELS:
            raise ValueError(
                f"teacher_base: expected one of {sorted(BASE_MODELS)}, got {self.teacher_base!r}"
            )
        if self.student_base not in STUDENT_BASES:
            raise ValueError(
                f"student_base: expected one of {STUDENT_BASES}, got {self.student_base!r}"
            )
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
        self._tokenizers: dict[str, object] = {}
        self._student_encoded: dict[tuple[str, int | None], list[dict]] = {}

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def teacher_fit(self) -> FitConfig:
        return self.config.teacher_fit

    def _base_tokenizer(self, base: str):
        if base not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[base] = AutoTokenizer.from_pretrained(base_path(base))
        return self._tokenizers[base]

    @property
    def tokenizer(self):
        """The teacher's tokenizer."""
        return self._base_tokenizer(self.config.teacher_base)

    @property
    def student_tokenizer(self):
        """The student's tokenizer: the MiniLM's, for either student."""
        return self._base_tokenizer("minilm")

    @property
    def own_teacher_ids(self) -> bool:
        """True when teacher and student number their tokens differently."""
        return self.config.teacher_base != "minilm"

    def _encode_with(self, tokenizer, row: dict) -> dict:
        ids = tokenizer(row["text"], truncation=True, max_length=self.config.max_length)["input_ids"]
        return {"input_ids": ids, "label": row["label"]}

    def encode_row(self, row: dict) -> dict:
        return self._encode_with(self.tokenizer, row)

    def encode_student(self, split: str, limit: int | None = None) -> list[dict]:
        """Rows of a split in the student's ids (the teacher's rows when both tokenize alike)."""
        if not self.own_teacher_ids:
            return self.encode(split, limit)
        key = (split, limit)
        if key not in self._student_encoded:
            self._student_encoded[key] = [
                self._encode_with(self.student_tokenizer, row) for row in self.dataset(split, limit)
            ]
        return self._student_encoded[key]

    def distillation_rows(self, split: str, limit: int | None = None) -> tuple[list[dict], int]:
        """``(rows, dropped)``: the student's rows, each with ``teacher_input_ids`` when the teacher
        tokenizes differently, and how many rows were dropped because the two token sequences are not
        position-aligned (see :func:`flexkd_lab.tasks.alignment.aligned`)."""
        from .alignment import aligned

        student = self.encode_student(split, limit)
        if not self.own_teacher_ids:
            return [dict(row) for row in student], 0
        rows, dropped = [], 0
        for student_row, teacher_row in zip(student, self.encode(split, limit), strict=True):
            if not aligned(
                student_row["input_ids"], teacher_row["input_ids"], self.student_tokenizer, self.tokenizer
            ):
                dropped += 1
                continue
            rows.append({**student_row, "teacher_input_ids": teacher_row["input_ids"]})
        return rows, dropped

    def _collate_with(self, tokenizer, features: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = pad_sequences([f["input_ids"] for f in features], tokenizer.pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": (input_ids != tokenizer.pad_token_id).long(),
            "labels": torch.tensor([f["label"] for f in features], dtype=torch.long),
        }

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return self._collate_with(self.tokenizer, features)

    def _label_maps(self) -> dict:
        return {
            "num_labels": self.num_labels,
            "id2label": dict(enumerate(self.labels)),
            "label2id": {n: i for i, n in enumerate(self.labels)},
        }

    def build_teacher(self, seed: int = 0):
        """The pretrained ``teacher_base`` with a new, randomly initialised head (before fine-tuning)."""
        return self._pretrained_with_head(self.config.teacher_base, seed)

    def _pretrained_with_head(self, base: str, seed: int):
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(seed)
        with _quiet_transformers():
            return AutoModelForSequenceClassification.from_pretrained(
                base_path(base), **self._label_maps()
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
        """The student: with ``student_base="minilm"`` the pretrained MiniLM with a new head (seeded by
        ``seed``; the other arguments do not apply); else a BERT with the MiniLM's tokenizer, whose
        ``init="teacher_pca"`` (default) needs ``teacher`` for its embeddings."""
        from transformers import BertConfig, BertForSequenceClassification

        if self.config.student_base == "minilm":
            if init == "random":  # the untrained architecture (for its config)
                from transformers import AutoConfig

                torch.manual_seed(seed)
                config = AutoConfig.from_pretrained(base_path("minilm"), **self._label_maps())
                return BertForSequenceClassification(config)
            return self._pretrained_with_head("minilm", seed)
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
            vocab_size=self.student_tokenizer.vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 32,
            intermediate_size=4 * hidden,
            max_position_embeddings=512,
            attention_probs_dropout_prob=self.config.student_attention_dropout,
            pad_token_id=self.student_tokenizer.pad_token_id,
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
        reader: str = "teacher",
        return_predictions: bool = False,
        return_logits: bool = False,
    ) -> dict:
        """``{"accuracy", "macro_f1", "n"}`` of ``model`` on a split, fed the ids of ``reader``
        (``"teacher"`` or ``"student"``); plus the per-row ``"predictions"`` and ``"references"`` labels, and
        the fp32 ``"logits"`` ``[rows, classes]``, on request (all in the split's order)."""
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        if reader not in ("teacher", "student"):
            raise ValueError(f"reader: expected 'teacher' or 'student', got {reader!r}")
        if reader == "student":
            rows = self.encode_student(split, limit)
            tokenizer = self.student_tokenizer
        else:
            rows, tokenizer = self.encode(split, limit), self.tokenizer
        # longest rows first, so each batch pads little; the predictions go back to the split's order
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
        batches = DataLoader(
            [rows[i] for i in order],
            batch_size=batch_size,
            collate_fn=lambda chunk: self._collate_with(tokenizer, chunk),
        )
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        sorted_predictions, sorted_logits = [], []
        for batch in tqdm(
            batches,
            desc=f"eval {split}",
            disable=not progress,
            leave=False,
        ):
            logits = model(
                **move_to_device({k: v for k, v in batch.items() if k != "labels"}, device)
            ).logits
            sorted_predictions += logits.argmax(-1).tolist()
            if return_logits:
                sorted_logits.append(logits.float().cpu())
        model.train(was_training)
        predictions = [0] * len(rows)
        for position, prediction in zip(order, sorted_predictions, strict=True):
            predictions[position] = prediction
        references = [int(row["label"]) for row in rows]
        result = {
            "accuracy": accuracy(predictions, references),
            "macro_f1": macro_f1(predictions, references),
            "n": len(references),
        }
        if return_predictions:
            result.update(predictions=predictions, references=references)
        if return_logits:
            result["logits"] = torch.cat(sorted_logits)[torch.tensor(order).argsort()]
        return result

    teacher_eval_limit = None  # the whole validation split

    def teacher_baseline(self) -> dict:
        """The unigram logistic regression on the teacher's tokens (:mod:`.baselines`)."""
        from .baselines import unigram_lr_baseline

        splits = {split: self.encode(split) for split in ("train", "validation", "test")}
        return unigram_lr_baseline(splits, len(self.tokenizer))

    def load_teacher(self, path: str):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(path)

    def teacher_settings(self) -> dict:
        settings = {"max_length": self.config.max_length, "base_model": base_identity(self.config.teacher_base)}
        if self.config.teacher_base != "minilm":  # keeps the MiniLM teacher's existing cache key
            settings["teacher_base"] = self.config.teacher_base
        return settings


def base_path(base: str) -> str:
    return BASE_MODELS[base][0]()


def base_identity(base: str) -> dict:
    return BASE_MODELS[base][1]()
