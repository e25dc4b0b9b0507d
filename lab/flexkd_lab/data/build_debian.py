"""Build the committed Debian snapshot from the local apt lists.

    apt-get -o Acquire::Languages=en update      # fills /var/lib/apt/lists
    python -m flexkd_lab.data.build_debian       # rewrites flexkd_lab/data/debian/

Two tasks come out of the same descriptions (see PROVENANCE.md for the numbers):
``debian-sections`` (long description with package names masked -> archive section, the
largest sections only) and ``debian-synopsis`` (long description -> one-line synopsis).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from tqdm import tqdm

from . import apt_lists
from .bpe import train_bpe
from .near_dup import near_duplicate_clusters
from .text import mask_names, names_to_mask, normalise_for_dedup, split_description, truncate_words

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "debian")
SPLITS = ("train", "validation", "test")
SPLIT_SALT = "flexkd-debian-v1"
SYNOPSIS_TOKENIZER = "synopsis-tokenizer.json"


@dataclass(frozen=True)
class BuildConfig:
    num_sections: int = 20
    sections_sizes: tuple[int, int, int] = (10_000, 1_000, 2_000)
    synopsis_sizes: tuple[int, int, int] = (10_000, 1_000, 2_000)
    # Share of source packages that go to validation and test; the rest is train.
    validation_fraction: float = 0.10
    test_fraction: float = 0.15
    min_words: int = 12
    max_chars: int = 1000
    max_per_source: int = 4
    near_dup_threshold: float = 0.8
    bpe_vocab_size: int = 8192


@dataclass
class Description:
    md5: str
    synopsis: str
    body: str
    packages: list[str] = field(default_factory=list)
    sections: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)

    @property
    def package(self) -> str:
        return self.packages[0]

    @property
    def section(self) -> str:
        # Majority over the packages sharing the description; ties go to the smaller name.
        return min(self.sections.items(), key=lambda kv: (-kv[1], kv[0]))[0]

    @property
    def source(self) -> str:
        return min(self.sources.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def unit_hash(key: str) -> float:
    """A deterministic pseudo-random number in [0, 1) for ``key``."""
    digest = hashlib.sha256(f"{SPLIT_SALT}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(source: str, config: BuildConfig) -> str:
    """Whole source packages go to one split, so sibling binaries never straddle splits."""
    u = unit_hash("source:" + source)
    if u < config.validation_fraction:
        return "validation"
    if u < config.validation_fraction + config.test_fraction:
        return "test"
    return "train"


def detect_codename() -> str:
    with open("/etc/os-release", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip().strip('"')
    raise RuntimeError("cannot tell the Debian codename from /etc/os-release; pass --suite")


def read_descriptions(packages_text: str, translation_text: str) -> list[Description]:
    """Join Packages (section, source) with Translation-en (text) on ``Description-md5``."""
    texts: dict[str, str] = {}
    for stanza in apt_lists.iter_stanzas(translation_text):
        texts.setdefault(stanza["Description-md5"], stanza["Description-en"])
    by_md5: dict[str, Description] = {}
    seen: set[str] = set()
    for stanza in apt_lists.iter_stanzas(packages_text):
        name, md5 = stanza["Package"], stanza.get("Description-md5")
        if md5 not in texts or "Section" not in stanza or name in seen:
            continue
        seen.add(name)
        if md5 not in by_md5:
            synopsis, body = split_description(texts[md5])
            by_md5[md5] = Description(md5, synopsis, body)
        entry = by_md5[md5]
        entry.packages.append(name)
        entry.sections[stanza["Section"].rsplit("/", 1)[-1]] += 1
        entry.sources[stanza.get("Source", name).split(" ", 1)[0]] += 1
    for entry in by_md5.values():
        entry.packages.sort()
    return sorted(by_md5.values(), key=lambda d: d.md5)


def masked_body(entry: Description) -> str:
    return mask_names(entry.body, names_to_mask(entry.packages))


def deduplicate(entries: list[Description], config: BuildConfig) -> tuple[list[Description], dict]:
    """Drop short texts, exact duplicates after normalisation, near duplicates (MinHash), and
    cap how many descriptions one source package contributes."""
    stats: dict[str, int] = {"descriptions": len(entries)}
    entries = [e for e in entries if len(e.body.split()) >= config.min_words and e.synopsis]
    stats["long_enough"] = len(entries)
    normalised, kept = {}, []
    for entry in tqdm(entries, desc="normalise", unit="desc"):
        key = normalise_for_dedup(masked_body(entry))
        if key not in normalised:
            normalised[key] = entry
            kept.append((key, entry))
    stats["after_exact_dedup"] = len(kept)
    roots = near_duplicate_clusters(
        [k for k, _ in kept], threshold=config.near_dup_threshold, progress=True
    )
    entries = [entry for i, (_, entry) in enumerate(kept) if roots[i] == i]
    stats["after_near_dedup"] = len(entries)
    per_source: dict[str, list[Description]] = defaultdict(list)
    for entry in entries:
        per_source[entry.source].append(entry)
    entries = sorted(
        (
            e
            for group in per_source.values()
            for e in sorted(group, key=lambda d: unit_hash(d.md5))[: config.max_per_source]
        ),
        key=lambda d: d.md5,
    )
    stats["after_source_cap"] = len(entries)
    return entries, stats


def water_fill_cap(counts: dict[str, int], total: int) -> int:
    """The largest per-class cap c with sum(min(n, c)) <= total (so classes are balanced as
    far as their sizes allow)."""
    if sum(counts.values()) <= total:
        return max(counts.values(), default=0)
    low, high = 0, max(counts.values())
    while low < high:
        mid = (low + high + 1) // 2
        if sum(min(n, mid) for n in counts.values()) <= total:
            low = mid
        else:
            high = mid - 1
    return low


def sections_task(entries: list[Description], config: BuildConfig) -> tuple[dict, list[str]]:
    sizes = Counter(e.section for e in entries)
    labels = sorted(
        s for s, _ in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[: config.num_sections]
    )
    label_set = set(labels)
    rows: dict[str, list[dict]] = {}
    for split, target in zip(SPLITS, config.sections_sizes, strict=True):
        pool = defaultdict(list)
        for e in entries:
            if e.section in label_set and split_of(e.source, config) == split:
                pool[e.section].append(e)
        cap = water_fill_cap({s: len(v) for s, v in pool.items()}, target)
        chosen = [e for v in pool.values() for e in sorted(v, key=lambda d: unit_hash(d.md5))[:cap]]
        rows[split] = [
            {
                "id": e.md5,
                "package": e.package,
                "packages": e.packages,
                "source": e.source,
                "text": truncate_words(masked_body(e), config.max_chars),
                "label": e.section,
            }
            for e in sorted(chosen, key=lambda d: unit_hash("order:" + d.md5))
        ]
    return rows, labels


def synopsis_task(entries: list[Description], config: BuildConfig) -> dict:
    rows = {}
    for split, target in zip(SPLITS, config.synopsis_sizes, strict=True):
        pool = [
            e
            for e in entries
            if split_of(e.source, config) == split and len(e.synopsis.split()) >= 2
        ]
        chosen = sorted(pool, key=lambda d: unit_hash("synopsis:" + d.md5))[:target]
        rows[split] = [
            {
                "id": e.md5,
                "package": e.package,
                "source": e.source,
                "text": truncate_words(e.body, config.max_chars),
                "summary": e.synopsis,
            }
            for e in chosen
        ]
    return rows


def atomic_write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def jsonl_gz(rows: Iterable[dict]) -> bytes:
    """Gzip JSONL with a zero timestamp, so identical rows give identical bytes."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=9) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
    return buffer.getvalue()


