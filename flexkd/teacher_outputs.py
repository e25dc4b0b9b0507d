"""Offline distillation: the teacher's outputs on the training rows, computed once and read back per batch.

A frozen teacher in eval mode gives a row the same logits and hidden states in every run, so when many
students train on the same rows (methods x seeds of a study, or a sweep) the teacher needs to run once.
:func:`write_teacher_outputs` stores, for every row, only what the :class:`~flexkd.distill.Distiller`
reads: the logits at the row's logit positions (:func:`flexkd.adapters.masks.logit_positions`) and the
hidden states of the chosen layers at its feature positions (:func:`flexkd.adapters.token_weights`).
Rows are packed one after another (``data [positions, width]`` plus ``offsets [rows + 1]``), so a causal
LM keeps only its labelled positions, not ``[rows, length, vocab]``.

    store = write_teacher_outputs(teacher, rows, "teacher-outputs", layers=[-1], collate=collate)
    loss, terms = distiller(batch, teacher_outputs=store.batch(row_indices))

The store is a folder of ``.npy`` arrays (memory-mapped when read, so processes share one copy in the
page cache) and a ``meta.json`` naming the teacher and a fingerprint of the rows; it appears whole or not
at all. Stored in float32.

With ``topk=K`` the logits are kept as the teacher's K largest per position: ``logit_values [positions, K]``
(float32, so an fp32, bf16 or fp16 teacher's values are kept exactly) and ``logit_indices [positions, K]``
(int32), K x (4 + 4) bytes per position instead of vocab x 4. Logit KD against them uses the top-K
renormalised at the temperature T (``flexkd.losses.logit_kd(teacher_topk=...)``). What that drops is the
tail mass, ``1 - sum of softmax(logits / T) over the top K``; ``meta.json`` records its mean and max over
the positions (``TeacherOutputStore.tail_mass``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from flexkd import _io
from flexkd._io import read_json, replace_dir
from flexkd.adapters import TeacherIdentity, get_adapter, token_weights
from flexkd.adapters.masks import aligned_logits, detect_task, logit_positions
from flexkd.errors import StoreMismatchError, UnreadableFileError
from flexkd.taps import LayerTap
from flexkd.teacher_inputs import teacher_view

FORMAT = 1
SUPPORTED_TASKS = ("sequence", "causal_lm", "token")


@dataclass
class TeacherOutputs:
    """The teacher's outputs on one batch, packed: ``logits [logit positions, vocab]`` (None when not
    stored as dense logits), ``logit_topk`` = ``(values, indices)``, each ``[logit positions, K]`` (None
    when not stored as top-K) and ``hidden[layer] [feature positions, width]``, positions in row-major
    order of the batch."""

    logits: Tensor | None
    hidden: dict[int, Tensor]
    logit_topk: tuple[Tensor, Tensor] | None = None
    # the store checked logit_topk's indices (in range, unique per row) on the host: the Distiller need
    # not check them again on the device
    logit_topk_checked: bool = False


def rows_fingerprint(rows: Sequence[Mapping[str, Any]]) -> str:
    """sha256 over every row's fields (sorted by name), as the training loop would batch them."""
    digest = hashlib.sha256()
    for i in range(len(rows)):
        row = rows[i]
        for key in sorted(row):
            digest.update(key.encode())
            value = row[key].tolist() if hasattr(row[key], "tolist") else row[key]
            digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _row_counts(mask: Tensor, rows: int) -> list[int]:
    return mask.reshape(rows, -1).sum(1).tolist()


