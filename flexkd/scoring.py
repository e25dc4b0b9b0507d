"""Importance scoring: how much a task depends on each teacher hidden dim, ``|∂loss/∂h · h|`` summed over tokens.

The gradient is taken w.r.t. the tapped hidden states only. Teacher parameters are frozen during the
pass, and the shallowest scored hidden state is replaced in the forward by a detached copy that requires
grad, so autograd records (and back-propagates through) nothing but the layers above it and the head.
For the last layer a scoring pass costs about one teacher forward.

A score depends on the data only, never on how it is batched or split over processes: the loss is the
task loss *summed* over the positions that count, so each token's gradient is that of its own loss; the
scores are summed over every batch and process and divided by the global count of positions; the row
budget (``max_rows``) names the same rows for any world size; and the data fingerprint is built from
the rows, not from batch tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from flexkd.adapters import TeacherIdentity
from flexkd.adapters.masks import aligned_logits, check_task, counted_labels, scored_positions
from flexkd.distributed import in_step, is_sharded
from flexkd.ops import STATS, importance_scores
from flexkd.selection import DimensionSelection
from flexkd.taps import LayerTap
from flexkd.teacher_inputs import teacher_view
from flexkd.training.data import move_to_device

LossFn = Callable[[object, Mapping[str, object]], torch.Tensor]
IGNORE_INDEX = -100
_MASK_KEYS = ("attention_mask", "decoder_attention_mask")


def score(
    teacher: nn.Module,
    batches: Iterable[Mapping[str, object]],
    *,
    layers: Sequence[int] = (-1,),
    k: int,
    stat: str = "grad_x_act",
    loss_fn: LossFn | None = None,
    progress: bool = True,
    max_rows: int | None = None,
    max_batches: int | None = None,
    all_reduce: bool = True,
    side: str | None = None,
    task: str | None = None,
    order: str = "index",
) -> DimensionSelection:
    """Score every hidden dim of ``teacher`` at ``layers`` over ``batches`` and keep the top ``k`` per layer.

    Args:
        teacher: a Hugging Face model with a task head (causal LM, seq2seq, sequence or token
            classification), or any model when ``loss_fn`` is given.
        batches: dicts that ``teacher(**batch)`` accepts, labels included; a batch with
            ``teacher_input_ids`` (:mod:`flexkd.teacher_inputs`) is scored on those.
        layers: HF ``hidden_states`` layer numbers (negative from the end) of the ``side`` stack.
        k: dims to keep per layer (the student's hidden size).
        stat: ``"grad_x_act"`` (Flex-KD), ``"grad"`` or ``"grad_sq"``.
        loss_fn: ``loss_fn(outputs, batch) -> scalar`` instead of the summed cross-entropy of the task
            head. It must be a *sum* over tokens (rows for sequence tasks), not a mean: a mean scales each
            token's gradient by 1 / (tokens in its batch), so the scores would depend on the batching.
        max_rows: score this many rows in all, the same rows for any number of processes: process
            ``rank`` of ``world_size`` is taken to hold rows ``rank, rank + world_size, ...`` in the order
            its batches yield them (the split :func:`rows_for_rank` makes), and scores its share of the
            first ``max_rows``; a batch that crosses the budget is cut.
        max_batches: deprecated (it counts batches per process, so what it scores depends on the batch
            size and the world size); use ``max_rows``. Refused with several processes.
        all_reduce: when ``torch.distributed`` is initialised, sum scores, counts and the data fingerprint
            over ranks.
        side: ``"encoder"`` (default) or ``"decoder"`` stack of a seq2seq teacher.
        task: how labels mask positions (``flexkd.adapters.TASKS``); detected from the model class by default.
        order: pairing order of the selected dims, ``"index"`` or ``"score"``.

    Which positions count: a real token (``attention_mask``) AND, for causal LMs, a valid next label
    on a real next token (position ``t`` predicts ``labels[t + 1]``, so prompt tokens labelled -100,
    the last real token and the last position do not count); for token classification a valid label
    at the position; for seq2seq the encoder's real tokens (encoder side) or the decoder positions
    with a valid label (decoder side); for sequence classification every real token of a row whose
    label is not ignored. The default loss is the task head's cross-entropy summed over the counted
    positions (rows for sequence tasks), so each token contributes ``|h · ∂ℓ_token/∂h|`` of its own
    loss whatever it is batched with; the scores are normalised by the number of positions that
    counted over all batches and processes. One batch, single rows, uneven batches and any number of
    processes give the same scores to fp32 rounding.
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(outputs, batch)")
    _check_budget("max_rows", max_rows)
    _check_budget("max_batches", max_batches)
    if not isinstance(batches, Iterable) or isinstance(batches, Mapping):
        raise TypeError(
            "batches must be an iterable of dicts (e.g. a list or a DataLoader), not a single batch"
        )
    rank, world_size = _rank_and_world(all_reduce)
    if max_batches is not None:
        batches = _deprecated_max_batches(batches, max_batches, max_rows, world_size)
    tap = LayerTap(teacher, layers, side=side, grad_leaf=True)
    adapter = tap.adapter
    task = check_task(task) if task is not None else adapter.task
    if loss_fn is None and task is None:
        raise ValueError(
            f"task: cannot tell the task of {type(teacher).__name__} (no recognised head); pass task= "
            "or loss_fn(outputs, batch) returning the loss summed over tokens"
        )
    widths = {layer: adapter.layer_width(layer) for layer in tap.layers}
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= min(widths.values()):
        raise ValueError(
            f"k must be in [1, {min(widths.values())}] (the teacher's hidden size), got {k}"
        )

    device = _device_of(teacher)
    totals = {
        layer: torch.zeros(width, dtype=torch.float32, device=device)
        for layer, width in widths.items()
    }
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    fingerprint = RowFingerprint(task)
    quota = None if max_rows is None else len(range(rank, max_rows, world_size))
    bar = tqdm(
        _first_rows(batches, quota),
        total=None if quota is not None else _length(batches),
        desc="flexkd score",
        unit="batch",
        disable=not progress,
    )
    steps = ((batch, True) for batch in bar)
    if world_size > 1 and is_sharded(teacher):
        steps = in_step(bar, device=device)  # a sharded forward is a collective
    with bar, _scoring_mode(teacher), tap, torch.enable_grad():
        for batch, counts in steps:
            batch = teacher_view(batch, token_labels=task in ("causal_lm", "seq2seq"))
            if counts:
                fingerprint.add(batch)  # hashed on the host copy: reads nothing back from the device
            batch = move_to_device(batch, device)
            outputs = tap.run(**(batch if loss_fn is not None else _model_inputs(batch, task)))
            loss = (
                summed_task_loss(outputs, batch, task=task)
                if loss_fn is None
                else _user_loss(loss_fn, outputs, batch)
            )
            hidden = [tap.hidden[layer] for layer in tap.layers]
            grads = torch.autograd.grad(loss, hidden, allow_unused=True)
            if not counts:
                continue
            weights = scored_positions(
                batch, task=task, side=adapter.side, shape=tuple(hidden[0].shape[:2]), device=device
            )
            for layer, h, g in zip(tap.layers, hidden, grads, strict=True):
                # g is None when the loss does not depend on the layer (a head reading a lower one)
                if g is None:
                    continue
                importance_scores(h.detach(), g, weights, stat=stat, out=totals[layer])
            tokens += weights.sum()
            del outputs, loss, hidden, grads
    if world_size > 1:
        for total in totals.values():
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        dist.all_reduce(tokens, op=dist.ReduceOp.SUM)
        fingerprint.all_reduce()
    tokens_seen = int(tokens.item())
    if tokens_seen == 0:
        raise ValueError(
            "batches: no token was scored (no batches, or every position masked or ignored)"
        )
    return DimensionSelection.from_scores(
        {layer: total / tokens_seen for layer, total in totals.items()},
        k,
        order=order,
        stat=stat,
        tokens_seen=tokens_seen,
        teacher=TeacherIdentity.of(teacher, side=adapter.side),
        data_fingerprint=fingerprint.hexdigest(),
    )


def summed_task_loss(outputs, batch: Mapping[str, object], *, task: str) -> torch.Tensor:
    """The task head's cross-entropy summed (not averaged) over the positions that count.

    Positions are those of :func:`flexkd.adapters.masks.counted_labels`: for a causal LM, real tokens
    whose next token is real and labelled. Summing keeps each token's gradient that of its own loss, whatever
    else shares its batch or process.
    """
    from flexkd.losses import task_loss

    logits = getattr(outputs, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            "the teacher's output has no logits; pass loss_fn(outputs, batch) returning the loss summed "
            "over tokens"
        )
    labels = counted_labels(batch, task=task, ignore_index=IGNORE_INDEX)
    return task_loss(
        aligned_logits(logits, task), labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )


def rows_for_rank(
    num_rows: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    max_rows: int | None = None,
    seed: int | None = None,
) -> list[int]:
    """The row indices process ``rank`` of ``world_size`` scores.

    The first ``max_rows`` (all when None) of ``range(num_rows)``, shuffled with ``seed`` when given, dealt
    out round-robin (``[rank::world_size]``): every chosen row goes to exactly one process, and the chosen
    rows are the same for any world size. This is the split ``score(max_rows=...)`` assumes.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    _check_budget("max_rows", max_rows)
    if seed is None:
        order = list(range(num_rows))
    else:
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[:max_rows][rank::world_size]


class RowFingerprint:
    """A hash of the multiset of rows scored: the same for any batching, padding side and rank split.

    Each row's digest covers its unpadded content (the positions its attention mask keeps, for every
    tensor laid out like the mask; label padding stripped from seq2seq targets); the digests are added
    modulo 2**256, which no order or grouping changes, and ranks combine their sums the same way.
    """

    PREFIX = "rows:"

    def __init__(self, task: str | None) -> None:
        self.task = task
        self.rows = 0
        self.total = 0

    def add(self, batch: Mapping[str, object]) -> None:
        for digest in _row_digests(batch, self.task):
            self.total = (self.total + int.from_bytes(digest, "big")) % 2**256
            self.rows += 1

    def all_reduce(self) -> None:
        gathered: list[tuple[int, int]] = [(0, 0)] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.rows, self.total))
        self.rows = sum(rows for rows, _ in gathered)
        self.total = sum(total for _, total in gathered) % 2**256

    def hexdigest(self) -> str:
        return self.PREFIX + hashlib.sha256(f"{self.rows}:{self.total:064x}".encode()).hexdigest()


def _row_digests(batch: Mapping[str, object], task: str | None) -> Iterator[bytes]:
    size = _num_rows(batch)
    tensors = {
        key: value.detach().cpu()
        for key, value in sorted(batch.items())
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == size
    }
    masks = {key: tensors.pop(key) != 0 for key in _MASK_KEYS if key in tensors}
    # numpy per row: a few microseconds, where a torch op per row costs tens
    layout = {}
    for key, value in tensors.items():
        mask, values = _mask_for(key, value, masks, task), _as_numpy(value)
        layout[key] = (
            f"{key}:{values.dtype}:".encode(),
            values,
            None if mask is None else mask.numpy(),
            key == "labels" and value.dim() == 2 and mask is None,
        )
    for row in range(size):
        digest = hashlib.sha256()
        for header, values, mask, strip_padding in layout.values():
            content = values[row]
            if mask is not None:
                content = content[mask[row]]
            elif strip_padding:
                content = _strip(content, IGNORE_INDEX)
            digest.update(header + repr(content.shape).encode())
            digest.update(content.tobytes())
        yield digest.digest()


def _as_numpy(value: torch.Tensor) -> np.ndarray:
    """``value``'s elements as numpy: integers widened to int64 (ids hash alike whatever their dtype),
    bf16 as its int16 bit patterns."""
    if value.dtype == torch.bfloat16:
        return value.view(torch.int16).numpy()
    if value.is_floating_point() or value.dtype == torch.bool:
        return value.numpy()
    return value.to(torch.int64).numpy()


def _mask_for(
    key: str, value: torch.Tensor, masks: Mapping[str, torch.Tensor], task: str | None
) -> torch.Tensor | None:
    """The padding mask laid out like ``value``'s first two dims: the decoder's for decoder inputs and
    seq2seq labels, else the encoder's; None when none matches."""
    decoder = key.startswith("decoder_") or (key == "labels" and task == "seq2seq")
    mask = masks.get("decoder_attention_mask" if decoder else "attention_mask")
    if mask is None or tuple(value.shape[:2]) != tuple(mask.shape):
        return None
    return mask


