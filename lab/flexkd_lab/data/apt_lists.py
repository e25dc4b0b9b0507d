"""Reading Debian apt list files (deb822 stanzas, optionally lz4-compressed)."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator

APT_LISTS_DIR = "/var/lib/apt/lists"


def read_list_file(path: str) -> str:
    """The text of an apt list file; ``.lz4`` files are decompressed with the ``lz4`` tool."""
    if not os.path.isfile(path):
        raise ValueError(f"path: no such file {path!r}")
    if not path.endswith(".lz4"):
        with open(path, encoding="utf-8") as f:
            return f.read()
    try:
        import lz4.frame  # optional; the CLI below is the default route

        with lz4.frame.open(path, "rb") as f:
            return f.read().decode("utf-8")
    except ImportError:
        pass
    tool = shutil.which("lz4")
    if tool is None:
        raise RuntimeError(
            f"{path} is lz4-compressed and neither the `lz4` command (apt-get install lz4) "
            "nor the Python `lz4` package is available"
        )
    out = subprocess.run([tool, "-dc", path], check=True, capture_output=True)
    return out.stdout.decode("utf-8")


def iter_stanzas(text: str) -> Iterator[dict[str, str]]:
    """Parse deb822 text into dicts. Continuation lines keep their leading space and are
    joined to the field with newlines, so multi-line fields round-trip exactly."""
    fields: dict[str, str] = {}
    key: str | None = None
    for line in text.splitlines():
        if not line.strip():
            if fields:
                yield fields
            fields, key = {}, None
        elif line[0] in " \t":
            if key is None:
                raise ValueError(f"text: continuation line before any field: {line!r}")
            fields[key] += "\n" + line
        else:
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"text: malformed deb822 line: {line!r}")
            key = name.strip()
            fields[key] = value.strip()
    if fields:
        yield fields


def find_list(pattern: str, lists_dir: str = APT_LISTS_DIR) -> str:
    """The single file in ``lists_dir`` whose name matches the glob ``pattern``."""
    matches = sorted(glob.glob(os.path.join(lists_dir, pattern)))
    if len(matches) != 1:
        raise FileNotFoundError(
            f"expected exactly one apt list matching {pattern!r} in {lists_dir}, found "
            f"{[os.path.basename(m) for m in matches]}; run `apt-get -o Acquire::Languages=en update`"
        )
    return matches[0]


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def release_info(inrelease_path: str) -> dict[str, str]:
    """Suite, codename, version and date from an (InRelease) Release file."""
    text = read_list_file(inrelease_path)
    if text.startswith("-----BEGIN PGP SIGNED MESSAGE-----"):
        text = text.split("\n\n", 1)[1].split("-----BEGIN PGP SIGNATURE-----", 1)[0]
    stanza = next(iter_stanzas(text))
    return {k: stanza[k] for k in ("Origin", "Suite", "Codename", "Version", "Date") if k in stanza}
