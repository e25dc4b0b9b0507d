"""The distillation loop, from a validated :class:`~flexkd.config.Config` to a saved student.

Runs unchanged on one CPU, one GPU, or several processes (``accelerate launch`` /
``torchrun``): ``accelerate`` places the models and wraps the distiller in DDP; the data
order is our own (``ShardedOrder``), so resuming continues exactly where a run stopped.

One optimizer step (:func:`train_step`, ``grad_accum`` micro-batches per process):
  1. count every term's units (valid tokens, sequences, ...) over the whole window and all
     processes, before any forward;
  2. for each micro-batch: ``loss = Σ_t w_t · sum_t / units_t`` and backward (DDP averages
     over processes, so the loss is scaled by the world size);
  3. sum the terms over the window and the processes; a non-finite term stops the run here,
     before the optimizer steps, so nothing from that step is logged or checkpointed;
  4. clip, step.
The result is "sum of token losses / valid tokens in the window", never a mean of means.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flexkd.checkpoint import (
    RunState,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    resume_point,
    save_checkpoint,
)
from flexkd.config import Config
from flexkd.errors import (
    NonFiniteLossError,
    ResumeMismatchError,
    RunFolderLockedError,
    SelectionMismatchError,
)
from flexkd.training.data import Collator, ShardedOrder, build_splits, move_to_device, pad_token_id
from flexkd.training.models import build_model, build_tokenizer
from flexkd.training.optim import build_optimizer, build_scheduler
from flexkd.training.run_dir import (
    RunLock,
    append_metrics,
    check_resume_config,
    save_student,
    start_metrics,
    write_run_config,
)
from flexkd.training.teacher_prep import selection_for, teacher_output_store

UNIT_TERMS = ("task", "logit", "feature")


@dataclass
class TrainResult:
    student_dir: Path
    steps: int
    metrics_path: Path
    is_main_process: bool = True


@dataclass
class StepResult:
    """One optimizer step: every term summed over the window and the processes, each term's units,
    and the gradient norm before clipping (None without clipping)."""

    terms: dict[str, float]
    units: dict[str, float]
    grad_norm: float | None


def make_accelerator(**kwargs: Any):
    """An ``Accelerator`` that also forms a process group on machines without an accelerator.

    (``accelerate`` only sets up multi-process CPU runs, e.g. under ``torchrun``, when told ``cpu=True``.)
    """
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.accelerator.is_available(), **kwargs)


def window_units(
    distiller, window: Sequence[dict[str, torch.Tensor]], accelerator
) -> dict[str, float]:
    """Each term's units summed over the accumulation window and all processes."""
    units = torch.zeros(len(UNIT_TERMS), dtype=torch.float64, device=accelerator.device)
    for batch in window:
        counted = distiller.count_units(batch)
        units += torch.tensor(
            [counted[n] for n in UNIT_TERMS], dtype=torch.float64, device=units.device
        )
    return dict(zip(UNIT_TERMS, accelerator.reduce(units, reduction="sum").tolist(), strict=True))


def train_step(
    model,
    distiller,
    window: Sequence[dict[str, torch.Tensor]],
    *,
    optimizer: torch.optim.Optimizer,
    scheduler,
    accelerator,
    step: int,
    max_grad_norm: float | None = None,
    store=None,
    window_rows: Sequence[Sequence[int]] | None = None,
) -> StepResult:
    """One optimizer step over the micro-batches of ``window`` (``model`` is the prepared ``distiller``).

    ``store`` (with the row indices of each micro-batch in ``window_rows``) replaces running the
    teacher. ``step`` is the number of this step, for the message of a non-finite term.
    """
    units = window_units(distiller, window, accelerator)
    world = accelerator.num_processes
    names, summed = None, None
    for i, batch in enumerate(window):
        stored = store.batch(window_rows[i]) if store is not None else None
        sync = contextlib.nullcontext() if i == len(window) - 1 else accelerator.no_sync(model)
        with sync:
            loss, terms = model(batch, normalizers=units, teacher_outputs=stored)
            # DDP averages gradients over processes; the loss is already a global sum / units
            accelerator.backward(loss * world)
        values = torch.stack([value.to(torch.float32) for value in terms.values()])
        names, summed = list(terms), values if summed is None else summed + values
    totals = dict(zip(names, accelerator.reduce(summed, reduction="sum").tolist(), strict=True))
    check_finite(totals, step=step, layer_pairs=distiller.layer_pairs)

    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(totals, units, grad_norm)


