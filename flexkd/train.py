"""The distillation training loop, from a validated :class:`~flexkd.config.Config` to a saved student.

Runs unchanged on one CPU, one GPU, or several processes (``accelerate launch`` /
``torchrun``): ``accelerate`` places the models and wraps the distiller in DDP; the data
order is our own (``ShardedOrder``), so resuming continues exactly where a run stopped.

One optimizer step (``grad_accum`` micro-batches per process):
  1. count every term's units (valid tokens, sequences, ...) over the whole window and all
     processes, before any forward;
  2. for each micro-batch: ``loss = Σ_t w_t · sum_t / units_t`` and backward (DDP averages
     over processes, so the loss is scaled by the world size);
  3. clip, step, log every term to ``metrics.jsonl``, checkpoint every N steps.
The result is "sum of token losses / valid tokens in the window", never a mean of means.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from flexkd._io import replace_dir, write_text
from flexkd.checkpoint import (
    RunState,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from flexkd.config import Config, ModelFromConfig

IGNORE_INDEX = -100
_AUTO_CLASS_NAMES = {
    "causal_lm": "AutoModelForCausalLM",
    "sequence": "AutoModelForSequenceClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "token": "AutoModelForTokenClassification",
}
_DATA_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_COMPRESSIONS = ("", ".gz", ".bz2", ".xz", ".zst")

# --------------------------------------------------------------------------------------------------
# Named factories: "task:NAME" in a config refers to one of these (or to "task:module:function").

MODEL_FACTORIES: dict[str, Callable[[str, Config], nn.Module]] = {}
DATA_FACTORIES: dict[str, Callable[[Config, Any], Mapping[str, Sequence[Mapping[str, Any]]]]] = {}


def register_model_factory(name: str):
    """Decorator: ``factory(role, config) -> model`` for ``model.teacher/student: "task:<name>"``."""

    def register(factory):
        MODEL_FACTORIES[name] = factory
        return factory

    return register


def register_data_factory(name: str):
    """Decorator: ``factory(config, tokenizer) -> {split: rows}`` for ``data.factory: "task:<name>"``.

    Rows are tokenized dicts: ``input_ids`` (list of ints), optional ``attention_mask``,
    ``token_type_ids`` and ``labels`` (an int for sequence tasks, a list otherwise).
    """

    def register(factory):
        DATA_FACTORIES[name] = factory
        return factory

    return register


def _resolve_factory(spec: str, registry: Mapping[str, Callable], field: str) -> Callable:
    name = spec.removeprefix("task:")
    if name in registry:
        return registry[name]
    module_name, sep, attr = name.partition(":")
    if sep:
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"{field}: cannot import factory {name!r} ({error})") from None
    raise ValueError(
        f"{field}: no factory named {name!r}; registered: {sorted(registry)} "
        "(or use 'task:package.module:function')"
    )


# --------------------------------------------------------------------------------------------------
# Building models, tokenizer and data from a config.


def auto_class(task: str):
    import transformers

    return getattr(transformers, _AUTO_CLASS_NAMES[task])


def build_model(cfg: Config, role: str, *, num_labels: int | None = None) -> nn.Module:
    """The ``role`` ("teacher" or "student") model of ``cfg``; random inits are seeded by ``train.seed``.

    ``num_labels`` (counted from the data) sizes the head of classification models that do not
    fix it themselves. The teacher is cast to ``model.teacher_dtype`` when that is set.
    """
    model = _build_model(cfg, role, num_labels)
    if role == "teacher" and cfg.model.teacher_dtype is not None:
        model = model.to(getattr(torch, cfg.model.teacher_dtype))
    return model


def _build_model(cfg: Config, role: str, num_labels: int | None) -> nn.Module:
    spec = getattr(cfg.model, role)
    field = f"model.{role}"
    head_size = (
        {"num_labels": num_labels} if cfg.data.task in ("sequence", "token") and num_labels else {}
    )
    if isinstance(spec, ModelFromConfig):
        from transformers import AutoConfig

        options = {**head_size, **spec.config}
        model_config = AutoConfig.for_model(options.pop("model_type"), **options)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed + (0 if role == "teacher" else 1))
            return auto_class(cfg.data.task).from_config(model_config)
    if spec.startswith("task:"):
        return _resolve_factory(spec, MODEL_FACTORIES, field)(role, cfg)
    local = cfg.path(spec)
    source = str(local) if local.exists() else spec
    try:
        return auto_class(cfg.data.task).from_pretrained(source, **head_size)
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"{field}: cannot load {spec!r} as a {cfg.data.task} model ({error})"
        ) from None


def build_tokenizer(cfg: Config):
    """The tokenizer of ``model.tokenizer``, else of the teacher when it is a path; None if neither."""
    source = cfg.model.tokenizer
    if (
        source is None
        and isinstance(cfg.model.teacher, str)
        and not cfg.model.teacher.startswith("task:")
    ):
        source = cfg.model.teacher
    if source is None:
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    local = cfg.path(source)
    if local.is_file():  # a bare `tokenizers` JSON file
        return PreTrainedTokenizerFast(tokenizer_file=str(local))
    return AutoTokenizer.from_pretrained(str(local) if local.exists() else source)


@dataclass
class Splits:
    """Tokenized rows per split, and the number of classes for classification tasks."""

    rows: dict[str, Sequence[Mapping[str, Any]]]
    num_labels: int | None = None

    def get(self, split: str) -> Sequence[Mapping[str, Any]]:
        if split not in self.rows:
            raise ValueError(
                f"data.{split}: this config has no {split!r} split (it has {sorted(self.rows)})"
            )
        return self.rows[split]


def build_splits(cfg: Config, tokenizer) -> Splits:
    if cfg.data.factory is not None:
        rows = dict(
            _resolve_factory(cfg.data.factory, DATA_FACTORIES, "data.factory")(cfg, tokenizer)
        )
        return Splits(rows, _count_labels(cfg, rows.get("train", ())))
    raw = {
        split: _load_table(cfg, split)
        for split in ("train", "validation", "test")
        if getattr(cfg.data, split) is not None
    }
    label_names = _label_names(cfg, raw["train"])
    rows = {
        split: _tokenize(cfg, table, tokenizer, label_names, split) for split, table in raw.items()
    }
    num_labels = len(label_names) if label_names is not None else _count_labels(cfg, rows["train"])
    return Splits(rows, num_labels)


def _load_table(cfg: Config, split: str):
    import datasets

    path = cfg.path(getattr(cfg.data, split))
    if path.is_dir():
        return datasets.load_from_disk(str(path))
    if not path.is_file():
        raise ValueError(f"data.{split}: no file or folder at {path}")
    fmt = _data_format(path)
    if fmt is None:
        raise ValueError(
            f"data.{split}: {path.name} is not one of {sorted(_DATA_FORMATS)} (optionally compressed: "
            f"{', '.join(c for c in _COMPRESSIONS if c)}) or a saved dataset folder"
        )
    return datasets.load_dataset(fmt, data_files=str(path), split="train")


def _data_format(path: Path) -> str | None:
    """The ``datasets`` builder for a data file, looking through a compression suffix."""
    suffixes = path.suffixes
    compression = suffixes[-1] if suffixes and suffixes[-1] in _COMPRESSIONS else ""
    data_suffix = (
        suffixes[-2] if compression and len(suffixes) >= 2 else (suffixes[-1] if suffixes else "")
    )
    return _DATA_FORMATS.get(data_suffix)


def _label_names(cfg: Config, table) -> list[str] | None:
    """Sorted class names when a sequence task has string labels (ids follow this order)."""
    if cfg.data.task != "sequence" or "input_ids" in table.column_names:
        return None
    if cfg.data.label_field not in table.column_names:
        raise ValueError(
            f"data.label_field: column {cfg.data.label_field!r} is not in the train data"
        )
    values = table[cfg.data.label_field]
    return sorted({str(v) for v in values}) if values and isinstance(values[0], str) else None


def _count_labels(cfg: Config, rows: Sequence[Mapping[str, Any]]) -> int | None:
    if cfg.data.task not in ("sequence", "token") or len(rows) == 0:
        return None
    labels = (row["labels"] for row in rows if "labels" in row)
    flat = [
        v
        for value in labels
        for v in (value if isinstance(value, list) else [value])
        if v != IGNORE_INDEX
    ]
    return max(flat) + 1 if flat else None


def _tokenize(cfg: Config, table, tokenizer, label_names: list[str] | None, split: str):
    data = cfg.data
    if "input_ids" in table.column_names:
        keep = [
            c
            for c in ("input_ids", "attention_mask", "token_type_ids", "labels")
            if c in table.column_names
        ]
        return table.select_columns(keep)
    if tokenizer is None:
        raise ValueError(
            f"model.tokenizer: data.{split} holds raw text, so a tokenizer is needed "
            "(set model.tokenizer, or give pre-tokenized input_ids)"
        )
    if data.task == "token":
        raise ValueError(
            "data.task: token classification data must be pre-tokenized (input_ids and labels)"
        )
    for column in [data.text_field] + [c for c in (data.text_pair_field,) if c]:
        if column not in table.column_names:
            raise ValueError(f"data.text_field: column {column!r} is not in data.{split}")
    label_ids = {name: i for i, name in enumerate(label_names)} if label_names else None

    def encode(batch):
        pairs = batch[data.text_pair_field] if data.text_pair_field else None
        encoded = tokenizer(
            batch[data.text_field], pairs, truncation=True, max_length=data.max_length
        )
        if data.task == "causal_lm":
            encoded["labels"] = [list(ids) for ids in encoded["input_ids"]]
        elif data.task == "sequence":
            labels = batch[data.label_field]
            encoded["labels"] = (
                [label_ids[str(v)] for v in labels] if label_ids else [int(v) for v in labels]
            )
        else:
            targets = tokenizer(
                text_target=batch[data.target_field],
                truncation=True,
                max_length=data.target_max_length,
            )
            encoded["labels"] = targets["input_ids"]
        return encoded

    return table.map(
        encode, batched=True, remove_columns=table.column_names, desc=f"tokenize {split}"
    )


class Collator:
    """Right-pads tokenized rows into a batch of tensors (labels padded with -100).

    Causal-LM rows without labels get ``labels = input_ids`` (padding ignored).
    """

    def __init__(self, task: str, pad_token_id: int) -> None:
        self.task = task
        self.pad_token_id = int(pad_token_id)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("rows: cannot collate an empty batch")
        lengths = [len(row["input_ids"]) for row in rows]
        width = max(lengths)
        batch = {
            "input_ids": self._pad([row["input_ids"] for row in rows], width, self.pad_token_id),
            "attention_mask": self._pad(
                [
                    row.get("attention_mask") or [1] * n
                    for row, n in zip(rows, lengths, strict=True)
                ],
                width,
                0,
            ),
        }
        if "token_type_ids" in rows[0]:
            batch["token_type_ids"] = self._pad([row["token_type_ids"] for row in rows], width, 0)
        if "labels" in rows[0]:
            labels = [row["labels"] for row in rows]
            if isinstance(labels[0], list):
                batch["labels"] = self._pad(labels, max(len(x) for x in labels), IGNORE_INDEX)
            else:
                batch["labels"] = torch.tensor(labels, dtype=torch.long)
        elif self.task == "causal_lm":
            batch["labels"] = batch["input_ids"].masked_fill(
                batch["attention_mask"] == 0, IGNORE_INDEX
            )
        return batch

    @staticmethod
    def _pad(seqs: Sequence[Sequence[int]], width: int, value: int) -> torch.Tensor:
        out = torch.full((len(seqs), width), value, dtype=torch.long)
        for i, seq in enumerate(seqs):
            out[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        return out


def pad_token_id(tokenizer, model: nn.Module) -> int:
    """The id padding uses: the tokenizer's or model's pad (else eos) token, if inside the vocabulary.

    Padded positions are masked out everywhere, so any in-vocabulary id is correct; 0 is the fallback.
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    for source in (tokenizer, getattr(model, "config", None)):
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, int) and value >= 0 and (vocab is None or value < vocab):
                return value
    return 0


