"""Which token positions count: per-position weights for scoring and feature losses.

A position counts when it is a real token (``attention_mask``) and, for token-level tasks, when its
label is not ignored. For causal LMs the hidden state at position ``t`` predicts ``labels[t + 1]``
(Hugging Face shifts inside the model), so its weight comes from the next label and the last position
never counts. For seq2seq models the encoder side uses ``attention_mask``; the decoder side uses the
decoder labels (position ``t`` predicts ``labels[t]``) and ``decoder_attention_mask``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from flexkd.adapters.wrappers import unwrap_model

TASKS = ("causal_lm", "seq2seq", "sequence", "token")

_CLASS_SUFFIXES = (
    ("ForCausalLM", "causal_lm"),
    ("LMHeadModel", "causal_lm"),
    ("ForConditionalGeneration", "seq2seq"),
    ("ForSequenceClassification", "sequence"),
    ("ForMultipleChoice", "sequence"),
    ("ForQuestionAnswering", "sequence"),
    ("ForTokenClassification", "token"),
    ("ForMaskedLM", "token"),
)


def detect_task(model: nn.Module) -> str | None:
    """The labelling scheme of ``model``'s head, from its class name; ``None`` for a bare backbone."""
    model = unwrap_model(model)
    name = type(model).__name__
    for suffix, task in _CLASS_SUFFIXES:
        if name.endswith(suffix):
            return task
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    return None


def check_task(task: object) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return task  # type: ignore[return-value]


def token_weights(
    batch: Mapping[str, object],
    *,
    task: str | None,
    side: str,
    shape: tuple[int, int],
    device: torch.device | str | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Bool ``[B, T]``: which positions of a hidden state of leading shape ``shape`` count.

    ``task`` is one of ``TASKS`` (``None`` means only the padding mask applies); ``side`` is the stack the
    hidden state comes from (``"encoder"`` or ``"decoder"``), which matters for seq2seq models only. The
    result lives on ``device`` (default: the device of the batch's masks).
    """
    if task is not None:
        check_task(task)
    if len(shape) != 2:
        raise ValueError(f"shape must be (batch, tokens), got {tuple(shape)}")
    decoder_of_seq2seq = task == "seq2seq" and side == "decoder"
    mask_key = "decoder_attention_mask" if decoder_of_seq2seq else "attention_mask"
    weights = _as_mask(batch.get(mask_key), mask_key, shape, device)
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.dim() < 2:
        # sequence-level labels (or none): every real token counts
        return weights
    if task == "causal_lm":
        _check_shape(labels, "labels", shape)
        next_label_valid = torch.zeros(shape, dtype=torch.bool, device=weights.device)
        next_label_valid[:, :-1] = labels[:, 1:].to(weights.device) != ignore_index
        return weights & next_label_valid
    if task == "token" or decoder_of_seq2seq:
        _check_shape(labels, "labels", shape)
        return weights & (labels.to(weights.device) != ignore_index)
    return weights


def _as_mask(mask: object, name: str, shape: tuple[int, int], device) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"batch[{name!r}] must be a tensor, got {type(mask).__name__}")
    _check_shape(mask, f"batch[{name!r}]", shape)
    return (mask != 0).to(device if device is not None else mask.device)


def _check_shape(t: torch.Tensor, name: str, shape: tuple[int, int]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}, but the hidden state has (batch, tokens) {tuple(shape)}"
        )


def logit_positions(
    batch: Mapping[str, object], *, task: str, ignore_index: int = -100
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(labels aligned with the logits or None, bool mask of the logit positions that count)``.

    Aligned means as :func:`aligned_logits` leaves them: for causal LMs position ``t`` of the logits
    predicts ``labels[t + 1]``, so both drop one position. Without labels, every real token counts (for
    causal LMs, every position whose next token is real too) and sequence tasks count every row.
    """
    check_task(task)
    labels = batch.get("labels")
    if task == "sequence":
        if isinstance(labels, torch.Tensor):
            return labels, labels != ignore_index
        size = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
        return None, torch.ones(size, dtype=torch.bool)
    if isinstance(labels, torch.Tensor):
        if task == "causal_lm":
            labels = labels[:, 1:]
        return labels, labels != ignore_index
    key = "decoder_attention_mask" if task == "seq2seq" else "attention_mask"
    mask = batch.get(key)
    if not isinstance(mask, torch.Tensor):
        raise ValueError(
            f"batch: logit KD without labels needs batch[{key!r}] to know the positions"
        )
    if task == "causal_lm":
        # position t predicts token t + 1: both must be real tokens
        return None, (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
    return None, mask != 0


def aligned_logits(logits: torch.Tensor, task: str) -> torch.Tensor:
    """The logits :func:`logit_positions` indexes: a causal LM's last position predicts nothing."""
    return logits[:, :-1] if task == "causal_lm" else logits


def scored_positions(
    batch: Mapping[str, object],
    *,
    task: str | None,
    side: str,
    shape: tuple[int, int],
    device: torch.device | str | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """:func:`token_weights`, and the positions whose gradient the task loss defines: for a causal LM
    with token labels the next position must be a real token too; for a sequence task the row's label
    must not be ignored.

    A label at a padding position is padding whatever its value (``labels = input_ids`` leaves the pad
    id there), and whether a row is followed by padding depends on what it is batched with; requiring
    the next token to be real makes every row count the same positions in any batch. A row whose label
    is ignored adds no loss, so its tokens would only dilute the normalisation.
    """
    weights = token_weights(
        batch, task=task, side=side, shape=shape, device=device, ignore_index=ignore_index
    )
    labels, mask = batch.get("labels"), batch.get("attention_mask")
    if not isinstance(labels, torch.Tensor):
        return weights
    if task == "causal_lm" and labels.dim() == 2 and isinstance(mask, torch.Tensor):
        weights[:, :-1] &= mask[:, 1:].to(weights.device) != 0
    one_label_a_row = labels.dim() == 1 and labels.shape[0] == weights.shape[0]
    if task == "sequence" and one_label_a_row and not labels.is_floating_point():
        weights &= (labels.to(weights.device) != ignore_index)[:, None]
    return weights


def counted_labels(
    batch: Mapping[str, object], *, task: str, ignore_index: int = -100
) -> torch.Tensor:
    """The labels the scoring loss reads, aligned with :func:`aligned_logits`, set to ``ignore_index``
    wherever the position does not count.

    Token-level tasks count exactly the positions :func:`scored_positions` counts (for causal LMs:
    positions ``t`` and ``t + 1`` are real tokens and ``labels[t + 1]`` is not ignored; for seq2seq the
    decoder positions, with ``decoder_attention_mask`` when given). Sequence tasks count every row whose
    label is not ignored.
    """
    check_task(task)
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor):
        raise ValueError("batch: the task loss needs batch['labels']")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(
            f"batch['labels'] must hold integer class indices for the cross-entropy task loss, got "
            f"{labels.dtype}; for a regression or multi-label head pass a loss_fn"
        )
    if task == "sequence":
        return labels
    if labels.dim() != 2:
        raise ValueError(
            f"batch['labels'] must be [batch, tokens] for task {task!r}, got shape {tuple(labels.shape)}"
        )
    counted = scored_positions(
        batch,
        task=task,
        side="decoder" if task == "seq2seq" else "encoder",
        shape=tuple(labels.shape),
        device=labels.device,
        ignore_index=ignore_index,
    )
    if task == "causal_lm":
        return labels[:, 1:].masked_fill(~counted[:, :-1], ignore_index)
    return labels.masked_fill(~counted, ignore_index)
