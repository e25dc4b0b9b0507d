"""The Distiller: one call turns a batch into the weighted distillation loss and its terms.

``Distiller`` is an ``nn.Module`` that owns the student and the feature-loss modules (the
projector's parameters live here, outside the student). The teacher is held but not
registered, so it is never in ``state_dict()``, never moved by ``.to()`` or wrapped by DDP
with the student, and it is always frozen and in eval mode.

    distiller = Distiller(teacher, student, selection=sel, weights=dict(task=1, logit=0.5, feature=1))
    loss, terms = distiller(batch)      # terms: {"task", "logit", "feature", "total"} as floats
    loss.backward()

Each term is a sum over its units divided by a normaliser: by default the units of this
batch (a per-batch mean). A training loop that accumulates gradients passes
``normalizers=distiller.count_units(...)`` summed over the whole window (and all ranks), so
the window's loss is "sum of token losses / valid tokens in the window", not a mean of means.

Which positions count (``flexkd.adapters.masks``): the task and logit terms use the positions
that have a label (for causal LMs, position ``t`` predicts ``labels[t + 1]``), or every real
token when the batch has no labels; the feature term uses the same positions scoring used
(``token_weights``), so the distilled subspace is matched where it was measured.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from flexkd.adapters import get_adapter
from flexkd.adapters.masks import aligned_logits, detect_task, logit_positions, token_weights
from flexkd.losses import (
    FEATURE_LOSSES,
    LOGIT_KD_KINDS,
    PROJECTOR_DIRECTIONS,
    CKAFeatureLoss,
    FlexFeatureLoss,
    ProjectorFeatureLoss,
    logit_kd,
    task_loss,
)
from flexkd.taps import LayerTap
from flexkd.teacher_outputs import TeacherOutputs

FEATURE_KINDS = ("flex", "projector", "cka", "none")
TERMS = ("task", "logit", "feature")
DEFAULT_WEIGHTS = {"task": 1.0, "logit": 0.0, "feature": 1.0}


def _check_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    merged = dict(DEFAULT_WEIGHTS)
    if weights is None:
        return merged
    if not isinstance(weights, Mapping):
        raise TypeError(
            f"weights must be a mapping of {TERMS} to floats, got {type(weights).__name__}"
        )
    for name, value in weights.items():
        if name not in TERMS:
            raise ValueError(f"weights: unknown term {name!r}; the terms are {TERMS}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ValueError(f"weights[{name!r}] must be a number >= 0, got {value!r}")
        merged[name] = float(value)
    return merged


def _check_layer_pairs(layer_pairs: str | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    if isinstance(layer_pairs, str):
        if layer_pairs != "last":
            raise ValueError(
                f"layer_pairs must be 'last' or a list of (student, teacher) layers, got {layer_pairs!r}"
            )
        return [(-1, -1)]
    pairs = []
    for i, pair in enumerate(layer_pairs):
        if isinstance(pair, str) or len(pair) != 2:
            raise ValueError(
                f"layer_pairs[{i}] must be a (student_layer, teacher_layer) pair, got {pair!r}"
            )
        pairs.append((pair[0], pair[1]))
    if not pairs:
        raise ValueError("layer_pairs must not be empty")
    return pairs


def _output_size(model: nn.Module) -> int | None:
    """Size of the model's prediction head (vocabulary or number of classes), when it has one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    config = getattr(model, "config", None)
    return getattr(config, "num_labels", None) if config is not None else None


