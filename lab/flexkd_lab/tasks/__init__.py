"""The demo/study tasks on the Debian snapshot: batching, metrics, model factories, teachers.

task = get_task("debian-sections")            # or "debian-synopsis"
teacher = get_teacher(task).model             # trained once, then cached
student = task.build_student(teacher)         # hidden 128, embeddings from the teacher
batches = task.dataloader("train", 32, shuffle=True)
task.evaluate(student, "test")                # {"accuracy", "macro_f1", "n"} / {"rouge_l", "n"}
"""

from __future__ import annotations

from .classification import SectionsConfig, SectionsTask
from .metrics import accuracy, macro_f1, rouge_l
from .summarization import SynopsisConfig, SynopsisTask, greedy_generate
from .teacher_cache import CachedTeacher, default_cache_dir, get_teacher
from .training import FitConfig, fit

TASK_CLASSES = {SectionsTask.name: SectionsTask, SynopsisTask.name: SynopsisTask}


def get_task(name: str, config=None, **overrides):
    """A task object by name. ``config`` is a ``SectionsConfig``/``SynopsisConfig``;
    keyword ``overrides`` replace fields of the default config (``max_length=96``)."""
    import dataclasses

    if name not in TASK_CLASSES:
        raise ValueError(f"name: expected one of {sorted(TASK_CLASSES)}, got {name!r}")
    cls = TASK_CLASSES[name]
    config_cls = SectionsConfig if cls is SectionsTask else SynopsisConfig
    if config is not None and not isinstance(config, config_cls):
        raise TypeError(f"config: expected a {config_cls.__name__}, got {type(config).__name__}")
    config = config or config_cls()
    if overrides:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(config_cls)}
        if unknown:
            raise ValueError(
                f"overrides: {sorted(unknown)} are not fields of {config_cls.__name__}"
            )
        config = dataclasses.replace(config, **overrides)
    return cls(config)


__all__ = [
    "TASK_CLASSES",
    "CachedTeacher",
    "FitConfig",
    "SectionsConfig",
    "SectionsTask",
    "SynopsisConfig",
    "SynopsisTask",
    "accuracy",
    "default_cache_dir",
    "fit",
    "get_task",
    "get_teacher",
    "greedy_generate",
    "macro_f1",
    "rouge_l",
]