def check_finite(
    terms: dict[str, float], *, step: int, layer_pairs: Sequence[tuple[int, int]]
) -> None:
    """Raise :class:`NonFiniteLossError` naming the first non-finite term, the step and the layer pair."""
    bad = [name for name, value in terms.items() if not math.isfinite(value)]
    if not bad:
        return
    name = next((n for n in bad if n != "total"), bad[0])
    if name.startswith("feature/"):
        where = f"layer pair {name.removeprefix('feature/')} (student-teacher)"
    elif name == "feature":
        pairs = [f"s{s}-t{t}" for s, t in layer_pairs]
        per_pair = [n.removeprefix("feature/") for n in bad if n.startswith("feature/")]
        where = f"layer pair {', '.join(per_pair or pairs)} (student-teacher)"
    else:
        where = "the logits (no layer pair)"
    raise NonFiniteLossError(
        f"step {step}: loss term {name!r} is {terms[name]} at {where}; the run stops before this "
        f"step's update (non-finite terms: {bad}). The last checkpoint is from an earlier step."
    )


def lock_run_folder(folder: Path, accelerator) -> contextlib.AbstractContextManager:
    """The main process locks ``folder``; every process fails when it could not."""
    lock, failure = contextlib.nullcontext(), None
    if accelerator.is_main_process:
        try:
            lock = RunLock(folder).acquire()
        except RunFolderLockedError as error:
            failure = error
    failed = accelerator.reduce(
        torch.tensor([failure is not None], dtype=torch.float32, device=accelerator.device),
        reduction="sum",
    )
    if failure is not None:
        raise failure
    if float(failed) > 0:
        raise RunFolderLockedError(f"train.output_dir: {folder} is in use (see the main process)")
    return lock


def say(message: str) -> None:
    print(f"flexkd distill: {message}", file=sys.stderr, flush=True)


def find_resume_checkpoint(cfg: Config, checkpoints: Path, *, verbose: bool):
    """The checkpoint a run resumes from: the newest intact one (None when not resuming or there is
    none yet), after checking the config against the one the folder was started with.

    Damaged newer checkpoints are named as skipped; a folder whose every checkpoint is damaged, or
    whose config changed in a field that changes the result, raises :class:`ResumeMismatchError`."""
    if not cfg.train.resume:
        return None
    found, skipped = resume_point(checkpoints)
    if verbose:
        for path, reason in skipped:
            say(f"skipping checkpoint {path.name}: {reason}")
    if found is None and list_checkpoints(checkpoints):
        raise ResumeMismatchError(
            f"train.output_dir: no intact checkpoint under {checkpoints} to resume from (skipped: "
            + "; ".join(reason for _, reason in skipped)
            + "); start over with --set train.resume=false, or pick another train.output_dir"
        )
    if found is not None:
        check_resume_config(cfg.output_dir, cfg.resolved(), found)
    return found


def train(cfg: Config) -> TrainResult:
    """Distil the student of ``cfg`` (resuming from its latest checkpoint); returns where it was saved."""
    from accelerate import DistributedDataParallelKwargs

    needs_logits = cfg.distill.weights.task > 0 or cfg.distill.weights.logit > 0
    accelerator = make_accelerator(
        mixed_precision=cfg.train.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=not needs_logits)],
    )
    with lock_run_folder(cfg.output_dir, accelerator):
        return _distil(cfg, accelerator)


