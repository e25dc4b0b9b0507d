"""``DimensionSelection``: which teacher hidden dims Flex-KD distills, per layer, with their scores.

Saved as one safetensors file: tensors ``scores/<layer>`` (fp32 ``[D]``, normalised by tokens seen) and
``index/<layer>`` (int64 ``[k]``), and the JSON metadata under the header key ``flexkd`` (teacher identity,
layers, k, stat, tokens seen, data fingerprint, flexkd version). Writes are atomic.

The data fingerprint ``flexkd.score`` records is ``"rows:<sha256>"``, a hash of the multiset of unpadded
rows scored, so it is the same for any batch size, padding side and world size. Files written before
it hold a bare hex digest of the batch tensors instead; they load unchanged (the format did not
change), but their fingerprint never equals a row-based one, so rescore to compare data.

``load`` checks a file before anyone uses it: the required metadata fields and their types, each
layer's tensors (fp32 scores of the file's ``hidden_size``, except that a final projection may change
the last layer's width; int64 index of length ``k``), finite scores, and an index equal to what the
file's scores, ``which``, ``order`` (and ``seed``) choose. Every failure is an ``UnreadableFileError``
naming the file and the field.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from flexkd import _io
from flexkd._version import __version__
from flexkd.adapters import TeacherIdentity, check_layer_number
from flexkd.errors import SelectionMismatchError, UnreadableFileError
from flexkd.ops import STATS, select_top_k

FORMAT = "flexkd.selection"
FORMAT_VERSION = 1
WHICH = ("top", "bottom", "random")
ORDERS = ("index", "score")


class DimensionSelection:
    """Scores and chosen teacher dims per layer (layers in HF ``hidden_states`` numbering, resolved)."""

    def __init__(
        self,
        *,
        scores: Mapping[int, torch.Tensor],
        indices: Mapping[int, torch.Tensor],
        k: int,
        stat: str,
        tokens_seen: int,
        teacher: TeacherIdentity | None,
        hidden_size: int,
        num_layers: int | None = None,
        which: str = "top",
        order: str = "index",
        seed: int | None = None,
        data_fingerprint: str | None = None,
        flexkd_version: str = __version__,
    ) -> None:
        if set(scores) != set(indices) or not scores:
            raise ValueError("scores and indices must hold the same, non-empty set of layers")
        self.layers = sorted(scores)
        self.k = int(k)
        self.stat = stat
        self.tokens_seen = int(tokens_seen)
        self.teacher = teacher
        self.hidden_size = int(hidden_size)
        self.num_layers = (
            num_layers if num_layers is not None else (teacher.num_layers if teacher else None)
        )
        self.which = which
        self.order = order
        self.seed = seed
        self.data_fingerprint = data_fingerprint
        self.flexkd_version = flexkd_version
        self._scores = {
            layer: scores[layer].detach().to("cpu", torch.float32) for layer in self.layers
        }
        self._indices = {
            layer: indices[layer].detach().to("cpu", torch.int64) for layer in self.layers
        }
        self._check_consistent()

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def from_scores(
        cls,
        scores: Mapping[int, torch.Tensor],
        k: int,
        *,
        order: str = "index",
        which: str = "top",
        seed: int = 0,
        stat: str = "grad_x_act",
        tokens_seen: int = 0,
        teacher: nn.Module | TeacherIdentity | None = None,
        side: str | None = None,
        data_fingerprint: str | None = None,
    ) -> DimensionSelection:
        """Select k dims per layer from per-layer scores ``{layer: fp32 [D]}``.

        ``which="top"`` keeps the k highest scores (Flex-KD); ``"bottom"`` the k lowest and ``"random"`` k
        dims drawn with ``seed``, for ablations. ``order`` pairs student dim i with the i-th selected teacher
        dim sorted by teacher index (``"index"``) or by descending score (``"score"``). With ``teacher`` (a
        model or its identity) negative layers resolve and the selection can be validated on load.
        """
        if not isinstance(scores, Mapping) or not scores:
            raise TypeError("scores must be a non-empty mapping from layer to a 1-D float tensor")
        _check_choice("which", which, WHICH)
        _check_choice("order", order, ORDERS)
        _check_choice("stat", stat, STATS)
        identity = (
            TeacherIdentity.of(teacher, side=side) if isinstance(teacher, nn.Module) else teacher
        )
        resolved: dict[int, torch.Tensor] = {}
        for layer, layer_scores in scores.items():
            key = _resolve(layer, identity.num_layers if identity else None)
            if key in resolved:
                raise ValueError(f"scores names layer {key} twice")
            if not isinstance(layer_scores, torch.Tensor) or layer_scores.dim() != 1:
                raise TypeError(f"scores[{layer}] must be a 1-D tensor")
            if not layer_scores.is_floating_point():
                raise TypeError(f"scores[{layer}] must be a float tensor, got {layer_scores.dtype}")
            resolved[key] = layer_scores.detach().to("cpu", torch.float32)
        width = min(s.numel() for s in resolved.values())
        _check_k(k, width)
        indices = {layer: _choose(s, k, which, order, seed) for layer, s in resolved.items()}
        hidden_size = (
            identity.hidden_size if identity else max(s.numel() for s in resolved.values())
        )
        return cls(
            scores=resolved,
            indices=indices,
            k=k,
            stat=stat,
            tokens_seen=tokens_seen,
            teacher=identity,
            hidden_size=hidden_size,
            which=which,
            order=order,
            seed=seed if which == "random" else None,
            data_fingerprint=data_fingerprint,
        )

    # ----------------------------------------------------------------------------------------- queries
    @property
    def teacher_id(self) -> str:
        return self.teacher.teacher_id if self.teacher else "unknown"

    @property
    def side(self) -> str | None:
        return self.teacher.side if self.teacher else None

    def index(self, layer: int) -> torch.Tensor:
        """int64 ``[k]``: the teacher dims of ``layer``, in the order they pair with student dims."""
        return self._indices[self._key(layer)].clone()

    def scores(self, layer: int) -> torch.Tensor:
        """fp32 ``[D]``: the importance of every teacher dim of ``layer``, normalised by tokens seen."""
        return self._scores[self._key(layer)].clone()

    def mass_in_top_k(self, layer: int) -> float:
        """Share of ``layer``'s total score held by the selected k dims (for ``which="top"``: the top k)."""
        key = self._key(layer)
        total = float(self._scores[key].sum())
        if total <= 0:
            return 0.0
        return float(self._scores[key][self._indices[key]].sum()) / total

    def resolve(self, layer: int) -> int:
        """``layer`` (negative counts from the end) as the layer number this selection stores it under."""
        return self._key(layer)

    def _key(self, layer: int) -> int:
        key = _resolve(layer, self.num_layers)
        if key not in self._indices:
            raise KeyError(f"layer {layer} is not in this selection; it holds layers {self.layers}")
        return key

    # ------------------------------------------------------------------------------------ persistence
    def metadata(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "flexkd_version": self.flexkd_version,
            "teacher_id": self.teacher_id,
            "teacher": self.teacher.to_dict() if self.teacher else None,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "layers": self.layers,
            "k": self.k,
            "stat": self.stat,
            "which": self.which,
            "order": self.order,
            "seed": self.seed,
            "tokens_seen": self.tokens_seen,
            "data_fingerprint": self.data_fingerprint,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the selection to ``path`` atomically (temp file in the same folder, then ``os.replace``)."""
        from safetensors.torch import save

        path = Path(path)
        tensors = {}
        for layer in self.layers:
            tensors[f"scores/{layer}"] = self._scores[layer].contiguous()
            tensors[f"index/{layer}"] = self._indices[layer].contiguous()
        payload = save(tensors, metadata={"flexkd": json.dumps(self.metadata())})
        with _io.atomic_open(path, "wb") as handle:
            handle.write(payload)
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        teacher: nn.Module | None = None,
        *,
        check_weights: bool = True,
    ) -> DimensionSelection:
        """Read a selection; with ``teacher``, raise ``ValueError`` naming every way it does not match it."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: no selection file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise UnreadableFileError(
                path, f"is not a readable safetensors file ({_io.one_line(error)})"
            ) from None
        if "flexkd" not in header:
            raise UnreadableFileError(
                path, "is a safetensors file without flexkd selection metadata"
            )
        try:
            meta = json.loads(header["flexkd"])
        except ValueError as error:
            raise UnreadableFileError(
                path,
                f"holds flexkd selection metadata that is not valid JSON ({_io.one_line(error)})",
            ) from None
        if not isinstance(meta, dict):
            raise UnreadableFileError(path, "holds flexkd selection metadata that is not a mapping")
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise SelectionMismatchError(
                f"path: {path} has format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                f"this flexkd reads {FORMAT!r} version {FORMAT_VERSION}"
            )
        layers = _check_metadata(path, meta)
        missing = [
            f"{kind}/{layer}"
            for layer in layers
            for kind in ("scores", "index")
            if f"{kind}/{layer}" not in tensors
        ]
        if missing:
            raise UnreadableFileError(path, f"lacks tensors {missing}")
        teacher_meta = meta.get("teacher")
        try:
            identity = TeacherIdentity.from_dict(teacher_meta) if teacher_meta else None
            selection = cls(
                scores={layer: tensors[f"scores/{layer}"] for layer in layers},
                indices={layer: tensors[f"index/{layer}"] for layer in layers},
                k=meta["k"],
                stat=meta["stat"],
                tokens_seen=meta["tokens_seen"],
                teacher=identity,
                hidden_size=meta["hidden_size"],
                num_layers=meta.get("num_layers"),
                which=meta.get("which", "top"),
                order=meta.get("order", "index"),
                seed=meta.get("seed"),
                data_fingerprint=meta.get("data_fingerprint"),
                flexkd_version=meta.get("flexkd_version", "unknown"),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise UnreadableFileError(path, f"is inconsistent: {_io.one_line(error)}") from None
        selection._check_against_scores(path, tensors)
        if teacher is not None:
            selection.validate(teacher, check_weights=check_weights)
        return selection

    def validate(self, teacher: nn.Module, *, check_weights: bool = True) -> None:
        """Raise ``ValueError`` naming every mismatch between this selection and ``teacher``."""
        if self.teacher is None:
            raise ValueError(
                "teacher: this selection records no teacher identity, so it cannot be validated"
            )
        current = TeacherIdentity.of(teacher, side=self.teacher.side)
        problems = self.teacher.mismatches(current, check_weights=check_weights)
        if problems:
            raise SelectionMismatchError(
                f"teacher: the selection (scored on {self.teacher_id!r}) does not match this teacher:\n  - "
                + "\n  - ".join(problems)
            )
        if self.teacher.config_hash != current.config_hash:
            warnings.warn(
                f"teacher {current.teacher_id!r} has the same name as the selection's teacher but a different "
                f"config hash; using the selection anyway",
                stacklevel=2,
            )

    # ---------------------------------------------------------------------------------------- report
    def plot(self, path: str | os.PathLike, layer: int | None = None) -> Path:
        """Write a PNG of the sorted scores of ``layer`` (default: every layer), with k marked."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        layers = self.layers if layer is None else [self._key(layer)]
        fig, axes = plt.subplots(len(layers), 1, figsize=(7, 3 * len(layers)), squeeze=False)
        for ax, key in zip(axes[:, 0], layers, strict=True):
            ordered = torch.sort(self._scores[key], descending=True).values.numpy()
            ax.plot(range(1, len(ordered) + 1), ordered, lw=1.2)
            ax.axvline(self.k, color="tab:red", ls="--", lw=1, label=f"k = {self.k}")
            if ordered.min() > 0:
                ax.set_yscale("log")
            ax.set_xlabel("rank of teacher dim")
            ax.set_ylabel(f"score ({self.stat})")
            ax.set_title(
                f"{_short_name(self.teacher_id)} layer {key}: {100 * self.mass_in_top_k(key):.1f}% of "
                f"the mass in the {self.which} {self.k}",
                fontsize=10,
            )
            ax.legend(loc="upper right")
        fig.tight_layout()
        path = Path(path)
        try:
            with _io.atomic_open(path, "wb") as handle:
                fig.savefig(handle, format="png", dpi=110)
        finally:
            plt.close(fig)
        return path

    def __repr__(self) -> str:
        return (
            f"DimensionSelection(teacher={self.teacher_id!r}, layers={self.layers}, k={self.k}, "
            f"hidden_size={self.hidden_size}, stat={self.stat!r}, which={self.which!r}, "
            f"tokens_seen={self.tokens_seen})"
        )

    def _check_against_scores(self, path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
        """What a file can get wrong that the constructor cannot see: widths, dtypes, finite scores, and
        an index that is the one its scores, ``which``, ``order`` (and ``seed``) choose."""
        if self.teacher is not None and self.teacher.hidden_size != self.hidden_size:
            raise UnreadableFileError(
                path,
                f"field hidden_size is {self.hidden_size} but teacher.hidden_size is "
                f"{self.teacher.hidden_size}",
            )
        for layer in self.layers:
            raw_scores, raw_index = tensors[f"scores/{layer}"], tensors[f"index/{layer}"]
            if raw_scores.dim() != 1 or raw_scores.dtype != torch.float32:
                raise UnreadableFileError(
                    path,
                    f"tensor scores/{layer} must be fp32 [D], got {raw_scores.dtype} "
                    f"{tuple(raw_scores.shape)}",
                )
            if raw_index.dtype != torch.int64:
                raise UnreadableFileError(path, f"tensor index/{layer} must be int64, got {raw_index.dtype}")
            width = raw_scores.numel()
            is_final = self.num_layers is not None and layer == self.num_layers
            if width != self.hidden_size and not is_final:  # a final projection may change the width
                raise UnreadableFileError(
                    path, f"tensor scores/{layer} has {width} entries but field hidden_size is {self.hidden_size}"
                )
            if not torch.isfinite(raw_scores).all():
                raise UnreadableFileError(path, f"tensor scores/{layer} holds NaN or inf scores")
        if all(self._scores[layer].numel() != self.hidden_size for layer in self.layers):
            raise UnreadableFileError(
                path, f"field hidden_size is {self.hidden_size} but no layer's scores have that width"
            )
        if self.which == "random" and self.seed is None:
            raise UnreadableFileError(path, "field seed is missing (which='random' needs it)")
        for layer in self.layers:
            expected = _choose(self._scores[layer], self.k, self.which, self.order, self.seed or 0)
            if not torch.equal(expected, self._indices[layer]):
                raise UnreadableFileError(
                    path,
                    f"tensor index/{layer} is not the {self.which}-{self.k} of scores/{layer} "
                    f"(order {self.order!r}): the file was altered or its scores do not belong to it",
                )

    def _check_consistent(self) -> None:
        _check_choice("stat", self.stat, STATS)
        _check_choice("which", self.which, WHICH)
        _check_choice("order", self.order, ORDERS)
        for layer in self.layers:
            if self.num_layers is not None and not 0 <= layer <= self.num_layers:
                raise ValueError(
                    f"layer {layer} is out of range for a teacher with {self.num_layers} layers"
                )
            scores, index = self._scores[layer], self._indices[layer]
            _check_k(self.k, scores.numel())
            if index.shape != (self.k,):
                raise ValueError(
                    f"index of layer {layer} has shape {tuple(index.shape)}, expected ({self.k},)"
                )
            if (
                int(index.min()) < 0
                or int(index.max()) >= scores.numel()
                or index.unique().numel() != self.k
            ):
                raise ValueError(
                    f"index of layer {layer} must hold {self.k} distinct dims in [0, {scores.numel()})"
                )


REQUIRED_METADATA = {
    "layers": list,
    "k": int,
    "stat": str,
    "tokens_seen": int,
    "hidden_size": int,
}


def _check_metadata(path: Path, meta: dict) -> list[int]:
    """The file's layers, once every required metadata field is present and of its type."""
    for field, kind in REQUIRED_METADATA.items():
        if field not in meta:
            raise UnreadableFileError(path, f"lacks the metadata field {field!r}")
        value = meta[field]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise UnreadableFileError(
                path, f"field {field} must be of type {kind.__name__}, got {value!r}"
            )
    layers = meta["layers"]
    if not layers or any(isinstance(layer, bool) or not isinstance(layer, int) for layer in layers):
        raise UnreadableFileError(path, f"field layers must be a non-empty list of ints, got {layers!r}")
    if meta["tokens_seen"] < 0:
        raise UnreadableFileError(path, f"field tokens_seen must be >= 0, got {meta['tokens_seen']}")
    return layers


def _choose(scores: torch.Tensor, k: int, which: str, order: str, seed: int) -> torch.Tensor:
    if which == "top":
        return select_top_k(scores, k, order=order)
    if which == "bottom":
        chosen = select_top_k(-scores, k, order="score")
    else:
        generator = torch.Generator().manual_seed(int(seed))
        chosen = torch.randperm(scores.numel(), generator=generator)[:k]
    if order == "index":
        return torch.sort(chosen).values
    return chosen[torch.sort(scores[chosen], descending=True, stable=True).indices]


def _short_name(teacher_id: str, limit: int = 32) -> str:
    """A plot title's name for the teacher: a local path's last folder (not the cache path), cut to ``limit``."""
    name = Path(teacher_id).name if teacher_id.startswith(("/", ".", "~")) else teacher_id
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _resolve(layer: int, num_layers: int | None) -> int:
    layer = check_layer_number(layer)
    if layer >= 0:
        if num_layers is not None and layer > num_layers:
            raise ValueError(
                f"layer {layer} is out of range for a teacher with {num_layers} layers"
            )
        return layer
    if num_layers is None:
        raise ValueError(
            f"layer {layer}: negative layers need the teacher's layer count (pass teacher=)"
        )
    if layer < -(num_layers + 1):
        raise ValueError(f"layer {layer} is out of range for a teacher with {num_layers} layers")
    return layer % (num_layers + 1)


def _check_k(k: object, width: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= width:
        raise ValueError(f"k must be in [1, {width}] (the teacher's hidden size), got {k}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
