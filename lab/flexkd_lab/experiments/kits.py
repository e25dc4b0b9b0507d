"""Task kits for the demo and the study, built on :mod:`flexkd_lab.tasks`.

``flexkd_lab.tasks`` owns the tasks (tokenisation, teachers trained once and cached, students whose
embeddings start from the teacher's, metrics); this module turns one into a
:class:`~flexkd_lab.experiments.pipeline.TaskKit`: the cached teacher's folder, the tokenized rows in the
form :func:`flexkd.train` reads, a named student factory for the training loop, and the evaluation.
A file lock around the teacher fine-tune lets a demo and a study started together share one teacher.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flexkd_lab.experiments.budget import RunBudget
from flexkd_lab.experiments.pipeline import TaskKit

TASK_METRICS: dict[str, tuple[str, ...]] = {
    "debian-sections": ("accuracy", "macro_f1"),
    "debian-synopsis": ("rouge_l",),
}
HF_TASKS = {"debian-sections": "sequence", "debian-synopsis": "causal_lm"}
# --quick: a tiny slice, a 2-step teacher fine-tune and a tiny student
QUICK_TASK_CONFIG = {
    "debian-sections": {"max_length": 32, "student_hidden": 32, "student_layers": 1},
    "debian-synopsis": {
        "max_source_length": 24,
        "max_target_length": 8,
        "teacher_hidden": 64,
        "teacher_layers": 1,
        "student_hidden": 32,
        "student_layers": 1,
    },
}
QUICK_TEACHER_ROWS = 16


def quiet_transformers() -> None:
    """Silence transformers' per-load reports and the weight-loading and dataset bars (the pipeline shows
    its own progress)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def training_rows(task, split: str, limit: int | None):
    """``split``'s encoded rows as a ``datasets.Dataset`` of ``input_ids``/``attention_mask``/``labels``,
    exactly what ``task.collate`` would batch (labels only on the synopsis for the causal LM)."""
    import datasets

    rows = []
    for row in task.encode(split, limit):
        if "prompt" in row:
            ids = row["prompt"] + row["target"]
            labels: Any = [-100] * len(row["prompt"]) + row["target"]
        else:
            ids, labels = row["input_ids"], row["label"]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return datasets.Dataset.from_list(rows)


def _register_student_factory(task, *, pair: str = "minilm-tiny", quick: bool) -> str:
    """Register (once) the named factory ``flexkd.training`` builds this task's student with: the task's
    student (for the tiny student, embeddings from the teacher of the run's config), seeded by the run's
    seed."""
    from flexkd.training import MODEL_FACTORIES, register_model_factory

    pair_part = "" if pair == "minilm-tiny" else f":{pair}"
    name = f"flexkd-experiments:{task.name}{pair_part}{':quick' if quick else ''}"
    if name not in MODEL_FACTORIES:

        @register_model_factory(name)
        def build_student(role: str, cfg) -> Any:
            if role != "student":
                raise ValueError(f"model.{role}: {name} only builds students")
            if getattr(task.config, "student_base", None) == "minilm":  # pretrained: needs no teacher
                return task.build_student(seed=cfg.train.seed)
            teacher = task.load_teacher(str(cfg.path(cfg.model.teacher)))
            return task.build_student(teacher, seed=cfg.train.seed)

    return f"task:{name}"


def pair_task(task_name: str, pair: str = "minilm-tiny", *, quick: bool = False):
    """The task object of ``task_name`` for ``pair`` (a name in :data:`flexkd_lab.tasks.pairs.PAIRS`):
    ``debian-sections`` takes the pair's teacher, student, input length and teacher recipe; the synopsis
    task has its own GPT-2 pair and accepts only the default. ``quick`` shrinks it (see
    :data:`QUICK_TASK_CONFIG`)."""
    from flexkd_lab.tasks import get_task
    from flexkd_lab.tasks.pairs import get_pair

    if task_name not in TASK_METRICS:
        raise ValueError(f"task: expected one of {sorted(TASK_METRICS)}, got {task_name!r}")
    chosen = get_pair(pair)
    overrides: dict[str, Any] = {}
    if task_name == "debian-sections":
        overrides = chosen.task_overrides()
    elif chosen.name not in ("minilm-tiny", "demo"):
        raise ValueError(f"pair: {task_name} has its own teacher and student; {pair!r} is a debian-sections pair")
    if quick:
        overrides.update(QUICK_TASK_CONFIG[task_name])
        if overrides.get("student_base") == "minilm":
            overrides.pop("student_hidden", None)
    return get_task(task_name, **overrides)


