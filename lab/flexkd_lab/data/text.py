"""Turning Debian descriptions into model text: layout, package-name masking, normalisation."""

from __future__ import annotations

import re

NAME_MASK = "PKG"
"""What a package name (or its stem) is replaced with in classification inputs."""

# Packaging-convention prefixes and suffixes around an upstream name (checked in order).
_PREFIXES = (
    "golang-github-",
    "golang-gitlab-",
    "golang-gopkg-",
    "golang-golang-x-",
    "golang-",
    "python3-",
    "python-",
    "pypy3-",
    "r-cran-",
    "r-bioc-",
    "r-other-",
    "librust-",
    "libghc-",
    "libjs-",
    "libjs",
    "node-",
    "ruby-",
    "php-",
    "lua-",
    "elpa-",
    "fonts-",
    "xfonts-",
    "texlive-",
    "gir1.2-",
    "gnome-shell-extension-",
    "vim-",
    "lib",
)
_SUFFIXES = (
    "-dev",
    "-doc",
    "-docs",
    "-common",
    "-data",
    "-utils",
    "-tools",
    "-bin",
    "-perl",
    "-java",
    "-ocaml",
    "-dbg",
    "-examples",
    "-plugins",
    "-plugin",
    "-prof",
    "-cil",
    "-tests",
    "-l10n",
    "-el",
    "-runtime",
    "-headers",
    "-static",
    "-modules",
    "-module",
    "-extension",
)
_VERSION_TAIL = re.compile(r"(?:[-.]?\d+(?:\.\d+)*[a-z]?|t64)$")
# Stems that are packaging words, not names: masking them would blank ordinary text.
_GENERIC_STEMS = frozenset(
    "doc docs dev common data utils tools bin test tests core base lib extra extras plugin "
    "plugins all full source src examples runtime".split()
)
_MIN_STEM_LEN = 3


def split_description(description_en: str) -> tuple[str, str]:
    """Split a ``Description-en`` field into its synopsis and its long description.

    The long description follows deb822/Debian-policy layout: lines starting with one space
    are wrapped text, ``" ."`` separates paragraphs, lines starting with two or more spaces
    are verbatim (lists, code). Returns paragraphs joined by newlines; wrapped lines are
    joined with spaces and verbatim lines keep their own line."""
    first, _, rest = description_en.partition("\n")
    paragraphs: list[list[str]] = [[]]
    for raw in rest.split("\n"):
        line = raw[1:] if raw.startswith(" ") else raw
        if line.strip() == ".":
            paragraphs.append([])
        elif line.startswith((" ", "\t")) and paragraphs[-1]:
            paragraphs[-1].append("\n" + line.strip())
        elif line.strip():
            paragraphs[-1].append(line.strip())
    body = "\n".join(" ".join(lines).replace(" \n", "\n").strip() for lines in paragraphs if lines)
    return first.strip(), body


def name_stem(package: str) -> str:
    """The upstream name inside a Debian package name (``libghc-aeson-dev`` -> ``aeson``)."""
    stem = package.lower()
    for prefix in _PREFIXES:
        if stem.startswith(prefix) and len(stem) > len(prefix):
            stem = stem[len(prefix) :]
            break
    changed = True
    while changed:
        changed = False
        for suffix in _SUFFIXES:
            if stem.endswith(suffix) and len(stem) > len(suffix):
                stem, changed = stem[: -len(suffix)], True
        trimmed = _VERSION_TAIL.sub("", stem)
        if trimmed and trimmed != stem:
            stem, changed = trimmed, True
    return stem.strip("-.+")


def names_to_mask(packages: list[str]) -> list[str]:
    """Every name and usable stem to hide for a description shared by ``packages``."""
    names: set[str] = set()
    for package in packages:
        names.add(package.lower())
        stem = name_stem(package)
        if len(stem) >= _MIN_STEM_LEN and stem not in _GENERIC_STEMS:
            names.add(stem)
            if package.startswith("golang-") and "-" in stem:
                tail = stem.rsplit("-", 1)[1]
                if len(tail) >= _MIN_STEM_LEN and tail not in _GENERIC_STEMS:
                    names.add(tail)
    # Longest first so "foo-bar" is masked whole before "foo" could match inside it.
    return sorted(names, key=lambda n: (-len(n), n))


def name_pattern(names: list[str]) -> re.Pattern[str]:
    """A case-insensitive pattern matching any of ``names`` as a whole token; the
    separators ``- _ .`` and space are interchangeable inside a name."""
    if not names:
        raise ValueError("names: expected at least one name")
    alternatives = []
    for name in names:
        parts = re.split(r"[-_. ]+", name)
        alternatives.append(r"[-_. ]".join(re.escape(p) for p in parts if p))
    return re.compile(
        r"(?<![A-Za-z0-9])(?:" + "|".join(alternatives) + r")(?![A-Za-z0-9])", re.IGNORECASE
    )


def mask_names(text: str, names: list[str], mask: str = NAME_MASK) -> str:
    """Replace every occurrence of any of ``names`` in ``text`` with ``mask``."""
    return name_pattern(names).sub(mask, text)


def truncate_words(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters, at a word boundary."""
    if max_chars <= 0:
        raise ValueError(f"max_chars: expected a positive int, got {max_chars}")
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    return (cut[:space] if space > 0 else cut).rstrip()


_NON_WORD = re.compile(r"[^a-z0-9]+")
_DIGITS = re.compile(r"\d+")


def normalise_for_dedup(text: str) -> str:
    """Lowercase, digits collapsed to ``0``, punctuation dropped: templated descriptions that
    differ only in version numbers or punctuation normalise to the same string."""
    return _NON_WORD.sub(" ", _DIGITS.sub("0", text.lower())).strip()
