"""``flexkd eval cfg.yaml``: task metrics of the distilled student (and/or the teacher) on a split.

Metrics: ``loss`` (mean cross-entropy over valid targets) and ``accuracy`` for every task,
``macro_f1`` for sequence and token classification, ``perplexity`` for causal LMs. Prints a
table and writes ``eval.output`` (default ``<output_dir>/eval.json``) atomically.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from flexkd._io import write_text
from flexkd.config import add_config_arguments, config_from_args
from flexkd.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used, so that `flexkd eval --help` is instant
    import torch
    from torch import nn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def _macro_f1(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    scores = []
    for c in range(num_classes):
        tp = int(((predictions == c) & (labels == c)).sum())
        fp = int(((predictions == c) & (labels != c)).sum())
        fn = int(((predictions != c) & (labels == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def evaluate(
    model: nn.Module,
    rows: Sequence[Mapping[str, Any]],
    collate: Callable[[Sequence[Mapping[str, Any]]], dict[str, torch.Tensor]],
    *,
    task: str,
    batch_size: int,
    progress: bool = True,
    ignore_index: int = -100,
) -> dict[str, float]:
    """Loss and accuracy-style metrics of ``model`` on labelled ``rows``."""
    import torch

    with torch.no_grad():
        return _evaluate(model, rows, collate, task, batch_size, progress, ignore_index)


def _evaluate(model, rows, collate, task, batch_size, progress, ignore_index) -> dict[str, float]:
    import torch
    from tqdm.auto import tqdm

    from flexkd.losses import task_loss
    from flexkd.training.data import move_to_device

    if len(rows) == 0:
        raise ConfigError("eval.split: the evaluation split is empty")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, valid, correct = 0.0, 0, 0
    all_predictions, all_labels = [], []
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc="flexkd eval", unit="batch", disable=not progress):
        batch = move_to_device(
            collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))]), device
        )
        labels = batch.pop("labels", None)
        if labels is None:
            raise ConfigError("eval.split: evaluation needs labelled rows")
        if task == "seq2seq":
            batch["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = model(**batch).logits
        if task == "causal_lm":
            logits, labels = logits[:, :-1], labels[:, 1:]
        loss_sum += float(task_loss(logits, labels, ignore_index=ignore_index, reduction="sum"))
        mask = labels != ignore_index
        predictions = logits.argmax(-1)
        valid += int(mask.sum())
        correct += int(((predictions == labels) & mask).sum())
        all_predictions.append(predictions[mask].cpu())
        all_labels.append(labels[mask].cpu())
    model.train(was_training)
    if valid == 0:
        raise ConfigError("eval.split: no valid (non-ignored) label in the evaluation split")
    metrics = {"loss": loss_sum / valid, "accuracy": correct / valid, "targets": valid}
    if task == "causal_lm":
        metrics["perplexity"] = math.exp(min(metrics["loss"], 700.0))
    if task in ("sequence", "token"):
        num_classes = logits.shape[-1]
        metrics["macro_f1"] = _macro_f1(
            torch.cat(all_predictions), torch.cat(all_labels), num_classes
        )
    return metrics


def run(args: argparse.Namespace) -> int:
    import torch

    from flexkd.training import (
        Collator,
        build_model,
        build_splits,
        build_tokenizer,
        pad_token_id,
    )
    from flexkd.training.models import load_trained_student

    cfg = config_from_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = build_tokenizer(cfg)
    splits = build_splits(cfg, tokenizer)
    rows = splits.get(cfg.eval.split)
    results = {}
    for which in cfg.eval.models:
        if which == "student":
            if not cfg.student_path.is_dir():
                raise ConfigError(
                    f"eval.student_path: no student at {cfg.student_path}; run flexkd distill first"
                )
            model = load_trained_student(cfg, cfg.student_path, num_labels=splits.num_labels)
        else:
            model = build_model(cfg, "teacher", num_labels=splits.num_labels)
        model.to(device)
        collate = Collator(cfg.data.task, pad_token_id(tokenizer, model))
        results[which] = evaluate(
            model,
            rows,
            collate,
            task=cfg.data.task,
            batch_size=cfg.eval.batch_size,
            progress=cfg.train.progress,
        )
    report = {"split": cfg.eval.split, "rows": len(rows), "models": results}
    target = cfg.eval_output
    write_text(target, json.dumps(report, indent=2) + "\n")
    names = sorted({k for m in results.values() for k in m})
    print(f"{'model':<10}" + "".join(f"{n:>12}" for n in names))
    for which, metrics in results.items():
        print(f"{which:<10}" + "".join(f"{metrics.get(n, float('nan')):>12.4f}" for n in names))
    print(f"wrote {target}")
    return 0
