"""Atomic training checkpoints that resume a run exactly.

A checkpoint is a folder ``<root>/step-000100/``::

    student/                      save_pretrained of the student (usable on its own)
    feature_losses.safetensors    projector parameters (absent when there are none)
    optimizer.pt, scheduler.pt    their state_dicts
    state.json                    step, data-order state (epoch, position, seed), world size
    rng/rank-<r>.pt               python, numpy, torch CPU and CUDA generator states of each rank
    manifest.json                 size and sha256 of every file above, written last

A run whose student is sharded (FSDP2) writes ``sharded/`` instead of ``feature_losses.safetensors``
and ``optimizer.pt``: the student's and projectors' parameters and the optimizer state as each rank
holds them (``torch.distributed.checkpoint``); ``student/`` is then gathered on rank 0.

It is written into ``<root>/.step-000100.tmp`` and renamed into place with ``os.replace``
only when every rank has written its part, so a crash never leaves a half-written
checkpoint where ``latest_checkpoint`` would find it. A checkpoint damaged later (a full disk,
a copy cut short, bit rot) is caught by :func:`verify_checkpoint` against its manifest before
anything is loaded, and :func:`resume_point` falls back to the newest intact one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flexkd._io import apply_umask, one_line, read_json, replace_dir, sha256_file, write_json
from flexkd.distributed import is_sharded
from flexkd.errors import DamagedCheckpointError, ResumeMismatchError, UnreadableFileError

_NAME = re.compile(r"^step-(\d{6,})$")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "flexkd-checkpoint-manifest/1"


@dataclass
class RunState:
    """Where a run is: optimizer steps taken and the data order's position.

    ``epoch`` and ``position`` (micro-batches of this rank's shard already consumed in that
    epoch) plus ``seed`` fix the rest of the data order; see ``flexkd.training.ShardedOrder``.
    """

    step: int
    epoch: int
    position: int
    seed: int
    world_size: int


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def capture_rng() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _no_barrier() -> None:
    return None


def save_checkpoint(
    root: str | os.PathLike,
    *,
    state: RunState,
    student: nn.Module,
    feature_losses: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
    barrier: Callable[[], None] = _no_barrier,
) -> Path:
    """Write the checkpoint for ``state.step`` (collective: every rank must call it)."""
    root = Path(root)
    final = root / checkpoint_name(state.step)
    tmp = root / f".{final.name}.tmp"
    sharded = is_sharded(student)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    barrier()
    full = gather_full_state_dict(student) if sharded else None
    if sharded:
        import torch.distributed.checkpoint as dcp

        dcp.save(_sharded_state(student, feature_losses, optimizer), checkpoint_id=tmp / "sharded")
    if rank == 0:
        student.save_pretrained(tmp / "student", state_dict=full)
        if not sharded:
            feature_state = {
                k: v.detach().cpu().contiguous() for k, v in feature_losses.state_dict().items()
            }
            if feature_state:
                save_file(feature_state, str(tmp / "feature_losses.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
    torch.save(capture_rng(), tmp / "rng" / f"rank-{rank}.pt")
    barrier()
    if rank == 0:
        write_manifest(tmp)
        replace_dir(apply_umask(tmp), final)  # safetensors writes its files 0600
    barrier()
    return final


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's full state dict on CPU, on rank 0 (empty on the others; collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def _sharded_state(student: nn.Module, feature_losses: nn.Module, optimizer) -> dict[str, Any]:
    """What ``sharded/`` holds: every rank's shards of the trained modules and the optimizer state."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    trained = nn.ModuleDict({"student": student, "feature_losses": feature_losses})
    model_state, optimizer_state = get_state_dict(trained, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def _load_sharded(folder: Path, student: nn.Module, feature_losses: nn.Module, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _sharded_state(student, feature_losses, optimizer)
    with _naming(folder):
        dcp.load(state, checkpoint_id=folder)
    set_state_dict(
        nn.ModuleDict({"student": student, "feature_losses": feature_losses}),
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
    )


def _files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST
    )


def write_manifest(folder: Path) -> None:
    """Record the size and sha256 of every file of the checkpoint ``folder`` (the last file written)."""
    files = {
        name: {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
        for name in _files(folder)
    }
    write_json(folder / MANIFEST, {"format": MANIFEST_FORMAT, "files": files})


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise :class:`DamagedCheckpointError` naming the first file of ``path`` that is missing, cut short
    or altered since the manifest was written (or the manifest itself when it is unreadable)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise DamagedCheckpointError(
            manifest_path, "missing (the checkpoint is incomplete or from an older flexkd)"
        )
    try:
        manifest = read_json(manifest_path)
    except UnreadableFileError as error:
        raise DamagedCheckpointError(error.path, error.reason) from None
    if not isinstance(manifest, dict):
        manifest = {}
    files = manifest.get("files")
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
        raise DamagedCheckpointError(manifest_path, f"is not a {MANIFEST_FORMAT} manifest")
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            raise DamagedCheckpointError(file, "missing")
        size = file.stat().st_size
        if size != want["size"]:
            raise DamagedCheckpointError(file, f"is {size} bytes, the manifest says {want['size']}")
        if sha256_file(file) != want["sha256"]:
            raise DamagedCheckpointError(file, "content differs from the manifest's sha256")


def resume_point(root: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint under ``root`` that passes :func:`verify_checkpoint`, and the newer ones
    skipped on the way as ``(path, reason)``."""
    skipped = []
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
        except DamagedCheckpointError as error:
            skipped.append((path, str(error)))
            continue
        return path, skipped
    return None, skipped


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune_checkpoints(root: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    student: nn.Module,
    feature_losses: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
    world_size: int = 1,
) -> RunState:
    """Restore everything ``save_checkpoint`` wrote into the live objects; returns the run state.

    Call :func:`verify_checkpoint` first: a file that still fails to load raises
    :class:`DamagedCheckpointError` naming it."""
    path = Path(path)
    state_path = path / "state.json"
    try:
        state = RunState(**read_json(state_path))
    except UnreadableFileError as error:
        raise DamagedCheckpointError(error.path, error.reason) from None
    except TypeError as error:
        raise DamagedCheckpointError(
            state_path, f"is not a run state ({one_line(error)})"
        ) from None
    if state.world_size != world_size:
        raise ResumeMismatchError(
            f"checkpoint: {path} was written by {state.world_size} processes, this run has {world_size}; "
            "resume with the same number of processes (the data order is sharded per process)"
        )
    sharded = (path / "sharded").is_dir()
    if sharded != is_sharded(student):
        written, now = ("a sharded", "not sharded") if sharded else ("an unsharded", "sharded")
        raise ResumeMismatchError(
            f"checkpoint: {path} was written by {written} student, this run's student is {now}; "
            "resume with the same distributed.fsdp.student"
        )
    if sharded:
        _load_sharded(path / "sharded", student, feature_losses, optimizer)
    else:
        _load_replicated(path, student, feature_losses, optimizer)
    with _naming(path / "scheduler.pt"):
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / "rng" / f"rank-{rank}.pt"
    with _naming(rng_file):
        restore_rng(torch.load(rng_file, weights_only=False))
    return state


def _load_replicated(path: Path, student: nn.Module, feature_losses: nn.Module, optimizer) -> None:
    with _naming(path / "student"):
        from flexkd.training.run_dir import load_student_weights

        load_student_weights(student, path / "student")
    feature_file = path / "feature_losses.safetensors"
    if feature_file.exists():
        with _naming(feature_file):
            feature_losses.load_state_dict(load_file(str(feature_file)))
    device = next(student.parameters()).device
    with _naming(path / "optimizer.pt"):
        optimizer.load_state_dict(
            torch.load(path / "optimizer.pt", map_location=device, weights_only=False)
        )


@contextlib.contextmanager
def _naming(file: Path):
    """Turn a reader's own error (SafetensorError, PytorchStreamReader, pickle, OSError) into one naming ``file``."""
    try:
        yield
    except DamagedCheckpointError:
        raise
    except Exception as error:  # the readers raise many unrelated types
        raise DamagedCheckpointError(file, f"cannot be loaded ({one_line(error)})") from None
