"""The training core: from a :class:`~flexkd.config.Config` to a distilled student.

One job per module, in the order a run uses them:

- ``factories``: the ``"task:NAME"`` registries for models and data;
- ``models``: the teacher, student and tokenizer a config names;
- ``data``: splits and tokenisation, the collator, the sharded resumable data order;
- ``teacher_prep``: the dimension selection (loaded or scored) and the stored teacher outputs;
- ``optim``: AdamW with weight-decay groups, the learning-rate schedule;
- ``run_dir``: the run folder's lock, metrics log and final student;
- ``loop``: :func:`train`, the loop :func:`run_steps` and its :func:`train_step`;
- ``finetune``: :func:`fit`, one model on its own task loss through the same loop (the lab's teachers).
"""

from flexkd.training.data import (
    IGNORE_INDEX,
    Collator,
    ShardedOrder,
    Splits,
    build_splits,
    move_to_device,
    pad_sequences,
    pad_token_id,
)
from flexkd.training.factories import (
    DATA_FACTORIES,
    MODEL_FACTORIES,
    register_data_factory,
    register_model_factory,
)
from flexkd.training.finetune import TaskObjective, fit
from flexkd.training.loop import (
    StepResult,
    TrainResult,
    make_accelerator,
    run_steps,
    train,
    train_step,
)
from flexkd.training.models import auto_class, build_model, build_tokenizer
from flexkd.training.teacher_prep import score_selection, selection_k

__all__ = [
    "DATA_FACTORIES",
    "IGNORE_INDEX",
    "MODEL_FACTORIES",
    "Collator",
    "ShardedOrder",
    "Splits",
    "StepResult",
    "TaskObjective",
    "TrainResult",
    "auto_class",
    "build_model",
    "build_splits",
    "build_tokenizer",
    "fit",
    "make_accelerator",
    "move_to_device",
    "pad_sequences",
    "pad_token_id",
    "register_data_factory",
    "register_model_factory",
    "run_steps",
    "score_selection",
    "selection_k",
    "train",
    "train_step",
]