def _strip(row: np.ndarray, pad: int) -> np.ndarray:
    """``row`` without the runs of ``pad`` at either end (label padding, on whichever side)."""
    kept = np.flatnonzero(row != pad)
    return row[:0] if kept.size == 0 else row[kept[0] : kept[-1] + 1]


def _num_rows(batch: object) -> int:
    if not isinstance(batch, Mapping):
        raise TypeError(f"batches must yield dicts of model inputs, got {type(batch).__name__}")
    for key in ("input_ids", "inputs_embeds", "attention_mask", "labels"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    raise ValueError("batches: a batch holds no tensor with a batch dimension")


def _first_rows(batches: Iterable, quota: int | None) -> Iterator[Mapping[str, object]]:
    """The batches holding the first ``quota`` rows (all when None), the last one cut to fit; no batch
    is drawn from ``batches`` once the quota is met."""
    remaining = quota
    iterator = iter(batches)
    while remaining is None or remaining > 0:
        batch = next(iterator, _END)
        if batch is _END:
            return
        size = _num_rows(batch)
        if remaining is not None:
            if size > remaining:
                batch = {
                    key: value[:remaining]
                    if isinstance(value, torch.Tensor)
                    and value.dim() >= 1
                    and value.shape[0] == size
                    else value
                    for key, value in batch.items()
                }
            remaining -= min(size, remaining)
        yield batch


_END = object()


def _deprecated_max_batches(
    batches: Iterable, max_batches: int, max_rows: int | None, world_size: int
) -> Iterable:
    advice = (
        "max_batches counts batches per process, so what it scores depends on the batch size and the "
        "number of processes; use max_rows (a row budget, the same rows for any world size)"
    )
    if max_rows is not None:
        raise ValueError("max_batches: give max_rows only; " + advice)
    if world_size > 1:
        raise ValueError(f"max_batches: refused with {world_size} processes: {advice}")
    warnings.warn(f"max_batches is deprecated: {advice}", FutureWarning, stacklevel=3)
    return itertools.islice(batches, max_batches)


def _check_budget(name: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def _rank_and_world(all_reduce: bool) -> tuple[int, int]:
    if all_reduce and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def _scoring_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode with every parameter frozen; the previous mode and ``requires_grad`` flags are restored."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _user_loss(loss_fn: LossFn, outputs, batch: Mapping[str, object]) -> torch.Tensor:
    loss = loss_fn(outputs, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor")
    return loss.reshape(())


def _model_inputs(batch: Mapping[str, object], task: str) -> Mapping[str, object]:
    """``batch`` without the labels when the model needs none to run, so that it does not also compute
    its own (mean) loss; a seq2seq model without ``decoder_input_ids`` builds them from the labels."""
    if task == "seq2seq" and "decoder_input_ids" not in batch:
        return batch
    return {key: value for key, value in batch.items() if key != "labels"}


def _length(batches: Iterable) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
