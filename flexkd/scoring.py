"""Importance scoring: how much a task depends on each teacher hidden dim, ``|∂loss/∂h · h|`` summed over tokens.

The gradient is taken w.r.t. the tapped hidden states only. Teacher parameters are frozen during the
pass, and the shallowest scored hidden state is replaced in the forward by a detached copy that requires
grad, so autograd records (and back-propagates through) nothing but the layers above it and the head.
For the last layer a scoring pass costs about one teacher forward.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from flexkd.adapters import TeacherIdentity, token_weights
from flexkd.adapters.masks import check_task
from flexkd.ops import STATS, importance_scores
from flexkd.selection import DimensionSelection
from flexkd.taps import LayerTap

LossFn = Callable[[object, Mapping[str, object]], torch.Tensor]


def score(
    teacher: nn.Module,
    batches: Iterable[Mapping[str, object]],
    *,
    layers: Sequence[int] = (-1,),
    k: int,
    stat: str = "grad_x_act",
    loss_fn: LossFn | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    all_reduce: bool = True,
    side: str | None = None,
    task: str | None = None,
    order: str = "index",
) -> DimensionSelection:
    """Score every hidden dim of ``teacher`` at ``layers`` over ``batches`` and keep the top ``k`` per layer.

    Args:
        teacher: a Hugging Face model with a head whose output has ``.loss`` (or pass ``loss_fn``).
        batches: dicts that ``teacher(**batch)`` accepts, labels included.
        layers: HF ``hidden_states`` layer numbers (negative from the end) of the ``side`` stack.
        k: dims to keep per layer (the student's hidden size).
        stat: ``"grad_x_act"`` (Flex-KD), ``"grad"`` or ``"grad_sq"``.
        loss_fn: ``loss_fn(outputs, batch) -> scalar``, instead of ``outputs.loss``.
        max_batches: stop after this many batches.
        all_reduce: when ``torch.distributed`` is initialised, sum scores and token counts over ranks.
        side: ``"encoder"`` (default) or ``"decoder"`` stack of a seq2seq teacher.
        task: how labels mask positions (``flexkd.adapters.TASKS``); detected from the model class by default.
        order: pairing order of the selected dims, ``"index"`` or ``"score"``.

    Positions that are padding or whose label is ignored contribute nothing. Scores are normalised by the
    number of tokens that counted.
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(outputs, batch)")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    tap = LayerTap(teacher, layers, side=side, grad_leaf=True)
    adapter = tap.adapter
    task = check_task(task) if task is not None else adapter.task
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
    digests: list[str] = []
    batch_iter = _limited(batches, max_batches)
    bar = tqdm(
        batch_iter,
        total=_length(batches, max_batches),
        desc="flexkd score",
        unit="batch",
        disable=not progress,
    )
    with bar, _scoring_mode(teacher), tap, torch.enable_grad():
        for batch in bar:
            if not isinstance(batch, Mapping):
                raise TypeError(
                    f"batches must yield dicts of model inputs, got {type(batch).__name__}"
                )
            batch = _to_device(batch, device)
            outputs = tap.run(**batch)
            loss = _loss_of(outputs, batch, loss_fn)
            hidden = [tap.hidden[layer] for layer in tap.layers]
            grads = torch.autograd.grad(loss, hidden, allow_unused=True)
            weights = token_weights(
                batch, task=task, side=adapter.side, shape=tuple(hidden[0].shape[:2]), device=device
            )
            for layer, h, g in zip(tap.layers, hidden, grads, strict=True):
                # g is None when the loss does not depend on the layer (a head reading a lower one)
                if g is None:
                    continue
                importance_scores(h.detach(), g, weights, stat=stat, out=totals[layer])
            tokens += weights.sum()
            digests.append(_batch_digest(batch))
            del outputs, loss, hidden, grads
    if all_reduce and dist.is_available() and dist.is_initialized():
        for total in totals.values():
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        dist.all_reduce(tokens, op=dist.ReduceOp.SUM)
        gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, digests)
        digests = list(itertools.chain.from_iterable(gathered))
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
        data_fingerprint=_fingerprint(digests),
    )


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


def _loss_of(outputs, batch: Mapping[str, object], loss_fn: LossFn | None) -> torch.Tensor:
    if loss_fn is not None:
        loss = loss_fn(outputs, batch)
    else:
        loss = getattr(outputs, "loss", None)
        if loss is None:
            raise ValueError(
                "batches: the teacher returned no loss; include labels in each batch or pass loss_fn(outputs, batch)"
            )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor")
    return loss.reshape(())


def _limited(batches: Iterable, max_batches: int | None) -> Iterable:
    if not isinstance(batches, Iterable) or isinstance(batches, Mapping):
        raise TypeError(
            "batches must be an iterable of dicts (e.g. a list or a DataLoader), not a single batch"
        )
    return batches if max_batches is None else itertools.islice(batches, max_batches)


def _length(batches: Iterable, max_batches: int | None) -> int | None:
    try:
        n = len(batches)  # type: ignore[arg-type]
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _to_device(batch: Mapping[str, object], device: torch.device) -> dict[str, object]:
    return {
        key: value.to(device) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


def _batch_digest(batch: Mapping[str, object]) -> str:
    """sha256 of the batch's integer tensors (token ids, labels), by key."""
    digest = hashlib.sha256()
    for key in sorted(batch):
        value = batch[key]
        if (
            isinstance(value, torch.Tensor)
            and not value.is_floating_point()
            and value.dtype != torch.bool
        ):
            digest.update(f"{key}:{tuple(value.shape)}".encode())
            digest.update(value.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _fingerprint(digests: list[str]) -> str:
    """Order-free hash of the batches seen, so any split of the same data over ranks gives the same value."""
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()
