"""Named factories: ``"task:NAME"`` in a config's ``model.teacher``/``model.student`` or ``data.factory``
refers to one registered here (or to ``"task:package.module:function"``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from flexkd.config import Config
from flexkd.errors import ConfigError

MODEL_FACTORIES: dict[str, Callable[[str, Config], nn.Module]] = {}
DATA_FACTORIES: dict[str, Callable[[Config, Any], Mapping[str, Sequence[Mapping[str, Any]]]]] = {}


def register_model_factory(name: str):
    """Decorator: ``factory(role, config) -> model`` for ``model.teacher/student: "task:<name>"``."""

    def register(factory):
        MODEL_FACTORIES[name] = factory
        return factory

    return register


def register_data_factory(name: str):
    """Decorator: ``factory(config, tokenizer) -> {split: rows}`` for ``data.factory: "task:<name>"``.

    Rows are tokenized dicts: ``input_ids`` (list of ints), optional ``attention_mask``,
    ``token_type_ids`` and ``labels`` (an int for sequence tasks, a list otherwise).
    """

    def register(factory):
        DATA_FACTORIES[name] = factory
        return factory

    return register


def resolve_factory(spec: str, registry: Mapping[str, Callable], field: str) -> Callable:
    """The factory ``spec`` (``"task:NAME"`` or ``"task:module:function"``) names; ``field`` is the config field."""
    name = spec.removeprefix("task:")
    if name in registry:
        return registry[name]
    module_name, sep, attr = name.partition(":")
    if sep:
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise ConfigError(f"{field}: cannot import factory {name!r} ({error})") from None
    raise ConfigError(
        f"{field}: no factory named {name!r}; registered: {sorted(registry)} "
        "(or use 'task:package.module:function')"
    )
