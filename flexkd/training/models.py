"""The teacher, the student and the tokenizer a config names: an HF path or id, a config dict (random
init seeded by ``train.seed``) or a registered factory."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from flexkd.config import Config, ModelFromConfig, ModelFromPretrained
from flexkd.errors import ConfigError
from flexkd.training.factories import MODEL_FACTORIES, resolve_factory

_AUTO_CLASS_NAMES = {
    "causal_lm": "AutoModelForCausalLM",
    "sequence": "AutoModelForSequenceClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "token": "AutoModelForTokenClassification",
}


def auto_class(task: str):
    """The ``transformers`` auto class of ``data.task``."""
    import transformers

    return getattr(transformers, _AUTO_CLASS_NAMES[task])


def build_model(cfg: Config, role: str, *, num_labels: int | None = None) -> nn.Module:
    """The ``role`` ("teacher" or "student") model of ``cfg``; random inits are seeded by ``train.seed``.

    A student with a ``lora`` section comes back as a ``peft.PeftModel`` (only the adapter trains), and
    so does a teacher with an ``adapter`` folder (loaded on top of it, frozen).

    ``num_labels`` (counted from the data) sizes the head of classification models that do not
    fix it themselves. The teacher is cast to ``model.teacher_dtype`` when that is set.
    """
    model = _build_model(cfg, role, num_labels)
    if role == "teacher" and cfg.model.teacher_adapter is not None:
        from flexkd.training.lora import load_adapter

        model = load_adapter(model, cfg.path(cfg.model.teacher_adapter), "model.teacher.adapter")
    if role == "teacher" and cfg.model.teacher_dtype is not None:
        model = model.to(getattr(torch, cfg.model.teacher_dtype))
    if role == "student" and cfg.model.student_lora is not None:
        from flexkd.training.lora import add_lora

        model = add_lora(model, cfg.model.student_lora)
    return model


def load_trained_student(
    cfg: Config, folder: str | os.PathLike, *, num_labels: int | None = None
) -> nn.Module:
    """The student a run saved in ``folder``: an HF folder, or a LoRA student's adapter, attached to
    the base model the config builds (``model.student`` without its ``lora``; a random init is the
    seeded one the run started from)."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        return auto_class(cfg.data.task).from_pretrained(str(folder))
    import peft

    return peft.PeftModel.from_pretrained(_build_model(cfg, "student", num_labels), str(folder))


def _build_model(cfg: Config, role: str, num_labels: int | None) -> nn.Module:
    spec = getattr(cfg.model, role)
    field = f"model.{role}"
    head_size = (
        {"num_labels": num_labels} if cfg.data.task in ("sequence", "token") and num_labels else {}
    )
    if isinstance(spec, ModelFromConfig):
        from transformers import AutoConfig

        options = {**head_size, **spec.config}
        model_config = AutoConfig.for_model(options.pop("model_type"), **options)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed + (0 if role == "teacher" else 1))
            return auto_class(cfg.data.task).from_config(model_config)
    if isinstance(spec, ModelFromPretrained):
        spec = spec.pretrained
    elif spec.startswith("task:"):
        return resolve_factory(spec, MODEL_FACTORIES, field)(role, cfg)
    local = cfg.path(spec)
    source = str(local) if local.exists() else spec
    try:
        return auto_class(cfg.data.task).from_pretrained(source, **head_size)
    except (OSError, ValueError, RuntimeError) as error:
        raise ConfigError(
            f"{field}: cannot load {spec!r} as a {cfg.data.task} model ({error})"
        ) from None


def build_tokenizer(cfg: Config):
    """The tokenizer of ``model.tokenizer``, else of the teacher when it is a path; None if neither."""
    source = cfg.model.tokenizer
    teacher = cfg.model.teacher
    if isinstance(teacher, ModelFromPretrained):
        teacher = teacher.pretrained
    if source is None and isinstance(teacher, str) and not teacher.startswith("task:"):
        source = teacher
    if source is None:
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    local = cfg.path(source)
    if local.is_file():  # a bare `tokenizers` JSON file
        return PreTrainedTokenizerFast(tokenizer_file=str(local))
    return AutoTokenizer.from_pretrained(str(local) if local.exists() else source)