@torch.no_grad()
def write_teacher_outputs(
    teacher: nn.Module,
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    layers: Sequence[int],
    collate: Callable[[list], dict[str, Tensor]],
    logits: bool = True,
    topk: int | None = None,
    temperature: float = 1.0,
    batch_size: int = 32,
    side: str | None = None,
    ignore_index: int = -100,
    progress: bool = True,
) -> TeacherOutputStore:
    """Run ``teacher`` once over ``rows`` (batched by ``collate``) and store its outputs at ``path``.

    ``layers`` are the teacher layers (HF ``hidden_states`` numbering, negative from the end) whose hidden
    states are kept; ``logits=False`` stores no logits (for runs without logit KD). ``topk=K`` keeps the
    K largest logits per position instead of the vocabulary; ``temperature`` is the T its tail mass is
    measured at (the run's KD temperature).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ValueError(f"topk: expected None or an int >= 1, got {topk!r}")
    if topk is not None and not logits:
        raise ValueError("topk: top-K logits asked for, but logits=False stores none")
    if not (isinstance(temperature, int | float) and temperature > 0):
        raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
    if len(rows) == 0:
        raise ValueError("rows: nothing to run the teacher on")
    task = detect_task(teacher)
    if task not in SUPPORTED_TASKS:
        raise ValueError(
            f"teacher: stored outputs support {SUPPORTED_TASKS} models, {type(teacher).__name__} is {task!r}"
        )
    adapter = get_adapter(teacher, side=side)
    try:
        resolved = sorted({adapter.resolve_layer(layer) for layer in layers})
    except (ValueError, TypeError) as err:
        raise type(err)(f"layers: {err}") from None
    if not resolved and not logits:
        raise ValueError("layers: nothing to store (no layer and logits=False)")
    device = next(teacher.parameters()).device
    teacher.eval()
    spans = [range(i, min(i + batch_size, len(rows))) for i in range(0, len(rows), batch_size)]

    def masks(batch):
        positions = logit_positions(batch, task=task, ignore_index=ignore_index)[1]
        shape = tuple(batch["input_ids"].shape[:2])
        features = token_weights(
            batch, task=task, side=adapter.side, shape=shape, ignore_index=ignore_index
        )
        return positions, features

    # the masks depend on the batch alone: every array is sized before the teacher runs
    batches = [collate([rows[i] for i in span]) for span in spans]
    batch_masks = [masks(batch) for batch in batches]
    logit_counts, feature_counts = [], []
    for span, (positions, features) in zip(spans, batch_masks, strict=True):
        logit_counts += _row_counts(positions, len(span))
        feature_counts += _row_counts(features, len(span))
    logit_offsets = np.concatenate([[0], np.cumsum(logit_counts)]).astype(np.int64)
    feature_offsets = np.concatenate([[0], np.cumsum(feature_counts)]).astype(np.int64)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))  # one per writer
    arrays = _PackedArrays(tmp)
    tail = _TailMass(float(temperature))
    vocab = None
    try:
        progress_bar = tqdm(spans, desc="flexkd teacher outputs", unit="batch", disable=not progress)
        for span, batch, (positions, features) in zip(progress_bar, batches, batch_masks, strict=True):
            inputs = {k: v.to(device) for k, v in teacher_view(batch).items() if k != "labels"}
            if resolved:
                with LayerTap(teacher, resolved, stop_after_deepest=not logits, side=adapter.side) as tap:
                    out = tap.run(**inputs)
                    hidden = dict(tap.hidden)
            else:  # logits only
                out, hidden = teacher(**inputs), {}
            rows_span = (span[0], span[-1] + 1)
            if logits:
                packed = aligned_logits(out.logits, task)[positions.to(out.logits.device)]
                vocab = packed.shape[-1]
                if topk is None:
                    arrays.write("logits", packed, logit_offsets, rows_span)
                else:
                    values, indices = _top_logits(packed, topk)
                    tail.add(packed, values)
                    arrays.write("logit_values", values, logit_offsets, rows_span)
                    arrays.write("logit_indices", indices, logit_offsets, rows_span)
            for layer in resolved:
                packed = hidden[layer][features.to(hidden[layer].device)]
                arrays.write(f"hidden.{layer}", packed, feature_offsets, rows_span)
        arrays.close()
        np.save(tmp / "logit_offsets.npy", logit_offsets)
        np.save(tmp / "feature_offsets.npy", feature_offsets)
        meta = {
            "format": FORMAT,
            "task": task,
            "side": adapter.side,
            "layers": resolved,
            "logits": logits,
            "logit_topk": topk,
            "logit_vocab": vocab,
            "tail_mass": tail.summary() if topk is not None else None,
            "rows": len(rows),
            "rows_fingerprint": rows_fingerprint(rows),
            "ignore_index": ignore_index,
            "teacher": TeacherIdentity.of(teacher, side=adapter.side).to_dict(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _io.apply_umask(tmp)  # mkdtemp made the folder 0700
    except BaseException:
        arrays.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)
    return TeacherOutputStore(path)


def _top_logits(packed: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest logits per position (fp32, descending) and their int32 vocabulary indices."""
    vocab = packed.shape[-1]
    if k > vocab:
        raise ValueError(f"topk: K={k} is larger than the teacher's vocabulary of {vocab}")
    values, indices = packed.float().topk(k, dim=-1)
    return values, indices.to(torch.int32)


