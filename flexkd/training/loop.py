"""The distillation loop, from a validated :class:`~flexkd.config.Config` to a saved student.

Runs unchanged on one CPU, one GPU, or several processes (``accelerate launch`` /
``torchrun``): ``accelerate`` places the models and wraps the distiller in DDP; the data
order is our own (``ShardedOrder``), so resuming continues exactly where a run stopped.

One optimizer step (:func:`train_step`, ``grad_accum`` micro-batches per process):
  1. count every term's units (valid tokens, sequences, ...) over the whole window and all
     processes, on the host copies of the batches, before any forward;
  2. for each micro-batch: move it to the device, ``loss = Σ_t w_t · sum_t / units_t`` and backward
     (DDP averages over processes, so the loss is scaled by the world size);
  3. sum the terms over the window on the device;
  4. clip, step.
The result is "sum of token losses / valid tokens in the window", never a mean of means.

Between reports the loop never waits for the device: the terms stay there, and only a step that logs
(every ``train.log_every`` steps), checkpoints, or ends the run reduces them over the processes and
reads them back. Such a step first checks the unreported steps, then its own terms before its update,
so a non-finite term stops the run before anything from it is logged or checkpointed. An unreported
step whose terms are not all finite makes no update, and neither does any step after it until that
check: a flag computed on the device (``isfinite`` of the terms, all-reduced over the processes) is the
optimizer's ``found_inf``, with which torch's fused AdamW leaves the parameters, its moments and its
step count as they were (the mechanism ``GradScaler`` uses; no read-back). The check then names the
step it happened in, and the weights are those of the step before it. ``tests/test_host_syncs.py``
counts the read-backs of a step (its docstring gives the method): none in flexkd's code.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flexkd.checkpoint import (
    RunState,
    gather_full_state_dict,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    resume_point,
    save_checkpoint,
)
from flexkd.config import Config
from flexkd.distributed import (
    check_sharding,
    is_sharded,
    no_gradient_sync,
    shard_from_config,
    shard_trainable,
    sharding_mesh,
    take_accelerate_fsdp,
    warn_if_fewer_processes,
)
from flexkd.errors import (
    NonFiniteLossError,
    ResumeMismatchError,
    RunFolderLockedError,
    SelectionMismatchError,
)
from flexkd.training.data import (
    Collator,
    ShardedOrder,
    build_splits,
    move_to_device,
    pad_token_id,
    row_lengths,
)
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
    """One optimizer step. Reported (``train_step(report=True)``): every term summed over the window and
    the processes and each term's units, as floats, and the gradient norm before clipping (None without
    clipping). Not reported: the same, unreduced (this process's window), as 0-d tensors on the device."""

    terms: dict[str, float] | dict[str, torch.Tensor]
    units: dict[str, float] | dict[str, torch.Tensor]
    grad_norm: float | torch.Tensor | None
    reported: bool = True
    # not reported: whether the terms were not all finite on some process (a 0-d bool on the device), and
    # whether the update was then skipped (the optimizer takes ``found_inf``)
    nonfinite: torch.Tensor | None = None
    guarded: bool = False


def make_accelerator(*, cpu: bool | None = None, **kwargs: Any):
    """An ``Accelerator`` that also forms a process group on machines without an accelerator
    (``cpu=None``: the CPU only when there is no accelerator).

    (``accelerate`` only sets up multi-process CPU runs, e.g. under ``torchrun``, when told ``cpu=True``.)
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.accelerator.is_available() if cpu is None else cpu, **kwargs)
    warn_if_fewer_processes(accelerator.num_processes)
    return accelerator


def window_units(
    distiller, window: Sequence[dict[str, torch.Tensor]], accelerator
) -> dict[str, float] | dict[str, torch.Tensor]:
    """Each term's units summed over the accumulation window and all processes.

    Counted on ``window`` as given: pass the host copies (before the move to the device) and nothing
    waits for the device. One process: floats. Several: 0-d tensors on the device, all-reduced there
    and not read back (the normalisers of the step)."""
    counted = [distiller.count_units(batch) for batch in window]
    units = {name: float(sum(c[name] for c in counted)) for name in UNIT_TERMS}
    if accelerator.num_processes == 1:
        return units
    local = torch.tensor([units[n] for n in UNIT_TERMS], dtype=torch.float64)
    summed = accelerator.reduce(local.to(accelerator.device), reduction="sum")
    return dict(zip(UNIT_TERMS, summed.to(torch.float32).unbind(), strict=True))


def _as_floats(values: dict[str, float] | dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()}


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
    units: dict[str, float] | dict[str, torch.Tensor] | None = None,
    report: bool = True,
    hold: torch.Tensor | None = None,
) -> StepResult:
    """One optimizer step over the micro-batches of ``window`` (``model`` is the prepared ``distiller``).

    ``window`` holds the micro-batches on the host or the device; each is moved to the device just
    before its forward. ``units`` (:func:`window_units` of the host copies) defaults to counting
    ``window``. ``store`` (with the row indices of each micro-batch in ``window_rows``) replaces running
    the teacher. ``step`` is the number of this step, for the message of a non-finite term.

    With ``report=False`` the step never waits for the device (no all-reduce of the terms, no value read
    back): the terms stay on the device, and when one is not finite on any process, or ``hold`` (a 0-d
    bool on the device: an earlier unreported step was not finite) is true, the update is skipped on the
    device, for an optimizer that takes GradScaler's ``found_inf`` (torch's fused Adam/AdamW, which
    ``build_optimizer`` makes); another optimizer applies it (``StepResult.guarded`` says which).
    ``report=True`` reduces the terms over the processes and raises :class:`NonFiniteLossError` before
    the update when one is not finite.
    """
    if units is None:
        units = window_units(distiller, window, accelerator)
    world = accelerator.num_processes
    sharded_student = is_sharded(distiller.student)
    names, summed = None, None
    for i, batch in enumerate(window):
        batch = move_to_device(batch, accelerator.device)
        stored = store.batch(window_rows[i]) if store is not None else None
        last = i == len(window) - 1
        if sharded_student:  # not prepared by accelerate: no DDP wrapper to autocast or skip syncs
            sync = contextlib.nullcontext() if last else no_gradient_sync(distiller.student)
            cast = accelerator.autocast()
        else:
            sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
            cast = contextlib.nullcontext()
        with sync, cast:
            loss, terms = model(batch, normalizers=units, teacher_outputs=stored)
            # DDP and FSDP average gradients over processes; the loss is already a global sum / units
            accelerator.backward(loss * world)
        values = torch.stack([value.to(torch.float32) for value in terms.values()])
        names, summed = list(terms), values if summed is None else summed + values
    nonfinite = None
    if report:
        totals = dict(zip(names, accelerator.reduce(summed, reduction="sum").tolist(), strict=True))
        check_finite(totals, step=step, layer_pairs=distiller.layer_pairs)
    else:
        nonfinite = ~torch.isfinite(summed).all()
        if world > 1:  # every process skips or none does
            nonfinite = accelerator.reduce(nonfinite.to(torch.float32), reduction="sum") > 0

    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    skip = None if nonfinite is None else nonfinite if hold is None else nonfinite | hold
    guarded = step_unless(optimizer, skip)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if not report:
        terms = dict(zip(names, summed.unbind(), strict=True))
        return StepResult(terms, units, grad_norm, False, nonfinite=nonfinite, guarded=guarded)
    return StepResult(
        totals, _as_floats(units), None if grad_norm is None else float(grad_norm), True
    )


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor | None) -> bool:
    """``optimizer.step()``, skipped on the device where the 0-d bool ``skip`` is true, for an optimizer
    that takes GradScaler's ``found_inf`` (parameters, state and step count left as they were); True if
    it does (or ``skip`` is None), False if it applied the step regardless."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    if skip is None or not getattr(inner, "_step_supports_amp_scaling", False):
        optimizer.step()
        return skip is None
    if "found_inf" in inner.__dict__:  # a GradScaler's step (fp16) decides on its own
        optimizer.step()
        return True
    inner.found_inf = skip.to(torch.float32)
    try:
        optimizer.step()
    finally:
        inner.__dict__.pop("found_inf", None)
    return True


