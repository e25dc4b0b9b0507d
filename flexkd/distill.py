"""The Distiller: one call turns a batch into the weighted distillation loss and its terms.

``Distiller`` is an ``nn.Module`` that owns the student and the feature-loss modules (the
projector's parameters live here, outside the student). The teacher is held but not
registered, so it is never in ``state_dict()``, never moved by ``.to()`` or wrapped by DDP
with the student, and it is always frozen and in eval mode.

    distiller = Distiller(teacher, student, selection=sel, weights=dict(task=1, logit=0.5, feature=1))
    loss, terms = distiller(batch)      # terms: {"task", "logit", "feature", "total"}, detached tensors
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

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flexkd.adapters import get_adapter
from flexkd.adapters.masks import aligned_logits, detect_task, logit_positions, token_weights
from flexkd.adapters.output_head import (
    UnsupportedHead,
    check_projection,
    output_projection,
    run_in_place_of_head,
)
from flexkd.errors import ConfigError, FlexKDError, SelectionMismatchError, StoreMismatchError
from flexkd.losses import (
    FLEX_FEATURE_LOSSES,
    LOGIT_KD_KINDS,
    PROJECTOR_DIRECTIONS,
    CKAFeatureLoss,
    FlexFeatureLoss,
    ProjectorFeatureLoss,
    logit_kd,
    task_loss,
)
from flexkd.ops import _linear_logit_kd
from flexkd.taps import LayerTap
from flexkd.teacher_inputs import student_view, teacher_view
from flexkd.teacher_outputs import TeacherOutputs

FEATURE_KINDS = ("flex", "projector", "cka", "none")
TERMS = ("task", "logit", "feature")
DEFAULT_WEIGHTS = {"task": 1.0, "logit": 0.0, "feature": 1.0}
LOGIT_KD_BACKENDS = ("auto", "fused", "materialised")


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


@dataclass
class _HeadSums:
    """The student's outputs on the fused path: the task and logit sums, computed from the final hidden
    state its output projection reads in place of ``[batch, tokens, V]`` logits."""

    sums: dict[str, Tensor]


@dataclass
class _Positions:
    """Where the terms read a batch, on the student's device: the labels aligned with the logits (None
    without labels), the bool logit positions (None when no term reads logits) and the feature term's
    token weights (None without a feature term)."""

    device: torch.device
    labels: Tensor | None
    logits: Tensor | None
    feature: Tensor | None


def _output_size(model: nn.Module) -> int | None:
    """Size of the model's prediction head (vocabulary or number of classes), when it has one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    config = getattr(model, "config", None)
    return getattr(config, "num_labels", None) if config is not None else None


def per_unit(total: Tensor, units: Tensor | float) -> Tensor:
    """``total / units`` in fp32, 0 (with a zero gradient) where ``units`` is 0."""
    total = total.float()
    if not isinstance(units, Tensor):
        return total / float(units) if units else torch.zeros_like(total)
    units = units.to(device=total.device, dtype=torch.float32)
    counted = units > 0
    return torch.where(counted, total / torch.where(counted, units, 1.0), 0.0)


def _assert_count(mask: Tensor, stored: int, what: str) -> None:
    """Fail unless ``mask`` has ``stored`` positions on, without reading the count back to the host."""
    message = (
        f"teacher_outputs: {stored} stored {what}, the batch has a different number; the outputs "
        "were stored for other rows"
    )
    try:
        torch._assert_async(mask.sum() == stored, message)
    except RuntimeError:  # raised at once on the CPU
        raise StoreMismatchError(message) from None


