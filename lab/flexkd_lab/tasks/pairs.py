"""The teacher -> student pairs the study distils between, by name.

``minilm-tiny``: the severe-mismatch pair (pretrained MiniLM-L6 teacher, hidden 384, into a 4 x 128 BERT
whose only pretrained part is its embeddings, PCA-projected from the teacher's), 3:1.
``mpnet-minilm``: the pretrained pair (all-mpnet-base-v2, hidden 768, fine-tuned on the task, into the
pretrained MiniLM-L6, hidden 384), 2:1. The two tokenizers differ, so the teacher reads its own ids
(``teacher_input_ids``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pair:
    name: str
    teacher: str  # "minilm" | "mpnet": the pretrained model the teacher is fine-tuned from
    student: str  # "tiny-bert" (embeddings from the teacher, rest random) | "minilm" (pretrained)
    teacher_hidden: int
    student_hidden: int
    description: str

    @property
    def own_teacher_ids(self) -> bool:
        """True when the teacher's vocabulary is not the student's, so batches carry ``teacher_input_ids``."""
        return self.teacher != "minilm"

    @property
    def ratio(self) -> str:
        return f"{self.teacher_hidden // self.student_hidden}:1"


PAIRS: dict[str, Pair] = {
    "minilm-tiny": Pair(
        name="minilm-tiny",
        teacher="minilm",
        student="tiny-bert",
        teacher_hidden=384,
        student_hidden=128,
        description="MiniLM-L6 (hidden 384) -> 4 x 128 BERT, embeddings from the teacher's (PCA), 3:1",
    ),
    "mpnet-minilm": Pair(
        name="mpnet-minilm",
        teacher="mpnet",
        student="minilm",
        teacher_hidden=768,
        student_hidden=384,
        description="all-mpnet-base-v2 (hidden 768) -> pretrained MiniLM-L6 (hidden 384), 2:1",
    ),
}


def get_pair(name: str) -> Pair:
    if name not in PAIRS:
        raise ValueError(f"pair: expected one of {sorted(PAIRS)}, got {name!r}")
    return PAIRS[name]