class UncheckedTerms:
    """What a report step must know of the steps that did not report: on the device, the first step
    whose terms were not all finite on some process (0: none) and its terms, so that the report names
    that step and its values, and, as ``hold()``, a flag that keeps the steps after it from updating."""

    def __init__(self) -> None:
        self.names: list[str] | None = None
        self.bad_step: torch.Tensor | None = None
        self.bad_terms: torch.Tensor | None = None
        self.guarded = True

    def add(self, result: StepResult, step: int) -> None:
        values = torch.stack(list(result.terms.values()))
        if self.bad_step is None:
            self.names = list(result.terms)
            self.bad_step = torch.zeros((), dtype=torch.float32, device=values.device)
            self.bad_terms = torch.zeros_like(values)
        first = result.nonfinite & (self.bad_step == 0)
        self.bad_step = torch.where(first, float(step), self.bad_step)
        self.bad_terms = torch.where(first, values, self.bad_terms)
        self.guarded = self.guarded and result.guarded

    def hold(self) -> torch.Tensor | None:
        """True on the device once an unchecked step was not finite (None: no step unchecked)."""
        return None if self.bad_step is None else self.bad_step > 0

    def check(self, accelerator, *, step: int, layer_pairs: Sequence[tuple[int, int]]) -> None:
        """Raise :class:`NonFiniteLossError` when an unchecked step was not finite, naming it; reset."""
        if self.bad_step is None:
            return
        world = accelerator.num_processes
        # one read-back: the bad step (the same on every process) and its terms summed over them
        summed = accelerator.reduce(torch.cat([self.bad_step[None], self.bad_terms]), reduction="sum")
        bad_step, *values = summed.tolist()
        bad_step, guarded, names = round(bad_step / world), self.guarded, self.names
        self.__init__()  # the next report checks the steps from here on
        if bad_step == 0:
            return
        steps = f"step {bad_step}" if bad_step == step - 1 else f"steps {bad_step} to {step - 1}"
        held = (
            f"; {steps} made no update (the weights are step {bad_step - 1}'s)"
            if guarded
            else f"; {steps} updated the weights (the optimizer takes no found_inf)"
        )
        terms = dict(zip(names, values, strict=True))  # NaN/inf on one process stays so in the sum
        check_finite(terms, step=step, layer_pairs=layer_pairs, when=f"step {bad_step}", held=held)


