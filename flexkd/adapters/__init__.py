"""Per-family knowledge of where each hidden state of a Hugging Face model comes from.

``get_adapter(model, side=None)`` returns a :class:`ModelAdapter` for the model's encoder or decoder
stack; ``token_weights`` says which positions of a batch count for scoring and feature losses.
"""

from flexkd.adapters.base import HookSite, ModelAdapter, check_layer_number
from flexkd.adapters.identity import TeacherIdentity
from flexkd.adapters.masks import TASKS, detect_task, token_weights
from flexkd.adapters.registry import (
    SIDES,
    FamilySpec,
    StackSpec,
    get_adapter,
    register_family,
    registered_model_types,
    unwrap_model,
)

__all__ = [
    "HookSite",
    "ModelAdapter",
    "check_layer_number",
    "TeacherIdentity",
    "TASKS",
    "detect_task",
    "token_weights",
    "SIDES",
    "FamilySpec",
    "StackSpec",
    "get_adapter",
    "register_family",
    "registered_model_types",
    "unwrap_model",
]
