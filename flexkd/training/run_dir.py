"""The run folder (``train.output_dir``): its lock, its metrics log and the saved student.

<output_dir>/run.lock          {"pid", "host", "started"} of the process writing the folder
<output_dir>/run_config.json   the resolved config the run was started with, and the flexkd version
<output_dir>/metrics.jsonl     one JSON object per logged step (non-finite numbers as null)
<output_dir>/checkpoints/      see flexkd.checkpoint
<output_dir>/student/          the final student (save_pretrained)
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from flexkd._io import apply_umask, read_json, replace_dir, write_json, write_text
from flexkd.errors import ResumeMismatchError, RunFolderLockedError, UnreadableFileError

LOCK_NAME = "run.lock"
RUN_CONFIG_NAME = "run_config.json"
# Fields a resumed run may change: they cannot change its result (the whole ``eval`` section is
# read by ``flexkd eval`` only; the run folder is where the record lies; ``distributed`` changes only
# how the same sums are spread over the processes, and a checkpoint of a sharded student is refused
# by an unsharded one and vice versa).
RESULT_NEUTRAL_FIELDS = frozenset(
    {
        "train.progress",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.resume",
        "train.output_dir",
    }
)
RESULT_NEUTRAL_SECTIONS = frozenset({"eval", "distributed"})


class RunLock:
    """Holds ``folder`` for one process: a second run into it fails at once, naming the holder.

    The lock is a file created with ``O_EXCL``. A lock left by a process that died on this host
    (its PID no longer runs) is taken over with a message on stderr; a lock from another host
    cannot be checked, so it is refused and the message says which file to delete if it is stale.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._held = False

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_holder(self.path)
                if not _is_stale(holder):
                    raise RunFolderLockedError(
                        f"train.output_dir: {self.folder} is in use by process {holder.get('pid')} "
                        f"on {holder.get('host')} (since {holder.get('started')}); wait for it, or "
                        f"pick another output_dir (if that process is gone, delete {self.path})"
                    ) from None
                print(
                    f"flexkd: taking over {self.path}: process {holder.get('pid')} on "
                    f"{holder.get('host')} that held it is no longer running",
                    file=sys.stderr,
                )
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(_this_process(), handle)
            self._held = True
            return self
        raise RunFolderLockedError(f"train.output_dir: could not lock {self.folder}")

    def release(self) -> None:
        if self._held:
            with contextlib.suppress(FileNotFoundError):
                if _read_holder(self.path).get("pid") == os.getpid():
                    os.unlink(self.path)
            self._held = False

    def __enter__(self) -> RunLock:
        return self if self._held else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _this_process() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # being written right now, or unreadable: treated as held
    return holder if isinstance(holder, dict) else {}


def _is_stale(holder: Mapping[str, Any]) -> bool:
    """True when ``holder`` is a process of this host that no longer runs."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # runs, under another user
        return False
    return False


# --------------------------------------------------------------------------------------------------
# The config the run was started with.


def write_run_config(folder: Path, resolved: Mapping[str, Any]) -> Path:
    from flexkd import __version__

    return write_json(
        folder / RUN_CONFIG_NAME, {"flexkd_version": __version__, "config": dict(resolved)}
    )


def read_run_config(folder: Path) -> dict[str, Any] | None:
    """The recorded resolved config of ``folder`` (None when the folder has no record)."""
    path = folder / RUN_CONFIG_NAME
    if not path.exists():
        return None
    record = read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise UnreadableFileError(path, "is not a flexkd run config record (no 'config' mapping)")
    return record["config"]


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted field, old, new)`` for every leaf that differs and may change the run's result. A field
    the old record lacks (it came in a later flexkd) and the new config leaves at its default is the
    same run."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    missing = object()
    defaults = _field_defaults()
    changed = []
    for field in sorted(flat_old.keys() | flat_new.keys()):
        if field in RESULT_NEUTRAL_FIELDS or field.split(".")[0] in RESULT_NEUTRAL_SECTIONS:
            continue
        before, after = flat_old.get(field, missing), flat_new.get(field, missing)
        if before is missing and field in defaults and after == defaults[field]:
            continue
        if before != after:
            changed.append(
                (field, None if before is missing else before, None if after is missing else after)
            )
    return changed


def check_resume_config(folder: Path, resolved: Mapping[str, Any], checkpoint: Path) -> None:
    """Raise :class:`ResumeMismatchError` (one line) naming each result-changing field of ``resolved``
    that differs from the config ``folder`` was started with."""
    recorded = read_run_config(folder)
    if recorded is None:
        return  # a folder from before the record existed: nothing to compare with
    changed = changed_fields(recorded, json.loads(json.dumps(dict(resolved))))
    if changed:
        fields = "; ".join(f"{field}: {old!r} -> {new!r}" for field, old, new in changed)
        raise ResumeMismatchError(
            f"train.output_dir: {folder} holds a run started with another config, so it cannot resume "
            f"from {checkpoint.name} ({fields}); start over in that folder with "
            f"--set train.resume=false, or pick another train.output_dir"
        )


def _field_defaults() -> dict[str, Any]:
    """Dotted config field -> its default (as recorded: JSON values), for the fields that have one."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    from flexkd.config import Config

    defaults: dict[str, Any] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            kind = info.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                walk(kind, f"{prefix}{name}.")
            elif info.default is not PydanticUndefined:
                defaults[f"{prefix}{name}"] = json.loads(json.dumps(info.default, default=str))

    walk(Config, "")
    return defaults


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# --------------------------------------------------------------------------------------------------
# Metrics and the final student.


def start_metrics(path: Path, *, resume_step: int | None) -> None:
    """Drop the lines a resumed run will write again (all of them when not resuming), and a last
    line cut short by a kill mid-write."""
    if resume_step is None:
        path.unlink(missing_ok=True)
    elif path.exists():
        kept = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                continue  # a partial line: its step is rerun and logged again
            if step <= resume_step:
                kept.append(line)
        write_text(path, "".join(line + "\n" for line in kept))


def append_metrics(path: Path, record: Mapping[str, Any]) -> None:
    """One line of strict JSON: NaN and infinities are written as null."""
    clean = {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in record.items()
    }
    with path.open("a") as f:
        f.write(json.dumps(clean, allow_nan=False) + "\n")


def save_student(
    student: nn.Module, tokenizer, target: Path, *, state_dict=None, merged: bool = False
) -> None:
    """``save_pretrained`` (of ``state_dict`` when given, e.g. a sharded student's gathered one) into a
    temporary folder, then swap it into ``target`` atomically.

    A PEFT student saves its adapter (``peft.PeftModel.from_pretrained(base, target)`` loads it);
    with ``merged`` the adapter merged into a copy of the base model goes to ``target/merged``, a
    plain HF folder.
    """
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp, state_dict=state_dict)
    if merged:
        copy.deepcopy(student).merge_and_unload().save_pretrained(tmp / "merged")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
        if merged:
            tokenizer.save_pretrained(tmp / "merged")
    apply_umask(tmp)  # safetensors writes the weights 0600
    replace_dir(tmp, target)


def load_student_weights(student: nn.Module, folder: Path) -> None:
    """Load what ``save_pretrained`` wrote into ``folder`` into the live ``student`` (a PEFT student:
    its adapter weights)."""
    from flexkd.adapters.wrappers import is_peft_model

    folder = Path(folder)
    dtype = next(student.parameters()).dtype
    if is_peft_model(student):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(student, load_file(str(folder / "adapter_model.safetensors")))
        return
    saved = type(student).from_pretrained(folder, dtype=dtype)
    student.load_state_dict(saved.state_dict())