def run_steps(
    model,
    objective,
    windows: Iterator[tuple[list[dict[str, torch.Tensor]], list[list[int]] | None]],
    *,
    optimizer: torch.optim.Optimizer,
    scheduler,
    accelerator,
    start: int,
    total: int,
    max_grad_norm: float | None,
    log_every: int,
    checkpoint_every: int | None = None,
    store=None,
) -> Iterator[tuple[int, StepResult]]:
    """The training loop: steps ``start + 1 .. total``, each a :func:`train_step` on the next
    ``(window, window_rows)`` of ``windows`` (host batches), yielding ``(step, result)``.

    ``objective`` is the :class:`~flexkd.distill.Distiller` (or anything with its ``count_units``,
    ``layer_pairs`` and call), ``model`` its prepared form. Only steps that log (every ``log_every``),
    checkpoint (every ``checkpoint_every``) or end the run report, i.e. wait for the device; each first
    checks the unreported steps' terms (:class:`UncheckedTerms`)."""
    unchecked = UncheckedTerms()
    for step in range(start + 1, total + 1):
        window, window_rows = next(windows)
        report = (
            step % log_every == 0
            or step == total
            or bool(checkpoint_every and step % checkpoint_every == 0)
        )
        if report:  # what is logged or checkpointed was checked finite first
            unchecked.check(accelerator, step=step, layer_pairs=objective.layer_pairs)
        hold = None if report else unchecked.hold()
        result = train_step(
            model,
            objective,
            window,
            optimizer=optimizer,
            scheduler=scheduler,
            accelerator=accelerator,
            step=step,
            max_grad_norm=max_grad_norm,
            store=store,
            window_rows=window_rows,
            units=window_units(objective, window, accelerator),
            report=report,
            hold=hold,
        )
        if not report:
            unchecked.add(result, step)
        yield step, result