class Distiller(nn.Module):
    """Weighted sum of the task loss, logit KD and a feature loss between teacher and student.

    Args:
        teacher, student: Hugging Face models (any family ``flexkd.adapters`` supports).
        selection: a ``DimensionSelection`` for ``feature="flex"``; its ``k`` must equal the
            student's hidden size and it must cover every teacher layer in ``layer_pairs``.
        feature: ``"flex"`` (selected teacher dims, no parameters), ``"projector"`` (a trained
            linear map, see ``projector_direction``), ``"cka"`` (linear CKA against the full
            teacher hidden state) or ``"none"``.
        feature_loss: ``"mse"`` or ``"corr"`` for ``flex`` and ``projector``; ``"cka"`` for ``flex``
            only: linear CKA between the student and the selected teacher dims (flexkd's variant,
            not the paper's; ``feature="cka"`` is CKA against the whole teacher hidden state).
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
        logit_kd_backend: how the task and logit terms of a causal LM get the student's logits.
            ``"fused"``: the student's output projection computes both terms from its input
            through ``flexkd.ops.linear_logit_kd`` (the task cross-entropy as forward KL against a
            one-hot top-1 teacher, which is exactly it), never building ``[B, T, V]``; the projection
            (``get_output_embeddings()``, tied or not, with Cohere's ``logit_scale`` / Granite's
            ``logits_scaling`` folded in) is checked against the model's own logits on the first batch,
            and a model it does not fit (soft-capped logits, a non-Linear head) is refused.
            ``"materialised"``: the model's logits and ``flexkd.losses`` (the reference).
            ``"auto"`` (default): ``"fused"`` where it applies, else ``"materialised"``.
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
        logit_kd_backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, model in (("teacher", teacher), ("student", student)):
            if not isinstance(model, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
        if feature not in FEATURE_KINDS:
            raise ValueError(f"feature must be one of {FEATURE_KINDS}, got {feature!r}")
        if feature_loss not in FLEX_FEATURE_LOSSES:
            raise ValueError(f"feature_loss must be one of {FLEX_FEATURE_LOSSES}, got {feature_loss!r}")
        if feature_loss == "cka" and feature == "projector":
            raise ValueError(
                "feature_loss='cka' applies to feature='flex' (CKA on the selected dims); a projector is "
                "trained with 'mse' or 'corr', and feature='cka' compares the whole teacher hidden state"
            )
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
        if logit_kd_backend not in LOGIT_KD_BACKENDS:
            raise ValueError(
                f"logit_kd_backend must be one of {LOGIT_KD_BACKENDS}, got {logit_kd_backend!r}"
            )

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

        self._projection = self._student_projection(logit_kd_backend)
        self._projection_checked = False
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

    @classmethod
    def from_config(
        cls, cfg: Any, teacher: nn.Module, student: nn.Module, *, selection: Any = None
    ) -> Distiller:
        """The distiller a :class:`~flexkd.config.Config`'s ``distill`` section describes (a
        ``Config`` or its ``DistillSection``)."""
        section = getattr(cfg, "distill", cfg)
        try:
            return cls(
                teacher,
                student,
                selection=selection,
                feature=section.feature,
                feature_loss=section.feature_loss,
                layer_pairs=section.layer_pairs,
                weights=section.weights.model_dump(),
                logit_kind=section.logit_kind,
                temperature=section.temperature,
                beta=section.beta,
                projector_direction=section.projector_direction,
                side=section.side,
                logit_kd_backend=section.logit_kd_backend,
            )
        except FlexKDError:
            raise
        except ValueError as err:  # the section passed validation but does not fit these models
            raise ConfigError(f"distill: {err}") from None

    # ----------------------------------------------------------------- construction
    def _student_projection(self, backend: str):
        """The student's output projection when the fused logit path runs, else None."""
        if backend == "materialised" or not self._needs_student_logits():
            return None
        try:
            if self.task != "causal_lm":
                raise UnsupportedHead(
                    f"the fused path is for causal LMs, this student's task is {self.task!r}"
                )
            return output_projection(self.student)
        except UnsupportedHead as err:
            if backend == "fused":
                raise ValueError(
                    f"logit_kd_backend='fused': {err}; use logit_kd_backend='materialised'"
                ) from None
            return None

    @property
    def logit_kd_path(self) -> str:
        """``"fused"`` or ``"materialised"``: how the task and logit terms get the student's logits."""
        return "fused" if self._projection is not None else "materialised"

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
                raise SelectionMismatchError(f"selection: {err}") from None
        selected_layers = {self._teacher_adapter.resolve_layer(layer) for layer in selection.layers}
        indices = []
        for s_layer, t_layer in self.layer_pairs:
            teacher_width = self._teacher_adapter.layer_width(t_layer)
            student_width = self._student_adapter.layer_width(s_layer)
            # hidden_size is the teacher's (config) width when the selection records its teacher
            # (else it is read off the scores); a projected last layer (OPT-350m's project_out) is
            # narrower, and its scores have that layer's own width
            recorded = getattr(selection, "teacher", None) is not None
            if recorded and int(selection.hidden_size) != self._teacher_adapter.hidden_size:
                raise SelectionMismatchError(
                    f"selection: made for a teacher of hidden size {selection.hidden_size}, but this "
                    f"teacher has hidden size {self._teacher_adapter.hidden_size}; it does not belong to "
                    f"this teacher"
                )
            if selection.k > teacher_width:
                raise SelectionMismatchError(
                    f"selection: k={selection.k} is larger than the teacher's hidden size {teacher_width}"
                )
            if selection.k != student_width:
                raise SelectionMismatchError(
                    f"selection: k={selection.k} must equal the student's hidden size {student_width} "
                    f"(student layer {s_layer}) for feature='flex'"
                )
            if t_layer not in selected_layers:
                raise SelectionMismatchError(
                    f"selection: has no dimensions for teacher layer {t_layer} (it covers layers "
                    f"{sorted(selected_layers)}); score that layer or change layer_pairs"
                )
            scored_width = selection.scores(t_layer).numel()
            if scored_width != teacher_width:
                raise SelectionMismatchError(
                    f"selection: scored {scored_width} dimensions of teacher layer {t_layer}, but that "
                    f"layer has width {teacher_width}; it does not belong to this teacher"
                )
            indices.append(selection.index(t_layer).to(torch.long))
        return indices

    # ----------------------------------------------------------------- units
    def count_units(self, batch: Mapping[str, Any]) -> dict[str, float]:
        """How many units each term of ``batch`` sums over (computed from the batch alone).

        Python numbers, so call it on the host copy of a batch (the training loop does, before moving
        the batch to the device); on device tensors it waits for the device. ``forward`` without
        ``normalizers`` counts on the device instead and reads nothing back."""
        return {name: float(count) for name, count in self._unit_counts(batch).items()}

    def _unit_counts(self, batch: Mapping[str, Any]) -> dict[str, Tensor | float]:
        """:meth:`count_units` as 0-d fp32 tensors on the batch's device (0.0 for a term not counted)."""
        units: dict[str, Tensor | float] = {"task": 0.0, "logit": 0.0, "feature": 0.0}
        labels = batch.get("labels")
        if (labels is not None and self.task is not None) or self.weights["logit"] > 0:
            positions = self._target_weights(batch)[1].sum(dtype=torch.float32)
            if labels is not None and self.task is not None:
                units["task"] = positions
            if self.weights["logit"] > 0:
                units["logit"] = positions
        if self.feature != "none":
            per_pair = (
                self._feature_weights(batch).sum(dtype=torch.float32)
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
        normalizers: Mapping[str, Tensor | float] | None = None,
        teacher_outputs: TeacherOutputs | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(total_loss, terms)``: ``terms`` holds every term (unweighted) and ``"total"`` as detached
        0-d fp32 tensors (no device sync; ``float(terms[name])`` reads one).

        With several layer pairs, ``"feature"`` is their mean and ``"feature/s<i>-t<j>"`` each pair's.

        ``normalizers`` (term -> units, numbers or 0-d device tensors) defaults to this batch's units,
        counted on the device; a term whose normaliser is 0 contributes 0. ``teacher_outputs``
        (``TeacherOutputStore.batch`` of this batch's rows) replaces running the teacher.
        """
        if normalizers is None:
            normalizers = self._unit_counts(batch)
        positions = self._positions(batch)
        teacher_logits, teacher_hidden = self._teacher_side(batch, positions, teacher_outputs)
        teacher_topk = None
        if isinstance(teacher_logits, tuple):  # a store of top-K logits: (values, indices)
            teacher_logits, teacher_topk = None, teacher_logits
        topk_checked = teacher_outputs is not None and teacher_outputs.logit_topk_checked
        student_out, student_hidden = self._run_student(
            batch,
            lambda hidden: self._fused_logit_sums(
                hidden, positions, teacher_logits, teacher_topk, topk_checked
            ),
        )
        sums, pair_sums = self._term_sums(
            batch, positions, teacher_logits, teacher_hidden, student_out, student_hidden,
            teacher_topk=teacher_topk, topk_checked=topk_checked,
        )
        return self._normalise(sums, pair_sums, normalizers, positions.device)

    def _positions(self, batch: Mapping[str, Any]) -> _Positions:
        """Where each term reads the batch, on the student's device."""
        device = next(self.student.parameters()).device
        labels, logits = None, None
        if self._needs_student_logits():
            labels, logits = self._target_weights(batch)
            logits = logits.to(device)
            labels = labels.to(device) if labels is not None else None
        feature = self._feature_weights(batch).to(device) if self.teacher_layers else None
        return _Positions(device, labels, logits, feature)

    def _teacher_side(
        self, batch: Mapping[str, Any], positions: _Positions, stored: TeacherOutputs | None
    ) -> tuple[Tensor | None, dict[int, Tensor]]:
        """The teacher's logits at the logit positions (None without logit KD) and its hidden states at
        the feature term's layers: from ``stored`` outputs when given, else from a live forward."""
        need_logits = self.weights["logit"] > 0
        if stored is not None:
            return self._unpack_teacher_outputs(
                stored,
                self.teacher_layers,
                positions.logits if need_logits else None,
                positions.feature,
                positions.device,
            )
        if not (self.teacher_layers or need_logits):
            return None, {}
        with torch.no_grad():
            out, hidden = self._run_tapped(
                self.teacher,
                teacher_view(batch),
                self.teacher_layers,
                self._teacher_columns,
                not need_logits,
            )
        logits = self._align_logits(out.logits)[positions.logits] if need_logits else None
        return logits, hidden

    def _run_student(
        self, batch: Mapping[str, Any], head_sums: Callable[[Tensor], dict[str, Tensor]]
    ) -> tuple[Any, dict[int, Tensor]]:
        """The student's outputs and tapped hidden states. The outputs are None when it stops after its
        deepest tap, and on the fused path a :class:`_HeadSums` of ``head_sums(final hidden state)``."""
        layers = [s for s, _ in self.layer_pairs] if self.feature != "none" else []
        batch = student_view(batch)
        if self._projection is None:
            return self._run_tapped(
                self.student, batch, layers, None, not self._needs_student_logits()
            )
        inputs = self._model_inputs(self.student, batch)
        if not self._projection_checked:
            try:
                check_projection(self.student, self._projection, inputs)
            except UnsupportedHead as err:
                raise ValueError(
                    f"logit_kd_backend: {err}; use logit_kd_backend='materialised'"
                ) from None
            self._projection_checked = True
        with LayerTap(self.student, layers, side=self.side) if layers else nullcontext() as tap:
            call = (lambda: tap.run(**inputs)) if layers else (lambda: self.student(**inputs))
            sums, out = run_in_place_of_head(self._projection, head_sums, call)
            # the model's empty logits join the graph, so that a sharded student's backward hooks run
            anchor = out.logits.sum()
            sums = {name: value + anchor for name, value in sums.items()}
            return _HeadSums(sums), dict(tap.hidden) if layers else {}

    def _term_sums(
        self,
        batch: Mapping[str, Any],
        positions: _Positions,
        teacher_logits: Tensor | None,
        teacher_hidden: dict[int, Tensor],
        student_out: Any,
        student_hidden: dict[int, Tensor],
        *,
        teacher_topk: tuple[Tensor, Tensor] | None = None,
        topk_checked: bool = False,
    ) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Each term summed over its units (before normalisation), and the feature term per layer pair.

        The logit term's teacher is ``teacher_logits [positions, V]`` or ``teacher_topk = (values,
        indices)`` ``[positions, K]`` (the top-K renormalised, see ``flexkd.losses.logit_kd``), at the
        logit positions; ``topk_checked``: its indices were checked where they were loaded."""
        sums: dict[str, Tensor] = {}
        has_teacher = teacher_logits is not None or teacher_topk is not None
        if student_out is not None and (
            self.weights["task"] > 0 or batch.get("labels") is not None
        ):
            # Both logit terms read only these positions: gathering them first keeps the softmax (and its
            # backward) off the prompt and padding, most of a causal LM's [batch, length, vocab].
            if isinstance(student_out, _HeadSums):
                sums.update(student_out.sums)
            else:
                logits = self._align_logits(student_out.logits)[positions.logits]
                if positions.labels is not None:
                    sums["task"] = task_loss(
                        logits,
                        positions.labels[positions.logits],
                        ignore_index=self.ignore_index,
                        reduction="sum",
                    )
                if has_teacher:
                    sums["logit"] = logit_kd(
                        logits,
                        teacher_logits,
                        teacher_topk=teacher_topk,
                        kind=self.logit_kind,
                        temperature=self.temperature,
                        beta=self.beta,
                        reduction="sum",
                    )
        pair_sums = []
        if self.feature != "none":
            reduction = "sum" if self.feature_losses[0].per_token else "mean"
            pair_sums = [
                loss_fn(
                    student_hidden[s], teacher_hidden[t], positions.feature, reduction=reduction
                )
                for (s, t), loss_fn in zip(self.layer_pairs, self.feature_losses, strict=True)
            ]
            sums["feature"] = sum(pair_sums)
        return sums, pair_sums

    def _fused_logit_sums(
        self,
        hidden: Tensor,
        positions: _Positions,
        teacher_logits: Tensor | None,
        teacher_topk: tuple[Tensor, Tensor] | None,
        topk_checked: bool = False,
    ) -> dict[str, Tensor]:
        """The task and logit sums of the materialised path, from the final hidden state through
        ``linear_logit_kd`` (each a mean over the gathered rows times their count)."""
        rows, weight, bias = self._projection.affine(self._align_logits(hidden)[positions.logits])
        count = rows.shape[0]
        sums = {}
        if positions.labels is not None:
            labels = positions.labels[positions.logits]
            valid = labels != self.ignore_index
            one_hot = (rows.new_zeros(count, 1), labels.clamp_min(0).unsqueeze(-1))
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.weights["task"] > 0):
                # labels are not read back (a device sync per step); like torch's cross-entropy, an
                # out-of-range label fails inside the op
                mean = _linear_logit_kd(
                    rows, weight, None, one_hot, bias, valid, "forward_kl", 0.5, 1.0, None, "auto",
                    read_topk_indices=False,
                )  # fmt: skip
            sums["task"] = mean * valid.sum()
        if teacher_logits is not None or teacher_topk is not None:
            sums["logit"] = count * _linear_logit_kd(
                rows, weight, teacher_logits, teacher_topk, bias, None, self.logit_kind, self.beta,
                self.temperature, None, "auto", read_topk_indices=not topk_checked,
            )  # fmt: skip
        return sums

    def _normalise(
        self,
        sums: Mapping[str, Tensor],
        pair_sums: list[Tensor],
        normalizers: Mapping[str, Tensor | float],
        device: torch.device,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted total of ``sum / units`` per term, and every term as a detached tensor. A
        normaliser may be a number or a 0-d tensor on the device; neither is read back to the host."""
        zero = torch.zeros((), device=device)
        total = zero
        terms: dict[str, Tensor] = {}
        for name in TERMS:
            if name not in sums:
                terms[name] = zero
                continue
            value = per_unit(sums[name], normalizers.get(name, 0))
            terms[name] = value.detach()
            if self.weights[name] > 0:
                total = total + self.weights[name] * value
        if len(pair_sums) > 1:  # "feature" is the mean over pairs; report each pair too
            per_pair_units = normalizers.get("feature", 0) / len(pair_sums)
            for (s, t), pair_sum in zip(self.layer_pairs, pair_sums, strict=True):
                terms[f"feature/s{s}-t{t}"] = per_unit(pair_sum.detach(), per_pair_units)
        terms["total"] = total.detach()
        return total, terms

    def _unpack_teacher_outputs(
        self,
        stored: TeacherOutputs,
        layers: list[int],
        positions: Tensor | None,
        feature_mask: Tensor | None,
        device: torch.device,
    ) -> tuple[Tensor | tuple[Tensor, Tensor] | None, dict[int, Tensor]]:
        """Stored (packed) teacher outputs as the live teacher path yields them: logits at ``positions``
        (None: not needed), or ``(values, indices)`` when the store holds top-K logits; hidden states
        ``[batch, tokens, width]`` at ``layers`` (zero where ``feature_mask`` is off), only the selected
        columns for ``flex``; on ``device``.

        Nothing here reads a device value back: the stored counts are checked against the batch with
        ``torch._assert_async`` (raised here on the CPU, by the device later on an accelerator)."""
        logits = None
        if positions is not None:
            if stored.logits is None and stored.logit_topk is None:
                raise StoreMismatchError("teacher_outputs: no logits stored, but logit KD is on")
            if stored.logit_topk is not None:
                logits = tuple(t.to(device, non_blocking=True) for t in stored.logit_topk)
                count = stored.logit_topk[0].shape[0]
            else:
                logits = stored.logits.to(device, non_blocking=True)
                count = stored.logits.shape[0]
            _assert_count(positions, count, "logit positions")
        hidden = {}
        for layer in layers:
            if layer not in stored.hidden:
                raise StoreMismatchError(
                    f"teacher_outputs: no hidden states of teacher layer {layer} (stored: {sorted(stored.hidden)})"
                )
            packed = stored.hidden[layer].to(device, non_blocking=True)
            _assert_count(feature_mask, packed.shape[0], f"positions of layer {layer}")
            if self._teacher_columns is not None:
                packed = packed.index_select(-1, self._teacher_columns[layer].to(device))
            full = packed.new_zeros(*feature_mask.shape, packed.shape[-1])
            hidden[layer] = full.masked_scatter(feature_mask.unsqueeze(-1), packed)
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