# --------------------------------------------------------------------------------------------------
# Data order: a seeded permutation per epoch, sharded over processes, resumable at any micro-batch.


class ShardedOrder:
    """Micro-batches of row indices for one process: epoch ``e`` shuffles with ``seed + e``.

    Each process takes every ``world_size``-th row of the permutation (the tail that does not
    fill a micro-batch on every process is dropped), so all processes run the same number of
    micro-batches per epoch. ``batches(epoch, position)`` resumes at micro-batch ``position``.
    """

    def __init__(
        self, num_rows: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_epoch = num_rows // (world_size * batch_size)
        if self.per_epoch == 0:
            raise ValueError(
                f"data: {num_rows} rows cannot fill one micro-batch of {batch_size} on each of "
                f"{world_size} processes; lower train.batch_size or add data"
            )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        permutation = torch.randperm(self.num_rows, generator=generator).tolist()
        mine = permutation[self.rank :: self.world_size][: self.per_epoch * self.batch_size]
        return [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    def batches(self, epoch: int, position: int) -> Iterator[tuple[int, int, list[int]]]:
        """Yields ``(epoch, position after this batch, row indices)`` forever."""
        while True:
            for i, rows in enumerate(self.epoch_batches(epoch)[position:], start=position):
                yield epoch, i + 1, rows
            epoch, position = epoch + 1, 0


# --------------------------------------------------------------------------------------------------
# Selection: load it when the file exists, else score the teacher on the configured split.


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
            raise ValueError(f"distill.layer_pairs[{i}]: {error}") from None
    scored = set()
    for layer in cfg.selection.layers or default_selection_layers(cfg):
        try:
            scored.add(t_adapter.resolve_layer(layer))
        except (ValueError, TypeError) as error:
            raise ValueError(f"selection.layers: {error}") from None
    k = cfg.selection.k or min(student_widths)
    teacher_width = min(t_adapter.layer_width(layer) for layer in scored)
    if k > teacher_width:
        raise ValueError(
            f"selection.k: {k} is larger than the teacher's hidden size {teacher_width}"
        )
    if cfg.distill.feature == "flex":
        if teacher_layers - scored:
            raise ValueError(
                f"selection.layers: teacher layers {sorted(teacher_layers - scored)} of "
                "distill.layer_pairs would not be scored"
            )
        if student_widths != {k}:
            raise ValueError(
                f"selection.k: feature 'flex' needs k equal to the paired student layers' width "
                f"{sorted(student_widths)}, got {k}"
            )
    return k


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
    batches = (collate([rows[i] for i in mine[j : j + size]]) for j in range(0, len(mine), size))
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


# --------------------------------------------------------------------------------------------------
# The loop.


@dataclass
class TrainResult:
    student_dir: Path
    steps: int
    metrics_path: Path
    is_main_process: bool = True


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines of steps <= ``step`` (the ones a resumed run will not repeat)."""
    if path.exists():
        kept = [
            line
            for line in path.read_text().splitlines()
            if line and json.loads(line)["step"] <= step
        ]
        write_text(path, "".join(line + "\n" for line in kept))


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _selection_for(
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


def _window_units(
    distiller, window: list[dict[str, torch.Tensor]], accelerator
) -> dict[str, float]:
    """Each term's units summed over the accumulation window and all processes."""
    names = ("task", "logit", "feature")
    units = torch.zeros(len(names), dtype=torch.float64, device=accelerator.device)
    for batch in window:
        counted = distiller.count_units(batch)
        units += torch.tensor([counted[n] for n in names], dtype=torch.float64, device=units.device)
    return dict(zip(names, accelerator.reduce(units, reduction="sum").tolist(), strict=True))


def _teacher_output_store(cfg: Config, distiller, train_rows, collate, accelerator):
    """The store of ``distill.teacher_outputs`` (the main process writes it when missing), checked against
    this run's teacher, rows, layers and logit KD."""
    from flexkd.teacher_outputs import TeacherOutputStore, write_teacher_outputs

    path = cfg.path(cfg.distill.teacher_outputs)
    layers = distiller.teacher_layers
    logits = distiller.weights["logit"] > 0
    if not (path / "meta.json").is_file() and accelerator.is_main_process:
        write_teacher_outputs(
            distiller.teacher,
            train_rows,
            path,
            layers=layers,
            collate=collate,
            logits=logits,
            batch_size=cfg.train.batch_size,
            side=cfg.distill.side,
            progress=cfg.train.progress,
        )
    accelerator.wait_for_everyone()
    store = TeacherOutputStore(path)
    try:
        store.check(distiller.teacher, train_rows, layers=layers, logits=logits)
    except ValueError as err:
        raise ValueError(f"distill.{err}") from None
    return store


def make_accelerator(**kwargs: Any):
    """An ``Accelerator`` that also forms a process group on machines without an accelerator.

    (``accelerate`` only sets up multi-process CPU runs, e.g. under ``torchrun``, when told ``cpu=True``.)
    """
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.accelerator.is_available(), **kwargs)


def train(cfg: Config) -> TrainResult:
    """Distil the student of ``cfg`` (resuming from its latest checkpoint); returns where it was saved."""
    from accelerate import DistributedDataParallelKwargs
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from flexkd.distill import Distiller

    tc = cfg.train
    needs_logits = cfg.distill.weights.task > 0 or cfg.distill.weights.logit > 0
    accelerator = make_accelerator(
        mixed_precision=tc.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=not needs_logits)],
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    output_dir = cfg.output_dir
    checkpoints = output_dir / "checkpoints"
    metrics_path = output_dir / "metrics.jsonl"
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if not tc.resume:
            shutil.rmtree(checkpoints, ignore_errors=True)
            metrics_path.unlink(missing_ok=True)
    set_seed(tc.seed + rank)

    tokenizer = build_tokenizer(cfg)
    splits = build_splits(cfg, tokenizer)
    teacher = build_model(cfg, "teacher", num_labels=splits.num_labels).to(accelerator.device)
    student = build_model(cfg, "student", num_labels=splits.num_labels)
    collate = Collator(cfg.data.task, pad_token_id(tokenizer, teacher))
    train_rows = splits.get("train")

    selection = _selection_for(cfg, teacher, student, splits, collate, rank=rank, world_size=world)
    distiller = Distiller(
        teacher,
        student,
        selection=selection,
        feature=cfg.distill.feature,
        feature_loss=cfg.distill.feature_loss,
        layer_pairs=cfg.distill.layer_pairs,
        weights=cfg.distill.weights.model_dump(),
        logit_kind=cfg.distill.logit_kind,
        temperature=cfg.distill.temperature,
        beta=cfg.distill.beta,
        projector_direction=cfg.distill.projector_direction,
        side=cfg.distill.side,
    )
    stored_teacher = (
        _teacher_output_store(cfg, distiller, train_rows, collate, accelerator)
        if cfg.distill.teacher_outputs
        else None
    )
    order = ShardedOrder(len(train_rows), tc.batch_size, seed=tc.seed, rank=rank, world_size=world)
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * order.per_epoch / tc.grad_accum))
    optimizer = torch.optim.AdamW(
        distiller.trainable_parameters(), lr=tc.lr, weight_decay=tc.weight_decay
    )
    scheduler = get_scheduler(
        tc.scheduler if tc.scheduler != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=tc.warmup_steps,
        num_training_steps=total_steps,
    )
    model, optimizer = accelerator.prepare(distiller, optimizer)

    state = RunState(step=0, epoch=0, position=0, seed=tc.seed, world_size=world)
    resume_from = latest_checkpoint(checkpoints) if tc.resume else None
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
            _truncate_metrics(metrics_path, state.step)
    accelerator.wait_for_everyone()

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
            window.append(_to_device(collate([train_rows[i] for i in rows]), accelerator.device))
            window_rows.append(rows)
        normalizers = _window_units(distiller, window, accelerator)
        logged: dict[str, float] = {}
        for i, (batch, rows) in enumerate(zip(window, window_rows, strict=True)):
            sync = contextlib.nullcontext() if i == len(window) - 1 else accelerator.no_sync(model)
            stored = stored_teacher.batch(rows) if stored_teacher is not None else None
            with sync:
                loss, terms = model(batch, normalizers=normalizers, teacher_outputs=stored)
                # DDP averages gradients over processes; the loss is already a global sum / units
                accelerator.backward(loss * world)
            for name, value in terms.items():
                logged[name] = logged.get(name, 0.0) + value
        grad_norm = None
        if tc.max_grad_norm is not None:
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1

        totals = accelerator.reduce(
            torch.tensor(list(logged.values()), device=accelerator.device), reduction="sum"
        )
        logged = dict(zip(logged, totals.tolist(), strict=True))
        if main and (state.step % tc.log_every == 0 or state.step == total_steps):
            record = {
                "step": state.step,
                "epoch": state.epoch,
                "lr": scheduler.get_last_lr()[0],
                **logged,
                "grad_norm": grad_norm,
                **{f"units_{name}": value for name, value in normalizers.items()},
                "elapsed_s": round(time.perf_counter() - started, 3),
            }
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{logged['total']:.4f}")
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

    student_dir = output_dir / "student"
    if main:
        _save_student(distiller.student, tokenizer, student_dir)
    accelerator.wait_for_everyone()
    return TrainResult(
        student_dir=student_dir, steps=state.step, metrics_path=metrics_path, is_main_process=main
    )


def _save_student(student: nn.Module, tokenizer, target: Path) -> None:
    """``save_pretrained`` into a temporary folder, then swap it into ``target`` atomically."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    replace_dir(tmp, target)


__all__ = [
    "Collator",
    "ShardedOrder",
    "Splits",
    "TrainResult",
    "build_model",
    "build_splits",
    "build_tokenizer",
    "list_checkpoints",
    "register_data_factory",
    "register_model_factory",
    "score_selection",
    "train",
]