def build(lists_dir: str, out_dir: str, suite: str, config: BuildConfig) -> dict:
    packages_path = apt_lists.find_list(f"*_dists_{suite}_main_binary-amd64_Packages*", lists_dir)
    translation_path = apt_lists.find_list(f"*_dists_{suite}_main_i18n_Translation-en*", lists_dir)
    release_path = apt_lists.find_list(f"*_dists_{suite}_InRelease", lists_dir)
    entries = read_descriptions(
        apt_lists.read_list_file(packages_path), apt_lists.read_list_file(translation_path)
    )
    entries, stats = deduplicate(entries, config)
    sections_rows, labels = sections_task(entries, config)
    synopsis_rows = synopsis_task(entries, config)
    os.makedirs(out_dir, exist_ok=True)
    counts: dict[str, dict] = {"debian-sections": {}, "debian-synopsis": {}}
    for split in SPLITS:
        atomic_write_bytes(
            os.path.join(out_dir, f"sections-{split}.jsonl.gz"), jsonl_gz(sections_rows[split])
        )
        atomic_write_bytes(
            os.path.join(out_dir, f"synopsis-{split}.jsonl.gz"), jsonl_gz(synopsis_rows[split])
        )
        counts["debian-sections"][split] = dict(
            sorted(Counter(r["label"] for r in sections_rows[split]).items())
        )
        counts["debian-synopsis"][split] = len(synopsis_rows[split])
    synopsis_texts = (t for r in synopsis_rows["train"] for t in (r["text"], r["summary"]))
    atomic_write_bytes(
        os.path.join(out_dir, SYNOPSIS_TOKENIZER),
        train_bpe(synopsis_texts, config.bpe_vocab_size).encode(),
    )
    meta = {
        "format": 1,
        "release": apt_lists.release_info(release_path),
        "sources": {
            os.path.basename(p): apt_lists.sha256_file(p) for p in (packages_path, translation_path)
        },
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()},
        "split_salt": SPLIT_SALT,
        "filtering": stats,
        "labels": {"debian-sections": labels},
        "counts": counts,
    }
    atomic_write_bytes(
        os.path.join(out_dir, "meta.json"),
        (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode(),
    )
    from .provenance import render_provenance

    atomic_write_bytes(os.path.join(out_dir, "PROVENANCE.md"), render_provenance(meta).encode())
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flexkd_lab.data.build_debian",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--lists-dir", default=apt_lists.APT_LISTS_DIR)
    parser.add_argument(
        "--out", default=DEFAULT_OUT, help="output folder (default: the package's snapshot)"
    )
    parser.add_argument("--suite", default=None, help="Debian codename (default: this system's)")
    args = parser.parse_args(argv)
    meta = build(args.lists_dir, args.out, args.suite or detect_codename(), BuildConfig())
    print(json.dumps({"filtering": meta["filtering"], "counts": meta["counts"]}, indent=1))


if __name__ == "__main__":
    main()
