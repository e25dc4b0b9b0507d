"""What a run needs from the teacher before the first step: the dimension selection (loaded, or scored
on the configured split and saved) and, with ``distill.teacher_outputs``, the store of its outputs."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from torch import nn

from flexkd.config import Config
from flexkd.distributed import is_sharded
from flexkd.errors import ConfigError, StoreMismatchError
from flexkd.training.data import Splits


def default_selection_layers(cfg: Config) -> list[int]:
    pairs = cfg.distill.layer_pairs
    return [-1] if pairs == "last" else sorted({t for _, t in pairs})


def selection_k(cfg: Config, teacher: nn.Module, student: nn.Module) -> int:
    """The k to score with (the paired student layers' width), after checking the layer pairing,
    ``selection.layers`` and ``selection.k`` against both models, so that a config that cannot
    work fails before the scoring pass rather than after it."""
    from flexkd.adapters import get_adapter

    t_adapter = get_adapter(teacher, side=cfg.distill.side)
    s_adapter = get_adapter(student, side=cfg.distill.side)
    pairs = [(-1, -1)] if cfg.distill.layer_pairs == "last" else cfg.distill.layer_pairs
    teacher_layers, student_widths = set(), set()
    for i, (s_layer, t_layer) in enumerate(pairs):
        try:
            student_widths.add(s_adapter.layer_width(s_layer))
            teacher_layers.add(t_adapter.resolve_layer(t_layer))
        except (ValueError, TypeError) as error:
            raise ConfigError(f"distill.layer_pairs[{i}]: {error}") from None
    scored = set()
    for layer in cfg.selection.layers or default_selection_layers(cfg):
        try:
            scored.add(t_adapter.resolve_layer(layer))
        except (ValueError, TypeError) as error:
            raise ConfigError(f"selection.layers: {error}") from None
    k = cfg.selection.k or min(student_widths)
    teacher_width = min(t_adapter.layer_width(layer) for layer in scored)
    if k > teacher_width:
        raise ConfigError(
            f"selection.k: {k} is larger than the teacher's hidden size {teacher_width}"
        )
    if cfg.distill.feature == "flex":
        if teacher_layers - scored:
            raise ConfigError(
                f"selection.layers: teacher layers {sorted(teacher_layers - scored)} of "
                "distill.layer_pairs would not be scored"
            )
        if student_widths != {k}:
            raise ConfigError(
                f"selection.k: feature 'flex' needs k equal to the paired student layers' width "
                f"{sorted(student_widths)}, got {k}"
            )
    return k


class _SizedBatches:
    """The batches of ``rows[i] for i in indices``, collated on the fly, with a length."""

    def __init__(self, collate, rows, indices, size: int) -> None:
        self.collate, self.rows, self.indices, self.size = collate, rows, indices, size

    def __len__(self) -> int:
        return -(-len(self.indices) // self.size)

    def __iter__(self):
        for j in range(0, len(self.indices), self.size):
            yield self.collate([self.rows[i] for i in self.indices[j : j + self.size]])


def score_selection(
    cfg: Config, teacher: nn.Module, k: int, rows, collate, *, rank: int = 0, world_size: int = 1
):
    """Score ``teacher`` on ``selection.max_rows`` rows of ``rows`` (all when unset), drawn in a seeded
    order and dealt out row by row over the processes: the same rows for any world size. Scores are
    summed over processes."""
    import flexkd
    from flexkd.scoring import rows_for_rank
    from flexkd.selection import DimensionSelection

    mine = rows_for_rank(
        len(rows),
        rank=rank,
        world_size=world_size,
        max_rows=cfg.selection.row_budget,
        seed=cfg.train.seed,
    )
    size = cfg.selection.batch_size
    batches = _SizedBatches(collate, rows, mine, size)  # sized, so the progress bar has a total and an ETA
    selection = flexkd.score(
        teacher,
        batches,
        layers=cfg.selection.layers or default_selection_layers(cfg),
        k=k,
        stat=cfg.selection.stat,
        side=cfg.distill.side,
        task=cfg.data.task,
        order=cfg.selection.order,
        progress=cfg.train.progress and rank == 0,
    )
    if cfg.selection.which == "top":
        return selection
    return DimensionSelection.from_scores(
        {layer: selection.scores(layer) for layer in selection.layers},
        k,
        which=cfg.selection.which,
        order=cfg.selection.order,
        seed=cfg.train.seed,
        stat=selection.stat,
        tokens_seen=selection.tokens_seen,
        teacher=selection.teacher,
        data_fingerprint=selection.data_fingerprint,
    )


def selection_for(
    cfg: Config, teacher, student, splits: Splits, collate, *, rank: int, world_size: int
):
    """The run's DimensionSelection for feature 'flex' (loaded, or scored and saved), else None."""
    from flexkd.selection import DimensionSelection

    if cfg.distill.feature != "flex" or cfg.distill.weights.feature == 0:
        return None
    path = cfg.selection_path
    if path.exists():
        return DimensionSelection.load(path, teacher)
    k = selection_k(cfg, teacher, student)
    rows = splits.get(cfg.selection.split)
    selection = score_selection(cfg, teacher, k, rows, collate, rank=rank, world_size=world_size)
    if rank == 0:
        selection.save(path)
    return selection


def teacher_output_store(cfg: Config, distiller, train_rows, collate, accelerator):
    """The store of ``distill.teacher_outputs`` (the main process writes it when missing), checked against
    this run's teacher, rows, layers and logit KD."""
    from flexkd.teacher_outputs import TeacherOutputStore, write_teacher_outputs

    path = cfg.path(cfg.distill.teacher_outputs)
    layers = distiller.teacher_layers
    logits = distiller.weights["logit"] > 0
    topk = cfg.distill.teacher_topk if logits else None
    # A sharded teacher's forward is a collective: the other ranks run it too, into a scratch folder.
    main = accelerator.is_main_process
    scratch = None
    if not (path / "meta.json").is_file() and (main or is_sharded(distiller.teacher)):
        scratch = None if main else Path(tempfile.mkdtemp()) / "outputs"
        written = write_teacher_outputs(
            distiller.teacher,
            train_rows,
            scratch or path,
            layers=layers,
            collate=collate,
            logits=logits,
            topk=topk,
            temperature=cfg.distill.temperature,
            batch_size=cfg.train.batch_size,
            side=cfg.distill.side,
            progress=cfg.train.progress,
        )
        if written.tail_mass is not None and main:
            tail = written.tail_mass
            print(
                f"flexkd distill: stored the teacher's top-{topk} logits; the softmax mass they drop at "
                f"T={tail['temperature']:g} is {tail['mean']:.4f} on average, {tail['max']:.4f} at most",
                file=sys.stderr,
                flush=True,
            )
    if scratch is not None:
        shutil.rmtree(scratch.parent, ignore_errors=True)
    accelerator.wait_for_everyone()
    store = TeacherOutputStore(path)
    try:
        store.check(distiller.teacher, train_rows, layers=layers, logits=logits, topk=topk)
    except ValueError as err:
        raise StoreMismatchError(f"distill.{err}") from None
    return store
