"""``FlexKDTrainer``: a Hugging Face ``Trainer`` whose loss is a :class:`~flexkd.distill.Distiller`'s.

Imports ``transformers.Trainer`` (seconds); ``import flexkd`` loads this module only when
``flexkd.FlexKDTrainer`` is first used.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import Trainer

from flexkd.adapters import unwrap_model
from flexkd.distill import TERMS, Distiller
from flexkd.distributed import is_sharded
from flexkd.teacher_inputs import TEACHER_KEYS
from flexkd.teacher_outputs import TeacherOutputStore
from flexkd.training.loop import window_units
from flexkd.training.run_dir import load_student_weights


class FlexKDTrainer(Trainer):
    """A Hugging Face ``Trainer`` whose loss is a :class:`Distiller`'s.

        trainer = FlexKDTrainer(distiller, args=TrainingArguments(...), train_dataset=ds,
                                data_collator=collate, eval_dataset=val, compute_metrics=metrics)
        trainer.train()

    - ``model`` is the distiller, so the optimizer gets the student's and the projector's parameters
      and DDP wraps both. The frozen teacher is moved to each process's device (``args.device``) and
      to ``teacher_dtype`` (default: bfloat16/float16 under ``args.bf16``/``args.fp16``, else as built).
    - Gradient accumulation: every term is a sum over its units (valid tokens, rows) divided by the
      units of the whole accumulation window on all processes (the generalisation of the Trainer's
      ``num_items_in_batch`` to each term), so a window's loss is the same whatever the split into
      micro-batches and processes.
    - Logs: each term, averaged over the logging interval and all processes, as ``distill/<term>``;
      evaluation adds ``eval_<term>`` (each term's sum over the evaluation set divided by its units,
      all processes together) and reports ``eval_loss`` as ``eval_total``, so neither depends on the
      evaluation batch size or the number of processes. ``prediction_step`` returns the student's
      logits and the labels, so ``compute_metrics`` runs.
    - Saving (``save_model``, also every checkpoint) writes the student alone with ``save_pretrained``
      (``from_pretrained`` loads it; a PEFT student: its adapter) plus the feature-loss parameters in
      ``flexkd_feature_losses.safetensors``; ``resume_from_checkpoint`` and ``load_best_model_at_end``
      restore both. The Trainer has no public hook for loading, so ``_load_from_checkpoint`` and
      ``_load_best_model`` are overridden, nor for the columns ``remove_unused_columns`` keeps (the
      student's inputs, not the distiller's), so ``_set_signature_columns_if_needed`` is; everything
      else uses public hooks (``get_batch_samples``, ``compute_loss``, ``log``, ``evaluation_loop``,
      ``prediction_step``, ``save_model``).
    - ``teacher_outputs``: a :class:`~flexkd.teacher_outputs.TeacherOutputStore` (or its folder) that
      ``flexkd.teacher_outputs.write_teacher_outputs`` wrote for ``train_dataset`` (a sequence of row
      mappings, in the same order) replaces the teacher's forward in training, as in ``flexkd.train``;
      it is checked against the teacher, the rows, the distiller's layers and logit KD here. Each row
      carries its position to the collator as ``flexkd_row`` (the collator never sees it).
      Evaluation runs the live teacher.
    - A student sharded with ``fully_shard`` (FSDP2) is refused: the Trainer wraps the model in DDP and
      steps its own optimizer over it, which a sharded student cannot take part in; shard the student
      with ``flexkd.train`` and ``distributed.fsdp.student`` instead. A sharded teacher is left where it
      is (``teacher_dtype`` cannot recast it). FSDP asked of the Trainer itself (``accelerate launch
      --use_fsdp``, ``TrainingArguments.fsdp``) is refused for the same reason.
    """

    FEATURE_LOSSES_FILE = "flexkd_feature_losses.safetensors"
    # compute_loss divides by the units of the whole accumulation window, so training_step must not
    # divide by the number of micro-batches again
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        distiller: Distiller,
        *args: Any,
        teacher_dtype: torch.dtype | None = None,
        teacher_outputs: TeacherOutputStore | str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(distiller, Distiller):
            raise TypeError(f"distiller must be a flexkd Distiller, got {type(distiller).__name__}")
        if "model" in kwargs:
            raise TypeError("pass the Distiller as the first argument, not model=")
        if not hasattr(Trainer, "loss_is_scaled_for_ga"):
            import transformers

            raise ImportError(
                f"FlexKDTrainer needs a transformers Trainer with loss_is_scaled_for_ga (its gradient "
                f"accumulation would divide the window-normalised loss again); transformers "
                f"{transformers.__version__} has none, upgrade it"
            )
        if teacher_dtype is not None and not (
            isinstance(teacher_dtype, torch.dtype) and teacher_dtype.is_floating_point
        ):
            raise TypeError(f"teacher_dtype must be a float torch.dtype, got {teacher_dtype!r}")
        if is_sharded(distiller.student):
            raise ValueError(
                "FlexKDTrainer: the student is sharded (fully_shard); the Trainer's DDP and optimizer "
                "cannot train a sharded student. Pass it unsharded, or train with flexkd.train and "
                "distributed.fsdp.student: true"
            )
        training_args = kwargs.get("args", args[0] if args else None)
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or getattr(
            training_args, "fsdp", None
        ):
            raise ValueError(
                "FlexKDTrainer: FSDP was asked for (accelerate launch --use_fsdp or "
                "TrainingArguments.fsdp); the Trainer would wrap the whole Distiller, teacher included, "
                "by its own policy. Shard the teacher with flexkd.distributed.shard_model and keep the "
                "student whole, or train with flexkd distill and distributed.fsdp"
            )
        super().__init__(distiller, *args, **kwargs)
        self._place_teacher(teacher_dtype)
        self._store = None
        if teacher_outputs is not None:
            self._store = _checked_store(teacher_outputs, distiller, self.train_dataset)
            self.train_dataset = _RowsWithPositions(self.train_dataset)
            self.data_collator = _CollateWithPositions(self.data_collator)
        self._window_units: dict[str, float] | None = None
        self._train_terms = _TermSums()
        self._eval_terms = _TermSums()

    @property
    def distiller(self) -> Distiller:
        return self.accelerator.unwrap_model(self.model)

    def _place_teacher(self, dtype: torch.dtype | None) -> None:
        teacher = self.distiller.teacher
        if is_sharded(teacher):  # fully_shard placed it; .to() would replace its DTensors
            if dtype is not None and any(p.dtype != dtype for p in teacher.parameters()):
                raise ValueError(
                    f"teacher_dtype: the teacher is sharded, so it cannot be cast to {dtype} here; "
                    "cast it before fully_shard"
                )
            return
        if dtype is None and self.args.bf16:
            dtype = torch.bfloat16
        elif dtype is None and self.args.fp16:
            dtype = torch.float16
        teacher.to(device=self.args.device, dtype=dtype)

    def _set_signature_columns_if_needed(self) -> None:
        # The distiller's forward takes the whole batch; keep the columns the student reads.
        if self._signature_columns is None:
            student = unwrap_model(self.distiller.student)  # a PeftModel's forward takes **kwargs
            student_inputs = inspect.signature(student.forward).parameters
            self._signature_columns = list(
                dict.fromkeys(
                    [*student_inputs, "labels", "label", "label_ids", ROW_KEY, *TEACHER_KEYS]
                )
            )

    # ------------------------------------------------------------------------------- training
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's accumulation window, and each term's units in it summed over all processes."""
        batch_samples, num_items_in_batch = super().get_batch_samples(
            epoch_iterator, num_batches, device
        )
        if batch_samples:
            self._window_units = window_units(self.distiller, batch_samples, self.accelerator)
            self._train_terms.steps += 1
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The distiller's loss, normalised by the window's units (see the class docstring);
        ``num_items_in_batch`` is the Trainer's count of the task term's units alone, so it is not read."""
        normalizers = self._window_units if model.training else None
        positions = inputs.pop(ROW_KEY, None)
        stored = self._store.batch(positions) if self._store and positions is not None else None
        loss, terms = model(inputs, normalizers=normalizers, teacher_outputs=stored)
        if model.training:
            self._train_terms.add(terms)
            # each process's loss is its share of a global sum / global units; DDP averages
            # gradients over processes, so scale by their number (as the Trainer does for
            # average_tokens_across_devices)
            loss = loss * self.accelerator.num_processes
        return (loss, {"terms": terms}) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._train_terms.steps:
            sums, _ = self._train_terms.reduced(self.accelerator)
            steps = self._train_terms.steps
            logs.update({f"distill/{name}": value / steps for name, value in sums.items()})
            self._train_terms = _TermSums()
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------------------- evaluation
    def evaluation_loop(
        self,
        dataloader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ):
        """The Trainer's loop, with every term of the evaluation set added to the metrics."""
        self._eval_terms = _TermSums()
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        means = self._eval_terms.means(self.accelerator, self.distiller)
        for name, value in means.items():
            output.metrics[f"{metric_key_prefix}_{name}"] = value
        if "total" in means:  # the Trainer's own loss is a mean of batch means
            output.metrics[f"{metric_key_prefix}_loss"] = means["total"]
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """``(loss, student logits, labels)`` of one evaluation batch (logits and labels are None
        with ``prediction_loss_only``)."""
        inputs = self._prepare_inputs(inputs)
        inputs.pop(ROW_KEY, None)  # evaluation runs the live teacher
        distiller = self.distiller
        outputs = []
        hook = distiller.student.register_forward_hook(lambda _m, _a, out: outputs.append(out))
        try:
            with torch.no_grad():
                loss, terms = model(inputs)
        finally:
            hook.remove()
        self._eval_terms.add_weighted(terms, distiller.count_units(inputs))
        if prediction_loss_only:
            return loss.detach(), None, None
        logits = outputs[0].logits if outputs else None
        # no logits when the student stopped after its deepest tap, empty ones on the fused logit path
        if logits is None or logits.shape[-1] == 0:
            with torch.no_grad():
                logits = distiller.student(**inputs).logits
        return loss.detach(), logits.detach(), inputs.get("labels")

    # ------------------------------------------------------------------------------- saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the student (``save_pretrained``) and the feature-loss parameters to ``output_dir``."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
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
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        self._load_saved(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        self._load_saved(self.state.best_model_checkpoint)

    def _load_saved(self, folder: str, model: nn.Module | None = None) -> None:
        """Restore what ``save_model`` wrote into ``folder`` into the live student and feature losses."""
        distiller = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_student_weights(distiller.student, folder)
        feature_file = os.path.join(folder, self.FEATURE_LOSSES_FILE)
        if os.path.exists(feature_file):
            distiller.feature_losses.load_state_dict(load_file(feature_file))


ROW_KEY = "flexkd_row"


def _checked_store(
    teacher_outputs: TeacherOutputStore | str | os.PathLike, distiller: Distiller, rows: Any
) -> TeacherOutputStore:
    store = (
        teacher_outputs
        if isinstance(teacher_outputs, TeacherOutputStore)
        else TeacherOutputStore(Path(teacher_outputs))
    )
    logits = distiller.weights["logit"] > 0
    store.check(
        distiller.teacher,
        rows,
        layers=distiller.teacher_layers,
        logits=logits,
        topk=store.topk if logits else None,
    )
    return store


class _RowsWithPositions(torch.utils.data.Dataset):
    """The training rows, each with its position under ``ROW_KEY`` (the stored outputs' index)."""

    def __init__(self, rows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict[str, Any]:
        row = self.rows[position]
        if not isinstance(row, Mapping):
            raise TypeError(
                f"teacher_outputs: the rows of train_dataset must be mappings, row {position} is a "
                f"{type(row).__name__}"
            )
        return {**row, ROW_KEY: position}


class _CollateWithPositions:
    """The Trainer's collator, called without ``ROW_KEY``, which it adds to the batch as a list."""

    def __init__(self, collate: Callable[[list], dict[str, Any]]) -> None:
        self.collate = collate

    def __call__(self, features: list) -> dict[str, Any]:
        if not features or not isinstance(features[0], Mapping) or ROW_KEY not in features[0]:
            return self.collate(features)  # evaluation rows
        positions = [feature[ROW_KEY] for feature in features]
        batch = self.collate([{k: v for k, v in f.items() if k != ROW_KEY} for f in features])
        batch[ROW_KEY] = positions
        return batch


class _TermSums:
    """Running sums of the distiller's terms on this process, reduced over processes on demand."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.units: dict[str, float] = {}
        self.steps = 0

    def add(self, terms: Mapping[str, Tensor]) -> None:
        for name, value in terms.items():
            value = value.detach().to(torch.float64)
            self.sums[name] = self.sums[name] + value if name in self.sums else value

    def add_weighted(self, terms: Mapping[str, Tensor], units: Mapping[str, float]) -> None:
        """Add each term times its units in the batch (``total`` is rebuilt from the terms)."""
        per_pair = units["feature"] / max(1, sum(n.startswith("feature/") for n in terms))
        weighted = {}
        for name, value in terms.items():
            if name == "total":
                continue
            count = per_pair if name.startswith("feature/") else units[name]
            weighted[name] = value * count
            self.units[name] = self.units.get(name, 0.0) + count
        self.add(weighted)

    def reduced(self, accelerator) -> tuple[dict[str, float], dict[str, float]]:
        """``(sums, units)`` over all processes (every process must call this)."""
        if not self.sums:
            return {}, {}
        names = sorted(self.sums)
        device = next(iter(self.sums.values())).device
        values = torch.stack([self.sums[n] for n in names])
        values = torch.cat(
            [
                values,
                torch.tensor(
                    [self.units.get(n, 0.0) for n in names], dtype=values.dtype, device=device
                ),
            ]
        )
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, reduction="sum")
        sums, units = values[: len(names)].tolist(), values[len(names) :].tolist()
        return dict(zip(names, sums, strict=True)), dict(zip(names, units, strict=True))

    def means(self, accelerator, distiller: Distiller) -> dict[str, float]:
        """Each term's sum over its units (0 without units) and ``total``, their weighted sum."""
        sums, units = self.reduced(accelerator)
        means = {
            name: (value / units[name] if units[name] else 0.0) for name, value in sums.items()
        }
        if means:
            means["total"] = sum(distiller.weights[name] * means.get(name, 0.0) for name in TERMS)
        return means


__all__ = ["FlexKDTrainer"]