class Distiller(nn.Module):
    """Weighted sum of the task loss, logit KD and a feature loss between teacher and student.

    Args:
        teacher, student: Hugging Face models (any family ``flexkd.adapters`` supports).
        selection: a ``DimensionSelection`` for ``feature="flex"``; its ``k`` must equal the
            student's hidden size and it must cover every teacher layer in ``layer_pairs``.
        feature: ``"flex"`` (selected teacher dims, no parameters), ``"projector"`` (a trained
            linear map, see ``projector_direction``), ``"cka"`` (linear CKA against the full
            teacher hidden state) or ``"none"``.
        feature_loss: ``"mse"`` or ``"corr"`` for ``flex`` and ``projector``.
        layer_pairs: ``"last"`` or ``[(student_layer, teacher_layer), ...]`` in HF
            ``hidden_states`` numbering; negative numbers count from the end.
        weights: ``{"task", "logit", "feature"}`` -> weight >= 0 (missing keys keep the defaults
            ``task=1, logit=0, feature=1``). Terms with weight 0 are not computed (and read 0.0),
            except ``task``, which is reported whenever the student produces logits and the
            batch has labels.
        logit_kind, temperature, beta: see ``flexkd.losses.logit_kd``.
        side: for seq2seq models, the stack the layers address (``"encoder"`` by default).
        task: the labelling scheme (``flexkd.adapters.masks.TASKS``); detected from the
            student's class when ``None``.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        *,
        selection: Any = None,
        feature: str = "flex",
        feature_loss: str = "mse",
        layer_pairs: str | Sequence[Sequence[int]] = "last",
        weights: Mapping[str, float] | None = None,
        logit_kind: str = "forward_kl",
        temperature: float = 1.0,
        beta: float = 0.5,
        projector_direction: str = "student_to_teacher",
        side: str | None = None,
        task: str | None = None,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        for name, model in (("teacher", teacher), ("student", student)):
            if not isinstance(model, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
        if feature not in FEATURE_KINDS:
            raise ValueError(f"feature must be one of {FEATURE_KINDS}, got {feature!r}")
        if feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"feature_loss must be one of {FEATURE_LOSSES}, got {feature_loss!r}")
        if logit_kind not in LOGIT_KD_KINDS:
            raise ValueError(f"logit_kind must be one of {LOGIT_KD_KINDS}, got {logit_kind!r}")
        if projector_direction not in PROJECTOR_DIRECTIONS:
            raise ValueError(
                f"projector_direction must be one of {PROJECTOR_DIRECTIONS}, got {projector_direction!r}"
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta must lie strictly between 0 and 1, got {beta!r}")

        self.weights = _check_weights(weights)
        self.feature = feature if self.weights["feature"] > 0 else "none"
        self.logit_kind, self.temperature, self.beta = logit_kind, float(temperature), float(beta)
        self.ignore_index = ignore_index
        self.task = task if task is not None else detect_task(student)
        if (self.weights["task"] > 0 or self.weights["logit"] > 0) and self.task is None:
            raise ValueError(
                f"task: cannot tell what the labels of {type(student).__name__} mean; pass task= "
                "or set weights['task'] and weights['logit'] to 0"
            )

        # The teacher is deliberately not a registered submodule.
        object.__setattr__(self, "teacher", teacher)
        teacher.eval()
        teacher.requires_grad_(False)
        self.student = student
        self._teacher_adapter = get_adapter(teacher, side=side)
        self._student_adapter = get_adapter(student, side=side)
        self.side = self._student_adapter.side

        if self.weights["logit"] > 0:
            t_size, s_size = _output_size(teacher), _output_size(student)
            if t_size is not None and s_size is not None and t_size != s_size:
                raise ValueError(
                    f"logit KD needs one vocabulary: the teacher predicts {t_size} classes/tokens, "
                    f"the student {s_size}; set weights['logit'] to 0 or use models with the same vocabulary"
                )

        self.layer_pairs = self._resolve_pairs(_check_layer_pairs(layer_pairs))
        self.feature_losses = self._build_feature_losses(
            selection, feature_loss, projector_direction
        )
        self._teacher_columns = (
            {
                t: fl.teacher_index
                for (_, t), fl in zip(self.layer_pairs, self.feature_losses, strict=True)
            }
            if self.feature == "flex"
            else None
        )

    # ----------------------------------------------------------------- construction
    def _resolve_pairs(self, pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        resolved = []
        for i, (s_layer, t_layer) in enumerate(pairs):
            try:
                resolved.append(
                    (
                        self._student_adapter.resolve_layer(s_layer),
                        self._teacher_adapter.resolve_layer(t_layer),
                    )
                )
            except (ValueError, TypeError) as err:
                raise type(err)(f"layer_pairs[{i}]: {err}") from None
        return resolved

    def _build_feature_losses(
        self, selection: Any, feature_loss: str, direction: str
    ) -> nn.ModuleList:
        if self.feature == "none":
            return nn.ModuleList()
        if self.feature == "cka":
            return nn.ModuleList(CKAFeatureLoss() for _ in self.layer_pairs)
        if self.feature == "projector":
            return nn.ModuleList(
                ProjectorFeatureLoss(
                    self._student_adapter.layer_width(s),
                    self._teacher_adapter.layer_width(t),
                    direction=direction,
                    loss=feature_loss,
                )
                for s, t in self.layer_pairs
            )
        return nn.ModuleList(
            FlexFeatureLoss(index, loss=feature_loss) for index in self._selected_indices(selection)
        )

    def _selected_indices(self, selection: Any) -> list[Tensor]:
        if selection is None:
            raise ValueError(
                "selection: feature='flex' needs a DimensionSelection (see flexkd.score)"
            )
        if getattr(selection, "teacher", None) is not None:
            try:
                selection.validate(self.teacher)
            except ValueError as err:
                raise ValueError(f"selection: {err}") from None
        selected_layers = {self._teacher_adapter.resolve_layer(layer) for layer in selection.layers}
        indices = []
        for s_layer, t_layer in self.layer_pairs:
            teacher_width = self._teacher_adapter.layer_width(t_layer)
            student_width = self._student_adapter.layer_width(s_layer)
            if int(selection.hidden_size) != teacher_width:
                raise ValueError(
                    f"selection: made for a teacher of hidden size {selection.hidden_size}, but this "
                    f"teacher's layer {t_layer} has width {teacher_width}; it does not belong to this teacher"
                )
            if selection.k > teacher_width:
                raise ValueError(
                    f"selection: k={selection.k} is larger than the teacher's hidden size {teacher_width}"
                )
            if selection.k != student_width:
                raise ValueError(
                    f"selection: k={selection.k} must equal the student's hidden size {student_width} "
                    f"(student layer {s_layer}) for feature='flex'"
                )
            if t_layer not in selected_layers:
                raise ValueError(
                    f"selection: has no dimensions for teacher layer {t_layer} (it covers layers "
                    f"{sorted(selected_layers)}); score that layer or change layer_pairs"
                )
            indices.append(selection.index(t_layer).to(torch.long))
        return indices

    # ----------------------------------------------------------------- units
    def count_units(self, batch: Mapping[str, Any]) -> dict[str, float]:
        """How many units each term of ``batch`` sums over (computed from the batch alone)."""
        units = {"task": 0.0, "logit": 0.0, "feature": 0.0}
        labels = batch.get("labels")
        if labels is not None and self.task is not None:
            units["task"] = float(self._target_weights(batch)[1].sum())
        if self.weights["logit"] > 0:
            units["logit"] = float(self._target_weights(batch)[1].sum())
        if self.feature != "none":
            per_pair = (
                float(self._feature_weights(batch).sum())
                if self.feature_losses[0].per_token
                else 1.0
            )
            units["feature"] = per_pair * len(self.layer_pairs)
        return units

    def _target_weights(self, batch: Mapping[str, Any]) -> tuple[Tensor | None, Tensor]:
        """(labels aligned with the logits or None, bool weights of the logit positions)."""
        return logit_positions(batch, task=self.task, ignore_index=self.ignore_index)

    def _feature_weights(self, batch: Mapping[str, Any]) -> Tensor:
        decoder = self.task == "seq2seq" and self.side == "decoder"
        shape_key = next(
            k
            for k in (
                ("labels", "decoder_input_ids")
                if decoder
                else ("input_ids", "attention_mask", "inputs_embeds")
            )
            if batch.get(k) is not None
        )
        shape = tuple(batch[shape_key].shape[:2])
        return token_weights(
            batch, task=self.task, side=self.side, shape=shape, ignore_index=self.ignore_index
        )

    # ----------------------------------------------------------------- forward
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's parameters followed by the feature losses' (the projector's)."""
        return [p for p in self.student.parameters() if p.requires_grad] + [
            p for p in self.feature_losses.parameters() if p.requires_grad
        ]

    def _model_inputs(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The batch minus labels (the distiller computes every loss itself)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if (
            self.task == "seq2seq"
            and "decoder_input_ids" not in inputs
            and batch.get("labels") is not None
        ):
            inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(
                labels=batch["labels"]
            )
        return inputs

    @property
    def teacher_layers(self) -> list[int]:
        """The teacher layers the feature term reads (none without one)."""
        return [t for _, t in self.layer_pairs] if self.feature != "none" else []

    def _needs_student_logits(self) -> bool:
        return self.weights["task"] > 0 or self.weights["logit"] > 0

    def forward(
        self,
        batch: Mapping[str, Any],
        normalizers: Mapping[str, float] | None = None,
        teacher_outputs: TeacherOutputs | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """``(total_loss, terms)``: ``terms`` holds every term (unweighted) and ``"total"`` as floats.

        With several layer pairs, ``"feature"`` is their mean and ``"feature/s<i>-t<j>"`` each pair's.

        ``normalizers`` (term -> units) defaults to ``count_units(batch)``; a term whose
        normaliser is 0 contributes 0. ``teacher_outputs`` (``TeacherOutputStore.batch`` of this batch's
        rows) replaces running the teacher.
        """
        if normalizers is None:
            normalizers = self.count_units(batch)
        need_teacher_logits = self.weights["logit"] > 0
        need_student_logits = self._needs_student_logits()
        teacher_layers = self.teacher_layers
        student_layers = [s for s, _ in self.layer_pairs] if self.feature != "none" else []

        device = next(self.student.parameters()).device
        labels, positions = None, None
        if need_student_logits:
            labels, positions = self._target_weights(batch)
            positions = positions.to(device)
        feature_mask = self._feature_weights(batch).to(device) if teacher_layers else None

        teacher_logits, teacher_hidden = None, {}
        if teacher_outputs is not None:
            teacher_logits, teacher_hidden = self._unpack_teacher_outputs(
                teacher_outputs,
                teacher_layers,
                positions if need_teacher_logits else None,
                feature_mask,
                device,
            )
        elif teacher_layers or need_teacher_logits:
            with torch.no_grad():
                teacher_out, teacher_hidden = self._run_tapped(
                    self.teacher,
                    batch,
                    teacher_layers,
                    self._teacher_columns,
                    not need_teacher_logits,
                )
            if need_teacher_logits:
                teacher_logits = self._align_logits(teacher_out.logits)[positions]
        student_out, student_hidden = self._run_tapped(
            self.student, batch, student_layers, None, not need_student_logits
        )

        sums: dict[str, Tensor] = {}
        if student_out is not None and (
            self.weights["task"] > 0 or batch.get("labels") is not None
        ):
            # Both logit terms read only these positions: gathering them first keeps the softmax (and its
            # backward) off the prompt and padding, most of a causal LM's [batch, length, vocab].
            logits = self._align_logits(student_out.logits)[positions]
            if labels is not None:
                sums["task"] = task_loss(
                    logits,
                    labels.to(device)[positions],
                    ignore_index=self.ignore_index,
                    reduction="sum",
                )
            if need_teacher_logits:
                sums["logit"] = logit_kd(
                    logits,
                    teacher_logits,
                    kind=self.logit_kind,
                    temperature=self.temperature,
                    beta=self.beta,
                    reduction="sum",
                )
        pair_sums = []
        if self.feature != "none":
            reduction = "sum" if self.feature_losses[0].per_token else "mean"
            pair_sums = [
                loss_fn(student_hidden[s], teacher_hidden[t], feature_mask, reduction=reduction)
                for (s, t), loss_fn in zip(self.layer_pairs, self.feature_losses, strict=True)
            ]
            sums["feature"] = sum(pair_sums)

        total = torch.zeros((), device=device)
        terms: dict[str, float] = {}
        for name in TERMS:
            if name not in sums or not normalizers.get(name, 0):
                terms[name] = 0.0
                continue
            value = sums[name] / float(normalizers[name])
            terms[name] = float(value.detach())
            if self.weights[name] > 0:
                total = total + self.weights[name] * value
        if len(pair_sums) > 1:  # "feature" is the mean over pairs; report each pair too
            per_pair_units = float(normalizers.get("feature", 0)) / len(pair_sums)
            for (s, t), pair_sum in zip(self.layer_pairs, pair_sums, strict=True):
                value = float(pair_sum.detach()) / per_pair_units if per_pair_units else 0.0
                terms[f"feature/s{s}-t{t}"] = value
        terms["total"] = float(total.detach())
        return total, terms

    def _unpack_teacher_outputs(
        self,
        stored: TeacherOutputs,
        layers: list[int],
        positions: Tensor | None,
        feature_mask: Tensor | None,
        device: torch.device,
    ) -> tuple[Tensor | None, dict[int, Tensor]]:
        """Stored (packed) teacher outputs as the live teacher path yields them: logits at ``positions``
        (None: not needed), hidden states ``[batch, tokens, width]`` at ``layers`` (zero where
        ``feature_mask`` is off), only the selected columns for ``flex``; on ``device``."""
        logits = None
        if positions is not None:
            if stored.logits is None:
                raise ValueError("teacher_outputs: no logits stored, but logit KD is on")
            if stored.logits.shape[0] != int(positions.sum()):
                raise ValueError(
                    f"teacher_outputs: {stored.logits.shape[0]} stored logit positions, the batch has "
                    f"{int(positions.sum())}; the outputs were stored for other rows"
                )
            logits = stored.logits.to(device)
        hidden = {}
        feature_positions = int(feature_mask.sum()) if layers else 0
        for layer in layers:
            if layer not in stored.hidden:
                raise ValueError(
                    f"teacher_outputs: no hidden states of teacher layer {layer} (stored: {sorted(stored.hidden)})"
                )
            packed = stored.hidden[layer].to(device)
            if packed.shape[0] != feature_positions:
                raise ValueError(
                    f"teacher_outputs: {packed.shape[0]} stored positions of layer {layer}, the batch has "
                    f"{feature_positions}; the outputs were stored for other rows"
                )
            if self._teacher_columns is not None:
                packed = packed.index_select(-1, self._teacher_columns[layer].to(device))
            full = packed.new_zeros(*feature_mask.shape, packed.shape[-1])
            full[feature_mask] = packed
            hidden[layer] = full
        return logits, hidden

    def _run_tapped(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        layers: list[int],
        columns: Mapping[int, Tensor] | None,
        stop_early: bool,
    ) -> tuple[Any, dict[int, Tensor]]:
        """``model``'s outputs (None when stopped early) and its hidden states at ``layers``."""
        inputs = self._model_inputs(model, batch)
        if not layers:
            return model(**inputs), {}
        with LayerTap(
            model, layers, columns=columns, stop_after_deepest=stop_early, side=self.side
        ) as tap:
            outputs = tap.run(**inputs)
            return outputs, dict(tap.hidden)

    def _align_logits(self, logits: Tensor) -> Tensor:
        return aligned_logits(logits, self.task)


def __getattr__(name: str):
    # FlexKDTrainer subclasses transformers.Trainer, whose import takes seconds; build it on first use.
    if name == "FlexKDTrainer":
        return _flexkd_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _flexkd_trainer_class() -> type:
    from transformers import Trainer

    class FlexKDTrainer(Trainer):
        """A Hugging Face ``Trainer`` whose loss is a :class:`Distiller`'s.

        ``model`` is the distiller, so the optimizer gets the student's and the projector's
        parameters and DDP wraps both. Every term is logged (averaged over the logging
        interval) as ``distill/<term>``. Saving writes the student alone with
        ``save_pretrained`` (loadable with ``from_pretrained``) plus the feature-loss
        parameters in ``flexkd_feature_losses.safetensors``, which resuming restores.
        Gradient accumulation follows the ``Trainer``'s rule (mean of micro-batch means); the
        ``flexkd distill`` loop normalises by the valid tokens of the whole window instead.

            trainer = FlexKDTrainer(distiller, args=TrainingArguments(...), train_dataset=ds, data_collator=collate)
            trainer.train()
        """

        FEATURE_LOSSES_FILE = "flexkd_feature_losses.safetensors"

        def __init__(self, distiller: Distiller, *args: Any, **kwargs: Any) -> None:
            if not isinstance(distiller, Distiller):
                raise TypeError(
                    f"distiller must be a flexkd Distiller, got {type(distiller).__name__}"
                )
            if "model" in kwargs:
                raise TypeError("pass the Distiller as the first argument, not model=")
            super().__init__(distiller, *args, **kwargs)
            self._term_sums: dict[str, float] = {}
            self._term_calls = 0

        @property
        def distiller(self) -> Distiller:
            return self.accelerator.unwrap_model(self.model)

        def _set_signature_columns_if_needed(self) -> None:
            if self._signature_columns is None:
                student_inputs = inspect.signature(self.distiller.student.forward).parameters
                self._signature_columns = list(
                    dict.fromkeys([*student_inputs, "labels", "label", "label_ids"])
                )

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, terms = model(inputs)
            if model.training:
                for name, value in terms.items():
                    self._term_sums[name] = self._term_sums.get(name, 0.0) + value
                self._term_calls += 1
            return (loss, {"terms": terms}) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                loss, _ = model(inputs)
            return loss.detach(), None, None

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "loss" in logs and self._term_calls:
                for name, total in self._term_sums.items():
                    logs[f"distill/{name}"] = total / self._term_calls
                self._term_sums, self._term_calls = {}, 0
            super().log(logs, *args, **kwargs)

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            if not self.args.should_save:
                return
            os.makedirs(output_dir, exist_ok=True)
            distiller = self.distiller
            distiller.student.save_pretrained(output_dir)
            feature_state = {
                k: v.detach().cpu().contiguous()
                for k, v in distiller.feature_losses.state_dict().items()
            }
            if feature_state:
                save_file(feature_state, os.path.join(output_dir, self.FEATURE_LOSSES_FILE))
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

        def _load_from_checkpoint(
            self, resume_from_checkpoint: str, model: nn.Module | None = None
        ) -> None:
            distiller = self.accelerator.unwrap_model(model if model is not None else self.model)
            saved = type(distiller.student).from_pretrained(resume_from_checkpoint)
            distiller.student.load_state_dict(saved.state_dict())
            feature_file = os.path.join(resume_from_checkpoint, self.FEATURE_LOSSES_FILE)
            if os.path.exists(feature_file):
                distiller.feature_losses.load_state_dict(load_file(feature_file))

    FlexKDTrainer.__qualname__ = "FlexKDTrainer"
    FlexKDTrainer.__module__ = __name__
    return FlexKDTrainer