def cached_teacher(
    task_name: str,
    *,
    cache_dir: Path,
    pair: str = "minilm-tiny",
    quick: bool = False,
    eval_limit: int | None = None,
    progress: bool = True,
):
    """``(task, CachedTeacher)`` of ``task_name``: its fine-tuned teacher from ``cache_dir/teachers``,
    trained there first when missing (``quick``: a 2-step fine-tune on a tiny slice, evaluated on
    ``eval_limit`` rows). A debian-sections pair with an lr grid trains (or reuses) one teacher per lr
    and keeps the best on validation accuracy; the report's ``lr_grid`` holds every lr's accuracy. A
    file lock makes processes started together share one fine-tune."""
    from flexkd_lab.tasks import FitConfig, get_teacher
    from flexkd_lab.tasks.pairs import get_pair

    task = pair_task(task_name, pair, quick=quick)
    if quick:
        fits = [FitConfig(batch_size=8, lr=1e-3, train_limit=QUICK_TEACHER_ROWS, max_steps=2)]
    elif task_name == "debian-sections":
        fits = get_pair(pair).teacher_fits()
    else:
        fits = [task.teacher_fit]
    teachers = Path(cache_dir) / "teachers"
    candidates = []
    for fit_config in fits:
        with _exclusive(teachers / f".{task_name}.lock"):
            candidates.append(
                get_teacher(
                    task,
                    teachers,
                    fit_config=fit_config,
                    eval_limit=eval_limit if quick else None,
                    progress=progress,
                )
            )
    best = max(candidates, key=lambda c: c.report.get("validation", {}).get("accuracy", 0.0))
    if len(candidates) > 1:
        best.report["lr_grid"] = {
            str(c.report["fit"]["lr"]): c.report.get("validation", {}).get("accuracy") for c in candidates
        }
    return task, best


def _distillation_rows(task, limit: int | None):
    """``(rows as a datasets.Dataset, rows dropped as not position-aligned)``."""
    import datasets

    if not hasattr(task, "distillation_rows"):
        return training_rows(task, "train", limit), 0
    rows, dropped = task.distillation_rows("train", limit)
    encoded = [
        {
            "input_ids": row["input_ids"],
            "attention_mask": [1] * len(row["input_ids"]),
            "labels": row["label"],
            **({"teacher_input_ids": row["teacher_input_ids"]} if "teacher_input_ids" in row else {}),
        }
        for row in rows
    ]
    return datasets.Dataset.from_list(encoded), dropped


def _reader_of(task, model, default: str) -> str:
    """Whose ids ``model`` reads: the teacher's when its embedding table has the teacher's vocabulary
    size and not the student's (so ``kit.evaluate(teacher)`` never feeds the teacher the student's ids),
    else ``default``."""
    rows = model.get_input_embeddings().num_embeddings
    teacher_vocab, student_vocab = len(task.tokenizer), len(task.student_tokenizer)
    if rows == teacher_vocab != student_vocab:
        return "teacher"
    if rows == student_vocab != teacher_vocab:
        return "student"
    return default


def _student_description(task, student_cfg) -> str:
    shape = f"{student_cfg.model_type} hidden {student_cfg.hidden_size}, {student_cfg.num_hidden_layers} layers"
    if getattr(task.config, "student_base", None) == "minilm":
        return f"{shape}, the pretrained MiniLM-L6 with a new head"
    return f"{shape}, embeddings from the teacher's (PCA), the rest random"


