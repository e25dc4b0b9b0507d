"""The teacher -> student pairs the study distils between, by name.

``minilm-tiny``: the severe-mismatch pair (pretrained MiniLM-L6 teacher, hidden 384, into a 4 x 128 BERT
whose only pretrained part is its embeddings, PCA-projected from the teacher's), 3:1.
``mpnet-minilm``: the pretrained pair (all-mpnet-base-v2, hidden 768, fine-tuned on the task, into the
pretrained MiniLM-L6, hidden 384), 2:1. The two tokenizers differ, so the teacher reads its own ids
(``teacher_input_ids``).
"""

from __future__ import annotations

from dataclasses import dataclass

from flexkd.errors import ConfigError

from .training import FitConfig

# The teachers' recipes: >= 128 tokens, every training row (9,990), embeddings trained; the learning rate
# is chosen on validation from the pair's ``lr_grid`` (one cached teacher per lr). Costs measured here
# (benchmarks/results/teacher_cost.md: 1 thread, thread_time, 128-token batches, load 3-6 on 2 cores):
# an optimizer step of 32 rows takes 3.0 s for the MiniLM, 16.1 s for MPNet (16 rows: 1.6 s / 8.9 s).
# MiniLM, 3 epochs: 936 steps, about 47 min per lr. MPNet, 1 epoch of 16-row steps: 624 steps, about
# 93 min: several epochs (or a second lr) do not fit the study's 3 hours, so its recipe is one epoch.
# The MiniLM grid was {1e-4, 2e-4}, each trained in full (2026-12-02, 1 thread, idle, 44 min each):
# validation 0.750 / 0.760, test 0.757 / 0.756, against the unigram LR's 0.686 / 0.688 on the same
# tokens. 2e-4 won on validation; the grid is cut to it so that the study fits 3 hours.
# With length-grouped batches (2026-12-02, Zen 5, 2 threads, pinned AVX2 kernels): 936 steps in 34 min,
# validation 0.751, test 0.756 (unigram LR 0.687 / 0.688).
# Both teachers batch rows of similar length: random 32-row batches of these descriptions (mean 75 of
# at most 128 tokens) spend 42 % of the compute on padding, length-grouped ones ~5 %.
MINILM_TEACHER_FIT = FitConfig(
    epochs=3.0, batch_size=32, lr=2e-4, warmup_ratio=0.06, group_by_length=True
)
MINILM_LR_GRID = (2e-4,)
MPNET_TEACHER_FIT = FitConfig(
    epochs=1.0, batch_size=16, lr=3e-5, warmup_ratio=0.06, group_by_length=True
)
MPNET_LR_GRID = (3e-5,)
# flexkd demo's teacher (64 tokens, 6,000 rows, 1 epoch, word embeddings frozen): minutes, not an hour
DEMO_TEACHER_FIT = FitConfig(
    epochs=1.0, batch_size=32, lr=3e-4, train_limit=6000, freeze_word_embeddings=True
)


@dataclass(frozen=True)
class Pair:
    name: str
    teacher: str  # "minilm" | "mpnet": the pretrained model the teacher is fine-tuned from
    student: str  # "tiny-bert" (embeddings from the teacher, rest random) | "minilm" (pretrained)
    teacher_hidden: int
    student_hidden: int
    description: str
    max_length: int = 128
    teacher_fit: FitConfig = MINILM_TEACHER_FIT
    lr_grid: tuple[float, ...] = MINILM_LR_GRID  # the teacher's lr is the best of these on validation
    # the tiny student's attention dropout; the study's is 0 (as in current LLMs): on the CPU, dropout on
    # the attention probabilities alone took a quarter of a student step (benchmarks/quality/README.md)
    student_attention_dropout: float = 0.1

    def teacher_fits(self) -> list[FitConfig]:
        """The recipe at each lr of the grid (the recipe's own lr when the grid is empty)."""
        from dataclasses import replace

        return [replace(self.teacher_fit, lr=lr) for lr in self.lr_grid] or [self.teacher_fit]

    def task_overrides(self) -> dict:
        """The ``debian-sections`` config fields this pair sets (``get_task(name, **overrides)``)."""
        return {
            "teacher_base": self.teacher,
            "student_base": self.student,
            "max_length": self.max_length,
            "teacher_fit": self.teacher_fit,
            **(
                {
                    "student_hidden": self.student_hidden,
                    "student_attention_dropout": self.student_attention_dropout,
                }
                if self.student == "tiny-bert"
                else {}
            ),
        }

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
        student_attention_dropout=0.0,
    ),
    "mpnet-minilm": Pair(
        name="mpnet-minilm",
        teacher="mpnet",
        student="minilm",
        teacher_hidden=768,
        student_hidden=384,
        description="all-mpnet-base-v2 (hidden 768) -> pretrained MiniLM-L6 (hidden 384), 2:1",
        teacher_fit=MPNET_TEACHER_FIT,
        lr_grid=MPNET_LR_GRID,
    ),
    "demo": Pair(
        name="demo",
        teacher="minilm",
        student="tiny-bert",
        teacher_hidden=384,
        student_hidden=128,
        description="flexkd demo's minilm-tiny: a teacher fine-tuned in minutes (64 tokens, 6,000 rows)",
        max_length=64,
        teacher_fit=DEMO_TEACHER_FIT,
        lr_grid=(),
    ),
}


def get_pair(name: str) -> Pair:
    if name not in PAIRS:
        raise ConfigError(f"pair: expected one of {sorted(PAIRS)}, got {name!r}")
    return PAIRS[name]
