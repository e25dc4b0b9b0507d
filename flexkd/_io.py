"""Crash-safe writes: a file or folder either appears whole under its name or not at all.

Everything is written under a temporary name in the destination's folder (same file system) and
renamed into place with ``os.replace``, so a kill mid-write never leaves a truncated result behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from flexkd.errors import UnreadableFileError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """``open`` for writing whose result replaces ``path`` only when the ``with`` block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary file name to hand to a writer that wants a path (``savefig``, ``save_file``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~process_umask())  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def process_umask() -> int:
    """The process umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: str | os.PathLike) -> Path:
    """Give ``folder`` and everything in it the modes a plain ``open``/``mkdir`` would (666/777 less the
    umask): writers that go through temporary files (``mkdtemp``, ``mkstemp``, safetensors) leave 0700
    and 0600 behind."""
    folder = Path(folder)
    umask = process_umask()
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)
    return folder


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the finished folder ``tmp`` to ``target``, replacing an existing ``target``.

    A folder cannot be swapped in one rename, so the old one is first renamed aside; a kill between the
    two renames leaves ``.NAME.old`` beside a missing ``target``, never a half-written ``target``.
    """
    tmp, target = Path(tmp), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target


# --------------------------------------------------------------------------------------------------
# Reading: a file that cannot be read or parsed is an UnreadableFileError naming it, in one line.


def one_line(error: BaseException) -> str:
    """``error``'s message with its whitespace runs (newlines of YAML or JSON errors) collapsed."""
    return " ".join(str(error).split()) or type(error).__name__


def read_text(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UnreadableFileError(path, f"cannot be read ({one_line(error)})") from None


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``; a missing, unreadable or truncated file raises UnreadableFileError."""
    text = read_text(path)
    try:
        return json.loads(text)
    except ValueError as error:
        raise UnreadableFileError(path, f"is not valid JSON ({one_line(error)})") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