def build_kit(
    task_name: str,
    budget: RunBudget,
    *,
    cache_dir: Path,
    pair: str = "minilm-tiny",
    quick: bool = False,
    progress: bool = True,
) -> TaskKit:
    """The :class:`TaskKit` of ``task_name`` for the teacher -> student ``pair`` (a name in
    :data:`flexkd_lab.tasks.pairs.PAIRS`); trains and caches its teacher under ``cache_dir/teachers`` when
    the cache lacks it. When the pair's tokenizers differ, ``train_rows``/``score_rows`` carry the teacher's
    own ids (``teacher_input_ids``), and ``evaluate`` / ``evaluate_teacher`` feed a model the ids of the
    vocabulary its embedding table has (the student's / the teacher's when the sizes do not tell)."""
    task, cached = cached_teacher(
        task_name,
        cache_dir=cache_dir,
        pair=pair,
        quick=quick,
        eval_limit=budget.eval_examples,
        progress=progress,
    )
    report = cached.report
    validation = {k: v for k, v in report.get("validation", {}).items() if k != "predictions"}

    train_rows, dropped = _distillation_rows(task, budget.train_examples)
    score_rows = train_rows.select(range(min(budget.score_examples, len(train_rows))))
    own_ids = bool(getattr(task, "own_teacher_ids", False))

    def evaluate_as(reader: str):
        def evaluate(model) -> dict[str, float]:
            options = {"reader": _reader_of(task, model, reader)} if own_ids else {}
            metrics = task.evaluate(
                model, budget.eval_split, limit=budget.eval_examples, progress=progress, **options
            )
            return {name: metrics[name] for name in TASK_METRICS[task_name]}

        return evaluate

    def predict(model, split: str) -> tuple[list[int], list[int]]:
        options = {"reader": "student"} if own_ids else {}
        out = task.evaluate(
            model, split, limit=budget.eval_examples, progress=progress, return_predictions=True, **options
        )
        return out["predictions"], out["references"]

    teacher_dir, teacher_cfg = str(cached.path), cached.model.config
    del cached  # the pipeline loads the teacher from its folder when it needs it
    student_cfg = task.build_student(init="random").config
    fit = report.get("fit", {})
    train_stats = report.get("train", {})
    baseline = report.get("baseline", {})
    tokens = task.student_tokenizer if own_ids else task.tokenizer
    aligned_note = (
        f"; teacher reads its own ids (teacher_input_ids), {len(train_rows)} rows aligned, {dropped} dropped"
        if own_ids
        else ""
    )
    return TaskKit(
        name=task_name,
        hf_task=HF_TASKS[task_name],
        tokenizer_dir=_tokenizer_dir(task) if own_ids else teacher_dir,
        teacher_dir=teacher_dir,
        student_factory=_register_student_factory(task, pair=pair, quick=quick),
        student_hidden_size=int(student_cfg.hidden_size),
        train_rows=train_rows,
        score_rows=score_rows,
        evaluate=evaluate_as("student"),
        evaluate_teacher=evaluate_as("teacher"),
        metrics=TASK_METRICS[task_name],
        pad_token_id=int(tokens.pad_token_id),
        teacher_pad_token_id=int(task.tokenizer.pad_token_id) if own_ids else None,
        teacher_description=(
            f"{teacher_cfg.model_type} hidden {teacher_cfg.hidden_size}, {teacher_cfg.num_hidden_layers} layers, "
            f"trained {train_stats.get('steps', '?')} steps x {fit.get('batch_size', '?')} rows "
            f"({train_stats.get('seconds', 0):.0f} s when made); validation "
            + ", ".join(f"{k} {v:.3f}" for k, v in validation.items() if k != "n")
            + f" on {validation.get('n', '?')} rows"
            + (
                f" (unigram LR on the same tokens: {baseline['validation']['accuracy']:.3f})"
                if "validation" in baseline
                else ""
            )
        ),
        teacher_metrics=validation,
        predict=predict if HF_TASKS[task_name] == "sequence" else None,
        teacher_baseline=baseline,
        pair=pair,
        input_description=", ".join(
            f"{k} {v}"
            for k, v in vars(task.config).items()
            if k.startswith("max_") and isinstance(v, int)
        )
        + aligned_note,
        student_description=_student_description(task, student_cfg),
    )


def _tokenizer_dir(task) -> str:
    from flexkd_lab.tasks.classification import base_path

    return base_path("minilm")
