"""``FlexKDTrainer``: a Hugging Face ``Trainer`` whose loss is a :class:`~flexkd.distill.Distiller`'s.

Imports ``transformers.Trainer`` (seconds); ``import flexkd`` loads this module only when
``flexkd.FlexKDTrainer`` is first used.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer

from flexkd.distill import Distiller


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
            raise TypeError(f"distiller must be a flexkd Distiller, got {type(distiller).__name__}")
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
                self._term_sums[name] = self._term_sums.get(name, 0.0) + float(value)
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


__all__ = ["FlexKDTrainer"]
