"""Teacher-side tokenisation: a batch may carry the teacher's own ids next to the student's.

When teacher and student tokenize differently (two vocabularies that split text the same way but number
the pieces differently, e.g. BERT's WordPiece and MPNet's), a batch holds ``input_ids`` for the student and
``teacher_input_ids`` for the teacher (optionally ``teacher_attention_mask``, ``teacher_token_type_ids``,
``teacher_labels``). Each model reads only its own: :func:`teacher_view` is what the teacher runs on,
:func:`student_view` what the student runs on. The feature and logit losses compare the two models
position by position, so the sequences must be position-aligned: ``teacher_input_ids`` has the shape of
``input_ids`` and the teacher's attention mask is the student's; anything else is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

TEACHER_PREFIX = "teacher_"
# teacher key -> the key it replaces in the teacher's view
TEACHER_KEYS = {
    f"{TEACHER_PREFIX}{key}": key
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels")
}


def has_teacher_inputs(batch: Mapping[str, Any]) -> bool:
    return any(key in batch for key in TEACHER_KEYS)


def student_view(batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` without the teacher's keys."""
    return {key: value for key, value in batch.items() if key not in TEACHER_KEYS}


def teacher_view(batch: Mapping[str, Any], *, token_labels: bool = False) -> dict[str, Any]:
    """What the teacher runs on: ``teacher_<key>`` replaces ``<key>`` (the student's ``input_ids`` are never
    left in it when ``teacher_input_ids`` is given), after :func:`check_teacher_inputs`. A batch without
    teacher keys is returned as a plain copy.

    ``token_labels``: the teacher reads ``labels`` as token ids (a language model's loss), so a batch with
    ``teacher_input_ids`` and ``labels`` must also carry ``teacher_labels``."""
    if not has_teacher_inputs(batch):
        return dict(batch)
    check_teacher_inputs(batch)
    if token_labels and "labels" in batch and "teacher_labels" not in batch:
        raise ValueError(
            "teacher_labels: the labels are token ids in the student's vocabulary; a batch with "
            "teacher_input_ids needs the teacher's own labels for the teacher's loss"
        )
    view = student_view(batch)
    for teacher_key, key in TEACHER_KEYS.items():
        if teacher_key in batch:
            view[key] = batch[teacher_key]
    if "teacher_token_type_ids" not in batch:
        view.pop("token_type_ids", None)  # the student's segment ids say nothing about the teacher's
    return view


def check_teacher_inputs(batch: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the key unless the teacher's sequences are position-aligned with the
    student's: ``teacher_input_ids`` given whenever another teacher key is, with the shape of
    ``input_ids``; ``teacher_attention_mask`` equal to ``attention_mask`` (all ones when the batch has
    none); ``teacher_token_type_ids`` and ``teacher_labels`` shaped like what they replace."""
    if not has_teacher_inputs(batch):
        return
    present = sorted(key for key in TEACHER_KEYS if key in batch)
    if "teacher_input_ids" not in batch:
        raise ValueError(
            f"{present[0]}: given without teacher_input_ids (the teacher's ids are what it reads)"
        )
    teacher_ids = _tensor(batch, "teacher_input_ids")
    student_ids = batch.get("input_ids")
    if not isinstance(student_ids, torch.Tensor):
        raise ValueError(
            "teacher_input_ids: the batch has no input_ids tensor to align the teacher's ids with"
        )
    if teacher_ids.shape != student_ids.shape:
        raise ValueError(
            f"teacher_input_ids: shape {tuple(teacher_ids.shape)} differs from input_ids "
            f"{tuple(student_ids.shape)}; the teacher's and the student's sequences must be position-aligned"
        )
    if "teacher_attention_mask" in batch:
        teacher_mask = _tensor(batch, "teacher_attention_mask")
        student_mask = batch.get("attention_mask")
        if student_mask is None:
            student_mask = torch.ones_like(student_ids)
        message = (
            "teacher_attention_mask: differs from attention_mask; the feature loss compares positions, "
            "so both models must attend to the same ones"
        )
        if teacher_mask.shape != student_mask.shape:
            raise ValueError(message)
        same = (teacher_mask.to(student_mask.device) != 0) == (student_mask != 0)
        if same.device.type == "cpu":
            if not bool(same.all()):
                raise ValueError(message)
        else:  # checked by the device, without reading a value back every step
            torch._assert_async(same.all(), message)
    for key in ("teacher_token_type_ids", "teacher_labels"):
        if key in batch:
            value, replaced = _tensor(batch, key), batch.get(TEACHER_KEYS[key])
            expected = tuple(replaced.shape) if isinstance(replaced, torch.Tensor) else None
            if expected is not None and tuple(value.shape) != expected:
                raise ValueError(
                    f"{key}: shape {tuple(value.shape)} differs from {TEACHER_KEYS[key]} {expected}"
                )


def _tensor(batch: Mapping[str, Any], key: str) -> torch.Tensor:
    value = batch[key]
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{key}: expected a tensor, got {type(value).__name__}")
    return value