class _TailMass:
    """Running mean and max over positions of ``1 - softmax(logits / T)`` summed over the top K."""

    def __init__(self, temperature: float) -> None:
        self.temperature, self.total, self.max, self.count = temperature, 0.0, 0.0, 0

    def add(self, logits: Tensor, top_values: Tensor) -> None:
        if logits.shape[0] == 0:
            return
        scaled = logits.float() / self.temperature
        kept = torch.logsumexp(top_values / self.temperature, -1) - torch.logsumexp(scaled, -1)
        tail = (-torch.expm1(kept)).clamp_min(0.0)  # 1 - exp(kept), exact near 0
        self.total += float(tail.double().sum())
        self.max = max(self.max, float(tail.max()))
        self.count += tail.numel()

    def summary(self) -> dict[str, float]:
        mean = self.total / self.count if self.count else 0.0
        return {"temperature": self.temperature, "mean": mean, "max": self.max}


class _PackedArrays:
    """The store's ``.npy`` arrays (float32, int32 indices), created on first write (the width is known
    only then)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.arrays = folder, {}

    def write(self, name: str, packed: Tensor, offsets: np.ndarray, rows: tuple[int, int]) -> None:
        dtype = np.int32 if packed.dtype == torch.int32 else np.float32
        if name not in self.arrays:
            self.arrays[name] = np.lib.format.open_memmap(
                self.folder / f"{name}.npy",
                mode="w+",
                dtype=dtype,
                shape=(int(offsets[-1]), packed.shape[-1]),
            )
        values = packed if dtype == np.int32 else packed.float()
        self.arrays[name][offsets[rows[0]] : offsets[rows[1]]] = values.cpu().numpy()

    def close(self) -> None:
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()

class TeacherOutputStore:
    """A folder written by :func:`write_teacher_outputs`, read row by row."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"teacher_outputs: {self.path} is not a stored-teacher-outputs folder (no meta.json)"
            )
        self.meta = read_json(meta_path)
        if not isinstance(self.meta, dict):
            raise UnreadableFileError(meta_path, "is not a stored-teacher-outputs meta mapping")
        if self.meta.get("format") != FORMAT:
            raise StoreMismatchError(
                f"teacher_outputs: {self.path} has format {self.meta.get('format')!r}, this flexkd reads {FORMAT}"
            )
        try:
            self.layers: list[int] = list(self.meta["layers"])
            self.has_logits: bool = bool(self.meta["logits"])
            self.topk: int | None = self.meta.get("logit_topk")
            self._vocab: int | None = self.meta.get("logit_vocab")
        except (KeyError, TypeError) as error:
            raise UnreadableFileError(meta_path, f"lacks a valid {_io.one_line(error)} entry") from None
        self._logit_offsets = self._array("logit_offsets.npy")
        self._feature_offsets = self._array("feature_offsets.npy")
        dense = self.has_logits and self.topk is None
        self._logits = self._array("logits.npy", mmap_mode="r") if dense else None
        self._topk = (
            (
                self._array("logit_values.npy", mmap_mode="r"),
                self._array("logit_indices.npy", mmap_mode="r"),
            )
            if self.has_logits and self.topk is not None
            else None
        )
        self._hidden = {
            layer: self._array(f"hidden.{layer}.npy", mmap_mode="r") for layer in self.layers
        }

    def _array(self, name: str, mmap_mode: str | None = None) -> np.ndarray:
        file = self.path / name
        try:
            return np.load(file, mmap_mode=mmap_mode)
        except (OSError, ValueError, EOFError) as error:  # missing, truncated, not a .npy
            raise UnreadableFileError(
                file, f"is not a readable stored-teacher-outputs array ({_io.one_line(error)})"
            ) from None

    def __len__(self) -> int:
        return int(self.meta["rows"])

    @property
    def tail_mass(self) -> dict[str, float] | None:
        """For top-K logits, ``{"temperature", "mean", "max"}`` of the softmax mass outside the top K
        over the stored positions (None for dense or no logits)."""
        return self.meta.get("tail_mass")

    def check(
        self,
        teacher: nn.Module,
        rows: Sequence[Mapping[str, Any]],
        *,
        layers: Sequence[int] = (),
        logits: bool = False,
        topk: int | None = None,
    ) -> None:
        """Raise ``StoreMismatchError`` (a ``ValueError``) unless this store was made by ``teacher`` on ``rows`` and holds ``layers``
        (resolved against the teacher) and, when ``logits``, the logits: dense when ``topk`` is None, else
        the top ``topk``."""
        problems = TeacherIdentity.from_dict(self.meta["teacher"]).mismatches(
            TeacherIdentity.of(teacher, side=self.meta["side"])
        )
        if len(rows) != len(self):
            problems.append(f"rows: stored for {len(self)} rows, the data has {len(rows)}")
        elif rows_fingerprint(rows) != self.meta["rows_fingerprint"]:
            problems.append("rows: the data differs from the rows the outputs were stored for")
        adapter = get_adapter(teacher, side=self.meta["side"])
        missing = sorted({adapter.resolve_layer(layer) for layer in layers} - set(self.layers))
        if missing:
            problems.append(f"layers: {missing} not stored (it holds {self.layers})")
        if logits and not self.has_logits:
            problems.append("logits: not stored, but the run uses logit KD")
        elif logits and self.topk != topk:
            stored = "dense logits" if self.topk is None else f"the top-{self.topk} logits"
            asked = "dense logits" if topk is None else f"the top-{topk} logits"
            problems.append(f"teacher_topk: the store holds {stored}, the run asks for {asked}")
        if problems:
            raise StoreMismatchError(
                f"teacher_outputs: {self.path} does not fit this run: " + "; ".join(problems)
            )

    def batch(self, indices: Sequence[int]) -> TeacherOutputs:
        """The packed outputs of rows ``indices``, in that order."""
        for i in indices:
            if not 0 <= i < len(self):
                raise IndexError(f"indices: row {i} is outside the store's {len(self)} rows")

        def gather(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
            parts = [data[offsets[i] : offsets[i + 1]] for i in indices]
            return np.concatenate(parts) if parts else data[:0].copy()

        logits = (
            torch.from_numpy(gather(self._logits, self._logit_offsets))
            if self._logits is not None
            else None
        )
        topk, checked = None, False
        if self._topk is not None:
            values, vocab_indices = (gather(data, self._logit_offsets) for data in self._topk)
            checked = self._check_topk_indices(vocab_indices)  # on the host copy: no device read
            topk = (torch.from_numpy(values), torch.from_numpy(vocab_indices))
        hidden = {
            layer: torch.from_numpy(gather(data, self._feature_offsets))
            for layer, data in self._hidden.items()
        }
        return TeacherOutputs(logits=logits, hidden=hidden, logit_topk=topk, logit_topk_checked=checked)

    def _check_topk_indices(self, indices: np.ndarray) -> bool:
        """Raise :class:`UnreadableFileError` unless every row of ``indices`` holds distinct vocabulary
        indices, so the training step need not check them on the device. False when the store does not record its vocabulary size (the range is left unchecked)."""
        file = self.path / "logit_indices.npy"
        if indices.size and (indices.min() < 0 or (self._vocab is not None and indices.max() >= self._vocab)):
            raise UnreadableFileError(
                file, f"holds vocabulary indices outside [0, {self._vocab or 'V'}) (damaged?)"
            )
        ordered = np.sort(indices, axis=-1)
        if (ordered[:, 1:] == ordered[:, :-1]).any():
            raise UnreadableFileError(file, "repeats a vocabulary index within a position (damaged?)")
        return self._vocab is not None