def check_finite(
    terms: dict[str, float],
    *,
    step: int,
    layer_pairs: Sequence[tuple[int, int]],
    when: str | None = None,
    held: str = "",
) -> None:
    """Raise :class:`NonFiniteLossError` naming the first non-finite term, the step (or ``when``, the
    step it happened in, and ``held``, what became of the steps since) and the layer pair."""
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
        f"{when or f'step {step}'}: loss term {name!r} is {terms[name]} at {where}; the run stops "
        f"before step {step}'s update{held} (non-finite terms: {bad}). The last checkpoint is from "
        "an earlier step."
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
    """Distil the student of ``cfg`` (resuming from its latest checkpoint); returns where it was saved.

    Under ``accelerate launch --use_fsdp --fsdp_version 2`` the teacher and student are sharded as
    ``distributed.fsdp`` does it (:func:`flexkd.distributed.take_accelerate_fsdp`)."""
    from accelerate import DistributedDataParallelKwargs

    cfg = take_accelerate_fsdp(cfg)

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
    check_sharding(cfg, world)
    fsdp = cfg.distributed.fsdp
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
    shard_from_config(cfg, teacher, "teacher")
    shard_from_config(cfg, student.to(accelerator.device) if fsdp.student else student, "student")
    collate = Collator(
        cfg.data.task, pad_token_id(tokenizer, teacher), teacher_pad_token_id=pad_token_id(None, teacher)
    )
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
    order = ShardedOrder(
        len(train_rows),
        tc.batch_size,
        seed=tc.seed,
        rank=rank,
        world_size=world,
        lengths=row_lengths(train_rows) if cfg.data.group_by_length else None,
    )
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * order.per_epoch / tc.grad_accum))
    if fsdp.student:  # before the optimizer takes the projectors' (then sharded) parameters
        shard_trainable(
            distiller.feature_losses.to(accelerator.device),
            reshard_after_forward=fsdp.reshard_after_forward,
            mesh=sharding_mesh(cfg, accelerator.device.type),
        )
    optimizer = build_optimizer(distiller.trainable_parameters(), tc)
    scheduler = build_scheduler(optimizer, tc, total_steps)
    if fsdp.student:  # no DDP: the student's gradients are reduce-scattered by FSDP
        model = distiller
    else:
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

    def windows():
        while True:
            window, window_rows = [], []
            for _ in range(tc.grad_accum):
                state.epoch, state.position, rows = next(batches)
                window.append(collate([train_rows[i] for i in rows]))  # host copies
                window_rows.append(rows)
            yield window, window_rows

    bar = tqdm(
        total=total_steps,
        initial=state.step,
        desc="flexkd distill",
        unit="step",
        disable=not (main and tc.progress),
    )
    started = time.perf_counter()
    model.train()
    for step, result in run_steps(
        model,
        distiller,
        windows(),
        optimizer=optimizer,
        scheduler=scheduler,
        accelerator=accelerator,
        start=state.step,
        total=total_steps,
        max_grad_norm=tc.max_grad_norm,
        log_every=tc.log_every,
        checkpoint_every=tc.checkpoint_every,
        store=store,
    ):
        state.step = step
        if main and result.reported and (step % tc.log_every == 0 or step == total_steps):
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
        if result.reported:
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
    full = gather_full_state_dict(distiller.student) if fsdp.student else None
    if main:
        lora = cfg.model.student_lora
        save_student(
            distiller.student,
            tokenizer,
            student_dir,
            state_dict=full,
            merged=lora is not None and lora.save_merged,
        )
    accelerator.wait_for_everyone()
    return TrainResult(
        student_dir=student_dir, steps=state.step, metrics_path=metrics_path, is_main_process=main
    )