def _distil(cfg: Config, accelerator) -> TrainResult:
    from accelerate.utils import set_seed

    from flexkd.distill import Distiller

    tc = cfg.train
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    checkpoints = cfg.output_dir / "checkpoints"
    metrics_path = cfg.output_dir / "metrics.jsonl"
    resume_from = find_resume_checkpoint(cfg, checkpoints, verbose=main)
    if main and not tc.resume:
        shutil.rmtree(checkpoints, ignore_errors=True)
    if main and resume_from is None:
        write_run_config(cfg.output_dir, cfg.resolved())
    set_seed(tc.seed + rank)

    # Data and models.
    tokenizer = build_tokenizer(cfg)
    splits = build_splits(cfg, tokenizer)
    teacher = build_model(cfg, "teacher", num_labels=splits.num_labels).to(accelerator.device)
    student = build_model(cfg, "student", num_labels=splits.num_labels)
    collate = Collator(cfg.data.task, pad_token_id(tokenizer, teacher))
    train_rows = splits.get("train")

    # The distiller: the selection (scored first when its file is missing) and the teacher's
    # stored outputs (written first when asked for and missing).
    try:
        selection = selection_for(
            cfg, teacher, student, splits, collate, rank=rank, world_size=world
        )
    except SelectionMismatchError as error:
        raise SelectionMismatchError(
            f"{error}\n  to score this teacher again, delete {cfg.selection_path} "
            "(or set selection.path to another file)"
        ) from None
    distiller = Distiller.from_config(cfg, teacher, student, selection=selection)
    store = (
        teacher_output_store(cfg, distiller, train_rows, collate, accelerator)
        if cfg.distill.teacher_outputs
        else None
    )

    # Optimizer, schedule, and where to start.
    order = ShardedOrder(len(train_rows), tc.batch_size, seed=tc.seed, rank=rank, world_size=world)
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * order.per_epoch / tc.grad_accum))
    optimizer = build_optimizer(distiller.trainable_parameters(), tc)
    scheduler = build_scheduler(optimizer, tc, total_steps)
    model, optimizer = accelerator.prepare(distiller, optimizer)
    state = RunState(step=0, epoch=0, position=0, seed=tc.seed, world_size=world)
    if resume_from is not None:
        state = load_checkpoint(
            resume_from,
            student=distiller.student,
            feature_losses=distiller.feature_losses,
            optimizer=optimizer,
            scheduler=scheduler,
            rank=rank,
            world_size=world,
        )
        if main:
            say(f"resuming from step {state.step} of {total_steps} ({resume_from})")
    if main:
        start_metrics(metrics_path, resume_step=state.step if resume_from is not None else None)
    accelerator.wait_for_everyone()

    # The loop.
    batches = order.batches(state.epoch, state.position)
    bar = tqdm(
        total=total_steps,
        initial=state.step,
        desc="flexkd distill",
        unit="step",
        disable=not (main and tc.progress),
    )
    started = time.perf_counter()
    model.train()
    while state.step < total_steps:
        window, window_rows = [], []
        for _ in range(tc.grad_accum):
            state.epoch, state.position, rows = next(batches)
            window.append(
                move_to_device(collate([train_rows[i] for i in rows]), accelerator.device)
            )
            window_rows.append(rows)
        result = train_step(
            model,
            distiller,
            window,
            optimizer=optimizer,
            scheduler=scheduler,
            accelerator=accelerator,
            step=state.step + 1,
            max_grad_norm=tc.max_grad_norm,
            store=store,
            window_rows=window_rows,
        )
        state.step += 1

        if main and (state.step % tc.log_every == 0 or state.step == total_steps):
            append_metrics(
                metrics_path,
                {
                    "step": state.step,
                    "epoch": state.epoch,
                    "lr": scheduler.get_last_lr()[0],
                    **result.terms,
                    "grad_norm": result.grad_norm,
                    **{f"units_{name}": value for name, value in result.units.items()},
                    "elapsed_s": round(time.perf_counter() - started, 3),
                },
            )
        bar.set_postfix(loss=f"{result.terms['total']:.4f}")
        bar.update(1)
        if tc.checkpoint_every and state.step % tc.checkpoint_every == 0:
            save_checkpoint(
                checkpoints,
                state=state,
                student=distiller.student,
                feature_losses=distiller.feature_losses,
                optimizer=optimizer,
                scheduler=scheduler,
                rank=rank,
                barrier=accelerator.wait_for_everyone,
            )
            if main:
                prune_checkpoints(checkpoints, tc.keep_checkpoints)
    bar.close()

    student_dir = cfg.output_dir / "student"
    if main:
        lora = cfg.model.student_lora
        save_student(
            distiller.student, tokenizer, student_dir, merged=lora is not None and lora.save_merged
        )
    accelerator.wait_for_everyone()
    return TrainResult(
        student_dir=student_dir, steps=state.step, metrics_path=metrics_path, is_main_process=main
    )
